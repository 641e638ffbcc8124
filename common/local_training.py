"""A site's local training: one model and one compiled train step per process, reused every round.

Building a quantized QANA model (quantizeml) and tracing its training graph cost far more than
a round of local training on a small site, so each process keeps one float and one quantized
model per scenario, with their Adam optimizer and ``tf.function`` train step. A round assigns
the global arrays, zeroes the optimizer state and sets the learning rate and the FedProx
anchors: every variable the step reads is reset, so a round gives the same result in a fresh
process as in one that already ran other rounds or other sites (tested by resume).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .log import get_logger
from .weights import set_arrays

log = get_logger("site.training")

FLOAT = "float"
QUANTIZED = "quantized"


@dataclass
class LocalModel:
    """A model with its optimizer, FedProx anchors and compiled train step.

    Parameters
    ----------
    model : tf_keras.Model
        Float or quantized model; its variables are overwritten every round.
    optimizer : tf_keras.optimizers.Adam
        Built on the model's trainable variables; reset every round.
    anchors : list
        ``tf.Variable`` copies of the trainable weights at the round's start (FedProx).
    mu : Any
        ``tf.Variable`` holding the proximal weight.
    step : Callable
        Compiled ``step(x, y) -> cross-entropy loss`` (one optimizer update).
    """

    model: Any
    optimizer: Any
    anchors: list
    mu: Any
    step: Callable

    def start_round(self, arrays: dict[str, np.ndarray], lr: float, proximal_mu: float) -> None:
        """Load the global arrays; zero Adam's moments and step count; set lr, mu and anchors."""
        set_arrays(self.model, arrays)
        for var in self.optimizer.variables():
            var.assign(np.zeros(var.shape, dtype=var.dtype.as_numpy_dtype))
        self.optimizer.learning_rate = float(lr)
        self.mu.assign(float(proximal_mu))
        for anchor, weight in zip(self.anchors, self.model.trainable_weights, strict=True):
            anchor.assign(weight)


def from_logits(model) -> bool:
    """Whether the model outputs logits (no final softmax)."""
    import tf_keras as keras

    last = model.layers[-1]
    return getattr(last, "activation", None) is not keras.activations.softmax


@dataclass(frozen=True)
class SgtOptions:
    """Saliency-guided training options of the local step (see :mod:`common.sgt`).

    Parameters
    ----------
    mask_fraction : float (default: 0.1)
        Fraction of lowest-saliency pixels masked per image.
    kl_weight : float (default: 1.0)
        Weight of KL(p(x) ‖ p(masked x)).
    """

    mask_fraction: float = 0.1
    kl_weight: float = 1.0


def compile_local(model, sgt: SgtOptions | None = None) -> LocalModel:
    """Wrap ``model`` with an Adam optimizer and a ``tf.function`` train step.

    Loss: cross-entropy (with ``sgt``: the saliency-guided loss of
    :meth:`common.sgt.SaliencyGuidedModel.sgt_losses`, cross-entropy + KL on masked inputs),
    plus the model's own losses (e.g. PACT's α penalty), plus ``mu / 2 * ||w - w_anchor||²``
    over the trainable weights (FedProx; zero when ``mu`` is 0). The step returns the
    cross-entropy and is traced once per process, for any batch size.

    Raises
    ------
    ModelError
        With ``sgt``, if the model ends with a softmax (SGT needs logits).
    """
    import tensorflow as tf
    import tf_keras as keras

    logits_out = from_logits(model)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=logits_out)
    guided = None
    if sgt is not None:
        from .errors import ModelError
        from .sgt import SaliencyGuidedModel

        if not logits_out:
            raise ModelError(f"model {model.name!r} ends with a softmax; SGT needs logits",
                             "build the model without a final softmax, or disable sgt")
        guided = SaliencyGuidedModel(model, sgt.mask_fraction, sgt.kl_weight)
    weights = model.trainable_weights
    optimizer = keras.optimizers.Adam(learning_rate=1e-3)
    optimizer.build(weights)
    anchors = [tf.Variable(w, trainable=False) for w in weights]
    mu = tf.Variable(0.0, trainable=False, dtype=tf.float32)
    size = tuple(model.input_shape[1:])

    @tf.function(input_signature=[tf.TensorSpec((None, *size), tf.float32),
                                  tf.TensorSpec((None,), tf.int32)])
    def step(x, y):
        with tf.GradientTape() as tape:
            if guided is not None:
                losses = guided.sgt_losses(x, y, training=True)  # includes model.losses
                loss, total = losses["ce"], losses["loss"]
            else:
                loss = loss_fn(y, model(x, training=True))
                total = loss + tf.add_n(model.losses) if model.losses else loss
            prox = tf.add_n([tf.reduce_sum(tf.square(w - a))
                             for w, a in zip(weights, anchors, strict=True)])
            total = total + (mu / 2.0) * prox
        grads = tape.gradient(total, weights)
        optimizer.apply_gradients(zip(grads, weights, strict=True))
        return loss

    return LocalModel(model, optimizer, anchors, mu, step)


