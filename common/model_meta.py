"""The metadata file beside every saved model: classes, input size and preprocessing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .colour import check_colour
from .errors import ConfigError, ModelError

#: Suffix added to a model's file name: ``model.fbz`` -> ``model.fbz.meta.json``.
META_SUFFIX = ".meta.json"

#: Version of the metadata layout.
META_VERSION = 1


def meta_path(model_path: str | Path) -> Path:
    """Return the metadata file of ``model_path``."""
    p = Path(model_path)
    return p.with_name(p.name + META_SUFFIX)


def model_meta(
    *, variant: str, size: int, class_names: Any, colour: str = "none", tta: int = 1, **extra: Any
) -> dict[str, Any]:
    """Build the metadata record of a model (what scoring it needs to preprocess alike)."""
    return {
        "version": META_VERSION,
        "variant": variant,
        "input_size": int(size),
        "class_names": list(class_names),
        "preprocessing": {
            "resize": "shorter side to input_size (bicubic, antialiased), centre crop",
            "pixels": "raw uint8 0-255",
            "colour_constancy": check_colour(colour),
        },
        "tta": int(tta),
        **extra,
    }


def write_meta(model_path: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``meta`` beside ``model_path`` atomically; return the metadata path."""
    from .atomic import atomic_write_text

    path = meta_path(model_path)
    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")
    return path


def read_meta(model_path: str | Path) -> dict[str, Any] | None:
    """Return the metadata beside ``model_path``, or None when there is none.

    Raises
    ------
    ModelError
        When the file exists but is not valid metadata.
    """
    path = meta_path(model_path)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        check_colour(meta["preprocessing"]["colour_constancy"])
        _ = meta["class_names"], int(meta["input_size"])
    except (ValueError, KeyError, TypeError, ConfigError) as err:
        raise ModelError(
            f"{path} is not a qanafed model metadata file ({err})",
            "restore it from the run that wrote the model, or delete it and pass --classes "
            "and --colour explicitly",
        ) from err
    return meta


def resolve_colour(model_path: str | Path, requested: str | None) -> tuple[str, str]:
    """Return ``(colour, source)``: the recorded colour constancy, checked against a request.

    Raises
    ------
    ConfigError
        ``requested`` differs from what the model records (scoring it would be wrong).
    """
    meta = read_meta(model_path)
    recorded = meta["preprocessing"]["colour_constancy"] if meta else None
    if requested is not None:
        check_colour(requested)
        if recorded is not None and requested != recorded:
            raise ConfigError(
                f"--colour {requested} differs from the colour constancy {recorded!r} that "
                f"{model_path} was trained with ({meta_path(model_path)})",
                f"drop --colour (the model's own setting is used), or pass --colour {recorded}",
            )
        return requested, "option" if recorded is None else "metadata"
    if recorded is not None:
        return recorded, "metadata"
    return "none", "default (no metadata file beside the model)"
