"""On-chip incremental learning (Akida 1.0): spike head, few-shot fit, new classes, metrics."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import akida
import numpy as np

from common.errors import DataError, ModelError
from common.log import get_logger
from common.metrics import classification_metrics
from common.preprocess import check_pixel_range

__all__ = [
    "EDGE_HEAD",
    "add_classes",
    "as_akida_images",
    "edge_learning_eval",
    "learn",
    "learning_params",
    "predict_classes",
    "prepare_edge_learning",
    "save_model_atomic",
    "spike_counts",
]

log = get_logger("edge.learning")

#: Name of the learnable layer that replaces the float head.
EDGE_HEAD = "edge_head"

#: num_weights = this × the median number of spikes an image makes (BrainChip's rule of thumb).
NUM_WEIGHTS_FACTOR = 1.2


def as_akida_images(images: np.ndarray, model: akida.Model | None = None) -> np.ndarray:
    """Return ``images`` as the raw uint8 0–255 batch an Akida model takes.

    Parameters
    ----------
    images : np.ndarray
        ``(N, H, W, C)`` uint8, or float holding 0–255 pixel values.
    model : akida.Model | None (default: None)
        When given, the image shape must equal ``model.input_shape``.

    Raises
    ------
    DataError
        If the images are 0–1 floats (Akida would give silently wrong outputs), negative,
        above 255, empty, or of the wrong shape.
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or len(arr) == 0:
        raise DataError(
            f"expected a non-empty image batch (N, H, W, C), got shape {arr.shape}",
            "stack the images into one uint8 array",
        )
    check_pixel_range(arr)
    if model is not None and list(arr.shape[1:]) != list(model.input_shape):
        raise DataError(
            f"images are {arr.shape[1:]} but the Akida model takes {tuple(model.input_shape)}",
            f"resize the images to {model.input_shape[0]} px (e.g. --size {model.input_shape[0]})",
        )
    if arr.dtype != np.uint8:
        arr = np.rint(arr).astype(np.uint8)
    return arr


def _spike_layer(model: akida.Model) -> akida.Layer:
    """Return the layer before the head, checking that it emits 1-bit spikes."""
    if model.ip_version != akida.IpVersion.v1:
        raise ModelError(
            f"on-chip learning needs an Akida 1.0 model, this one is {model.ip_version}",
            "convert the qana-akd1000 variant under cnn2snn.set_akida_version(AkidaVersion.v1)",
        )
    if len(model.layers) < 3:
        raise ModelError(
            f"the Akida model has only {len(model.layers)} layers; edge learning needs a "
            "backbone, a spike layer and a head",
            "use a converted QANA model",
        )
    layer = model.layers[-2]
    bits = getattr(layer.parameters, "act_bits", None)
    if bits != 1:
        raise ModelError(
            f"layer {layer.name!r} before the head emits {bits}-bit activations; on-chip "
            "learning needs 1-bit spikes",
            "end the backbone with a ReLU(max 1) 'spike generator' and set its output "
            "quantizer bitwidth to 1 after quantizeml quantization (qana-akd1000 does this)",
        )
    return layer


def spike_counts(model: akida.Model, images: np.ndarray, *, has_head: bool = True) -> np.ndarray:
    """Count the spikes the layer before the head emits for each image.

    Parameters
    ----------
    model : akida.Model
        A converted Akida 1.0 model.
    images : np.ndarray
        Raw 0–255 images.
    has_head : bool (default: True)
        Whether ``model`` still ends with its head (False: it ends with the spike layer).
    """
    backbone = akida.Model(layers=model.layers[:-1]) if has_head else model
    spikes = backbone.forward(as_akida_images(images, model))
    return np.count_nonzero(spikes.reshape(len(spikes), -1), axis=1)