class ModelCache:
    """One :class:`LocalModel` per kind (``float``, ``quantized``) for the current scenario.

    A different scenario key (variant, size, width, classes ...) drops every cached model and
    clears the Keras session first, so a process never holds models of two scenarios. A
    different ``tag`` of one kind (e.g. the baked PACT α of the quantized model) rebuilds that
    kind only.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.models: dict[str, LocalModel] = {}
        self.tags: dict[str, Any] = {}

    def get(
        self, key: tuple, kind: str, build: Callable[[], Any], *, tag: Any = None,
        sgt: SgtOptions | None = None,
    ) -> LocalModel:
        """Return the cached model of ``kind`` for ``key`` and ``tag``, built with ``build()``.

        Parameters
        ----------
        key : tuple
            Scenario key; a new one clears the cache.
        kind : str
            ``float`` or ``quantized``.
        build : Callable[[], Any]
            Returns the uncompiled model.
        tag : Any (default: None)
            Anything else the model's structure depends on; a new tag rebuilds this kind.
        sgt : SgtOptions | None (default: None)
            Compile a saliency-guided step (part of the tag).
        """
        if key != self.key:
            self.clear()
            self.key = key
        tag = (tag, sgt)
        if kind not in self.models or self.tags.get(kind) != tag:
            log.info("building the %s model of this process", kind)
            self.models.pop(kind, None)
            self.models[kind] = compile_local(build(), sgt)
            self.tags[kind] = tag
        return self.models[kind]

    def clear(self) -> None:
        """Forget every cached model and free Keras' global state."""
        import tf_keras as keras

        self.tags.clear()
        if self.models:
            self.models.clear()
            keras.backend.clear_session()
            gc.collect()
        self.key = None


#: The process-wide cache used by :mod:`common.site`.
CACHE = ModelCache()


def train(
    local: LocalModel,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    augment: bool,
    seed: int,
) -> float:
    """Run ``epochs`` seeded epochs of the compiled step; return the last epoch's mean loss."""
    from .augment import make_dataset

    losses: list[float] = []
    for epoch in range(epochs):
        ds = make_dataset(x, y, batch_size=batch_size, augment=augment, shuffle=True,
                          seed=seed + epoch)
        losses = [float(local.step(xb, yb)) for xb, yb in ds]
    return float(np.mean(losses)) if losses else 0.0


def predict_logits(model, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Logits of a Keras model on raw 0–255 images, in batches (no ``predict`` retracing)."""
    import tensorflow as tf

    if len(x) == 0:
        return np.zeros((0, int(model.output_shape[-1])), np.float32)
    out = [model(tf.constant(x[i:i + batch_size], tf.float32), training=False).numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out).reshape(len(x), -1)
