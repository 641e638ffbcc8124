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

log = get_logger("evaluate")


def model_class_names(model_path: str | Path, num_outputs: int) -> tuple[str, ...]:
    """Class names of a saved model: from its ``.meta.json`` or the ``metrics.json`` beside it.

    HAM10000's 7 classes are assumed only when neither exists and the model has 7 outputs.

    Raises
    ------
    ModelError
        When no sidecar names the classes and the output count is not 7.
    """
    from .model_meta import read_meta

    meta = read_meta(model_path)
    if meta is not None:
        names = tuple(meta["class_names"])
        if len(names) != num_outputs:
            raise ModelError(
                f"the metadata beside {model_path} lists {len(names)} classes but the model "
                f"has {num_outputs} outputs",
                "use the .meta.json written with this model",
            )
        return names
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
    tta: int | None = None,
    colour: str | None = None,
    n_boot: int = 1000,
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
    tta : int | None (default: None)
        Test-time augmentation views averaged (1 = none; see :mod:`common.tta`); None takes
        the count the model was scored with in training (its ``.meta.json``), else 1.
    colour : str | None (default: None)
        Colour constancy; None takes the model's recorded setting (``.meta.json``). A
        setting that contradicts the record is refused.
    n_boot : int (default: 1000)
        Bootstrap resamples (over lesions) of the 95 % intervals.

    Returns
    -------
    dict[str, Any]
        The keys of ``metrics.json`` results (``accuracy``, ``balanced_accuracy``,
        ``macro_f1``, ``per_class``, ``confusion_matrix``, ``num_examples`` and the clinical
        keys of :func:`common.clinical.clinical_metrics`), plus ``model``, ``preprocessing``
        and ``tta``.
    """
    from .clinical import subgroups_from_metadata
    from .convert import load_akida
    from .model_meta import read_meta, resolve_colour
    from .preprocess import load_arrays
    from .train import score_logits
    from .tta import check_tta

    if tta is None:
        meta = read_meta(model_path)
        tta = int(meta.get("tta", 1)) if meta else 1
    check_tta(tta)
    colour, colour_source = resolve_colour(model_path, colour)
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
    x = load_arrays(ds, height, progress=progress, colour=colour)
    result = score_logits(
        ak_model, x, y_true, names, tta,
        lesion_ids=ds.lesion_ids, subgroups=subgroups_from_metadata(ds.sites, ds.metadata),
        n_boot=n_boot,
    )
    result["model"] = {"path": str(model_path), "input_size": height, "classes": list(names)}
    result["preprocessing"] = {"colour_constancy": colour, "source": colour_source}
    return result