def prepare_edge_learning(
    model: akida.Model,
    num_classes: int,
    sample_images: np.ndarray,
    *,
    neurons_per_class: int = 1,
    learning_competition: float = 0.1,
    num_weights: int | None = None,
) -> akida.Model:
    """Return a copy of ``model`` whose head is a learnable Akida layer.

    The float head is dropped and replaced by
    ``FullyConnected(units=num_classes × neurons_per_class, activation=False)`` compiled with
    ``AkidaUnsupervised``; ``model`` itself is not changed.

    Parameters
    ----------
    model : akida.Model
        A converted Akida 1.0 model whose layer before the head emits 1-bit spikes.
    num_classes : int
        Classes the new head starts with (more can be added with :func:`add_classes`).
    sample_images : np.ndarray
        Raw 0–255 images used to count spikes per image.
    neurons_per_class : int (default: 1)
        Neurons per class (more can capture several modes of a class).
    learning_competition : float (default: 0.1)
        How strongly neurons compete; BrainChip's examples use 0.1.
    num_weights : int | None (default: None)
        Connections per neuron; 1.2 × the median spike count of ``sample_images`` when None.

    Raises
    ------
    ModelError
        If the model is not Akida 1.0, does not emit 1-bit spikes before the head, or emits
        no spikes on the sample images.
    DataError
        If the sample images are not raw 0–255 pixels of the model's input shape.
    """
    if num_classes < 1 or neurons_per_class < 1:
        raise ModelError(
            f"num_classes={num_classes} and neurons_per_class={neurons_per_class} must be ≥ 1"
        )
    if not 0.0 <= learning_competition <= 1.0:
        raise ModelError(f"learning_competition must be in [0, 1], got {learning_competition}")
    spike_layer = _spike_layer(model)
    counts = spike_counts(model, sample_images)
    median = float(np.median(counts))
    if num_weights is None:
        if median == 0:
            raise ModelError(
                f"layer {spike_layer.name!r} emits no spikes on the {len(counts)} sample images "
                f"(max {int(counts.max())} per image)",
                "learn from a model trained longer or wider on similar images (qanafed model "
                "train --epochs/--width), and check the images are raw 0-255 pixels",
            )
        num_weights = max(1, round(NUM_WEIGHTS_FACTOR * median))
    inputs = int(np.prod(spike_layer.output_dims))
    if not 1 <= num_weights <= inputs:
        raise ModelError(
            f"num_weights={num_weights} must be between 1 and the {inputs} spike inputs",
            "let the spike counts set it (qanafed model learn and the scenario's edge "
            "section do)",
        )
    edge = akida.Model(layers=model.layers[:-1])
    edge.add(akida.FullyConnected(
        units=num_classes * neurons_per_class, activation=False, name=EDGE_HEAD
    ))
    edge.compile(akida.AkidaUnsupervised(
        num_weights=num_weights,
        num_classes=num_classes,
        learning_competition=learning_competition,
    ))
    log.info(
        "edge head: %d classes × %d neurons, num_weights %d (median %.1f spikes of %d)",
        num_classes, neurons_per_class, num_weights, median, inputs,
    )
    return edge


def learning_params(model: akida.Model) -> dict[str, Any]:
    """Return the learning parameters of a model compiled for edge learning.

    Raises
    ------
    ModelError
        If the model's last layer is not compiled for learning.
    """
    opt = model.learning
    if opt is None:
        raise ModelError(
            "the Akida model's last layer is not compiled for learning",
            "call prepare_edge_learning(model, ...) first",
        )
    num_classes = int(opt.num_classes)
    units = int(model.output_shape[-1])
    return {
        "num_classes": num_classes,
        "neurons_per_class": units // max(num_classes, 1),
        "num_weights": int(opt.num_weights),
        "learning_competition": float(opt.learning_competition),
        "initial_plasticity": float(opt.initial_plasticity),
        "min_plasticity": float(opt.min_plasticity),
        "plasticity_decay": float(opt.plasticity_decay),
    }


def learn(
    model: akida.Model,
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    *,
    epochs: int = 1,
    shuffle: bool = True,
    seed: int = 0,
) -> None:
    """Learn from labelled images on the (software) chip, updating ``model`` in place.

    Parameters
    ----------
    model : akida.Model
        A model from :func:`prepare_edge_learning`.
    images : np.ndarray
        Raw uint8 0–255 images; 0–1 floats are refused.
    labels : Sequence[int] | np.ndarray
        One class index per image, each below the head's current number of classes.
    epochs : int (default: 1)
        Passes over the images.
    shuffle : bool (default: True)
        Present the images in a seeded random order each epoch (learning is order-dependent).
    seed : int (default: 0)
        Seed of the order.

    Raises
    ------
    DataError
        If images are not raw 0–255 pixels, or labels do not match them or the head.
    ModelError
        If the model is not compiled for learning.
    """
    params = learning_params(model)
    x = as_akida_images(images, model)
    y = np.asarray(labels).astype(np.int64).ravel()
    if len(y) != len(x):
        raise DataError(f"{len(x)} images but {len(y)} labels", "give one label per image")
    if len(y) and (y.min() < 0 or y.max() >= params["num_classes"]):
        raise DataError(
            f"labels span {y.min()}..{y.max()} but the edge head has {params['num_classes']} "
            "classes (akida silently discards labels beyond that)",
            "call add_classes(model, n) before learning a new class",
        )
    if epochs < 1:
        raise DataError(f"epochs must be ≥ 1, got {epochs}")
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
        model.fit(x[order], y[order].astype(np.int32))
    log.debug("learned %d images × %d epoch(s)", len(x), epochs)


