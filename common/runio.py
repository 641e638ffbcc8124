"""Reload what ``qanafed model train`` wrote: the float and quantized Keras models and metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from common.errors import ModelError

#: Files a ``qanafed model train`` output folder holds.
FLOAT_FILE = "float.h5"
QUANTIZED_FILE = "quantized.h5"
METRICS_FILE = "metrics.json"
AKIDA_FILE = "model.fbz"
RUN_FILES = (FLOAT_FILE, QUANTIZED_FILE, METRICS_FILE, AKIDA_FILE)

_RETRAIN = "re-run `qanafed model train --out <folder>`, which writes them"


class RunSummary(BaseModel):
    """The fields of a run's ``metrics.json`` that reloading relies on (others are kept)."""

    model_config = ConfigDict(extra="allow")

    variant: str | None = None
    size: PositiveInt
    class_names: list[str] = Field(min_length=2)


class LoadedRun(NamedTuple):
    """A reloaded training run; unpacks as ``float_model, quantized_model, metrics``."""

    float_model: Any
    quantized_model: Any
    metrics: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        """Class names in label order."""
        return list(self.metrics["class_names"])

    @property
    def size(self) -> int:
        """Input side in pixels the models were trained at."""
        return int(self.metrics["size"])


def custom_objects() -> dict[str, Any]:
    """Project Keras objects a saved float model may contain (legacy .h5 names them by class)."""
    from common.models import GhostFold, SpikeReLU
    from common.pact import MinValue, PACTReLU

    return {"GhostFold": GhostFold, "SpikeReLU": SpikeReLU, "MinValue": MinValue,
            "PACTReLU": PACTReLU}


def _check_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a folder" if run_dir.exists() else "does not exist"
        raise ModelError(f"run folder {run_dir} {what}",
                         "pass the --out folder of `qanafed model train`")
    return run_dir


def load_keras_models(run_dir: str | Path) -> tuple[Any, Any]:
    """Load the float and the quantized Keras model of a training run.

    Parameters
    ----------
    run_dir : str | Path
        Output folder of ``qanafed model train`` (holds ``float.h5`` and ``quantized.h5``).

    Returns
    -------
    tuple[tf_keras.Model, tf_keras.Model]
        ``(float_model, quantized_model)``, uncompiled.

    Raises
    ------
    ModelError
        The folder is missing, a model file is missing, or a file does not load.
    """
    run_dir = _check_dir(run_dir)
    missing = [name for name in (FLOAT_FILE, QUANTIZED_FILE) if not (run_dir / name).is_file()]
    if missing:
        raise ModelError(
            f"{run_dir} has no {' and no '.join(missing)}: the float and quantized Keras models "
            "are needed (an Akida model.fbz alone has no gradients and no float weights)",
            _RETRAIN,
        )
    import tf_keras as keras
    from quantizeml import load_model

    try:
        with keras.utils.custom_object_scope(custom_objects()):
            float_model = keras.models.load_model(run_dir / FLOAT_FILE, compile=False)
            quantized = load_model(str(run_dir / QUANTIZED_FILE), compile_model=False)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ModelError(f"cannot load the Keras models in {run_dir}: {err}", _RETRAIN) from err
    return float_model, quantized


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """Read and check a run's ``metrics.json`` (needs ``size`` and ``class_names``).

    Raises
    ------
    ModelError
        The folder is missing or is not a ``qanafed model train`` output folder.
    """
    run_dir = _check_dir(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        present = sorted(p.name for p in run_dir.iterdir())[:8]
        raise ModelError(
            f"{run_dir} is not a QANA training run: it has no {METRICS_FILE} "
            f"(it holds {present or 'nothing'})",
            "pass the --out folder of `qanafed model train`",
        )
    try:
        summary = RunSummary.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as err:
        raise ModelError(
            f"{path} is not a QANA training summary with size and class_names: {err}",
            "pass the --out folder of `qanafed model train`, or re-run it",
        ) from err
    return summary.model_dump()


def load_run(run_dir: str | Path) -> LoadedRun:
    """Load a training run: float and quantized Keras models and its ``metrics.json``.

    Parameters
    ----------
    run_dir : str | Path
        Output folder of ``qanafed model train``.

    Returns
    -------
    LoadedRun
        ``(float_model, quantized_model, metrics)``; ``metrics["class_names"]`` and
        ``metrics["size"]`` are checked (also as ``.class_names`` and ``.size``).

    Raises
    ------
    ModelError
        The folder is missing, is not a training run, or its Keras models are missing or
        unreadable.
    """
    metrics = load_summary(run_dir)
    float_model, quantized = load_keras_models(run_dir)
    return LoadedRun(float_model, quantized, metrics)
