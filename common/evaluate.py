"""Evaluate a saved Akida model on any supported dataset, with classes matched by name."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .classes import HAM_CLASSES
from .dataset import LesionDataset
from .errors import DataError, ModelError
from .log import get_logger
from .metrics import classification_metrics

log = get_logger("evaluate")


def model_class_names(model_path: str | Path, num_outputs: int) -> tuple[str, ...]:
    """Class names of a saved model: from the ``metrics.json`` beside it, else HAM10000's 7.

    Raises
    ------
    ModelError
        When no sidecar names the classes and the output count is not 7.
    """
    sidecar = Path(model_path).with_name("metrics.json")
    if sidecar.is_file():
        try:
            names = tuple(json.loads(sidecar.read_text())["class_names"])
        except (ValueError, KeyError, TypeError) as err:
            raise ModelError(
                f"{sidecar} does not list class_names ({err})",
                "re-run `qanafed model train`, or pass the class names explicitly",
            ) from err
        if len(names) != num_outputs:
            raise ModelError(
                f"{sidecar} lists {len(names)} classes but the model has {num_outputs} outputs",
                "use the metrics.json written with this model",
            )
        return names
    if num_outputs == len(HAM_CLASSES):
        return HAM_CLASSES
    raise ModelError(
        f"model {model_path} has {num_outputs} outputs and no metrics.json beside it naming them",
        "pass the class names in label order (e.g. --classes a,b,c)",
    )


def map_labels(ds: LesionDataset, model_classes: Sequence[str]) -> np.ndarray:
    """Translate the dataset's label indices into the model's, matching class names.

    Raises
    ------
    DataError
        When images carry a class the model does not know.
    """
    index = {name: i for i, name in enumerate(model_classes)}
    present = sorted({ds.class_names[i] for i in np.unique(ds.labels)})
    unknown = [name for name in present if name not in index]
    if unknown:
        raise DataError(
            f"the data has classes {unknown} that the model (classes {list(model_classes)}) "
            "does not know",
            "evaluate on data with the model's classes, or drop/merge those images first",
        )
    lookup = np.array([index.get(name, -1) for name in ds.class_names])
    return lookup[ds.labels]


def evaluate_akida(
    model_path: str | Path,
    ds: LesionDataset,
    *,
    class_names: Sequence[str] | None = None,
    indices: np.ndarray | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score a saved Akida model on a dataset, preprocessed as in training (raw 0–255 pixels).

    Parameters
    ----------
    model_path : str | Path
        An ``.fbz`` file written by ``qanafed model train``.
    ds : LesionDataset
        Any loaded dataset; its classes are matched to the model's by name.
    class_names : Sequence[str] | None (default: None)
        The model's classes; by default read from ``metrics.json`` beside the model.
    indices : np.ndarray | None (default: None)
        Evaluate only these images (e.g. a saved split's test part).
    batch_size : int (default: 64)
        Images per Akida call.
    progress : Callable[[int, int], None] | None (default: None)
        Decoding progress callback.

    Returns
    -------
    dict[str, Any]
        The keys of ``metrics.json`` results: ``accuracy``, ``balanced_accuracy``,
        ``macro_f1``, ``per_class``, ``confusion_matrix``, ``num_examples``, plus ``model``.
    """
    from .convert import load_akida
    from .preprocess import load_arrays
    from .train import predict_akida

    ak_model = load_akida(model_path)
    height, width, channels = (int(d) for d in ak_model.input_shape)
    num_outputs = int(np.prod(ak_model.output_shape))
    names = tuple(class_names) if class_names else model_class_names(model_path, num_outputs)
    if len(names) != num_outputs:
        raise ModelError(
            f"{len(names)} class names given for a model with {num_outputs} outputs",
            "give one name per model output, in label order",
        )
    if height != width or channels != 3:
        raise ModelError(f"model input {height}x{width}x{channels} is not a square RGB image")
    if indices is not None:
        ds = ds.subset(indices)
    y_true = map_labels(ds, names)
    x = load_arrays(ds, height, progress=progress)
    y_pred = predict_akida(ak_model, x, batch_size=batch_size)
    result = classification_metrics(y_true, y_pred, names)
    result["model"] = {"path": str(model_path), "input_size": height, "classes": list(names)}
    return result