def predict_classes(
    model: akida.Model, images: np.ndarray, num_classes: int | None = None
) -> np.ndarray:
    """Predict one class per image (neurons are grouped by class).

    Parameters
    ----------
    model : akida.Model
        An Akida model (edge-learning or not).
    images : np.ndarray
        Raw uint8 0–255 images.
    num_classes : int | None (default: None)
        Classes of the head; read from the learning parameters (or the output size) when None.
    """
    if num_classes is None:
        num_classes = (
            learning_params(model)["num_classes"] if model.learning is not None
            else int(model.output_shape[-1])
        )
    model.map(None)
    return np.asarray(model.predict_classes(as_akida_images(images, model), num_classes))


def add_classes(model: akida.Model, n: int) -> int:
    """Add ``n`` classes never seen before to the edge head; return the new class count.

    Raises
    ------
    ModelError
        If the model is not compiled for learning or ``n`` < 1.
    """
    if n < 1:
        raise ModelError(f"add_classes needs n ≥ 1, got {n}")
    before = learning_params(model)["num_classes"]
    model.add_classes(int(n))
    after = learning_params(model)["num_classes"]
    log.info("edge head: %d → %d classes", before, after)
    return after


def save_model_atomic(model: akida.Model, path: str | Path) -> Path:
    """Save an Akida model (weights and what it learned) so no half-written file remains.

    The model is written to a temporary file in the same folder, then renamed over ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".fbz", dir=path.parent)
    os.close(fd)
    try:
        model.save(tmp)
        umask = os.umask(0)  # mkstemp made it 0600; a model file is not a secret
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _subset_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, mask: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any] | None:
    if not mask.any():
        return None
    m = classification_metrics(y_true[mask], y_pred[mask], class_names)
    return {k: m[k] for k in ("num_examples", "accuracy", "balanced_accuracy", "macro_f1")}


def edge_learning_eval(
    y_true: Sequence[int] | np.ndarray,
    y_pred_after: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    new_classes: Sequence[int] = (),
    y_pred_before: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Score predictions before and after edge learning, on old and on new classes.

    Parameters
    ----------
    y_true : Sequence[int] | np.ndarray
        True class indices into ``class_names``.
    y_pred_after : Sequence[int] | np.ndarray
        Predictions of the edge-learned model.
    class_names : Sequence[str]
        Names of all classes, old and new.
    new_classes : Sequence[int] (default: ())
        Indices of classes the model never saw before edge learning.
    y_pred_before : Sequence[int] | np.ndarray | None (default: None)
        Predictions of the model before edge learning, when it can be scored.

    Returns
    -------
    dict[str, Any]
        ``before`` and ``after`` (None when not given), each with ``all`` (the full
        :func:`common.metrics.classification_metrics`), ``old`` and ``new`` (accuracy,
        balanced accuracy, macro F1 on images of old / new classes, None when absent), and
        ``chance`` (1 / number of classes).
    """
    yt = np.asarray(y_true, dtype=np.int64).ravel()
    new_mask = np.isin(yt, np.asarray(list(new_classes), dtype=np.int64))

    def score(pred: Sequence[int] | np.ndarray) -> dict[str, Any]:
        yp = np.asarray(pred, dtype=np.int64).ravel()
        return {
            "all": classification_metrics(yt, yp, class_names),
            "old": _subset_metrics(yt, yp, ~new_mask, class_names),
            "new": _subset_metrics(yt, yp, new_mask, class_names),
        }

    return {
        "class_names": list(class_names),
        "new_classes": [class_names[i] for i in new_classes],
        "chance": 1.0 / len(class_names),
        "before": None if y_pred_before is None else score(y_pred_before),
        "after": score(y_pred_after),
    }
