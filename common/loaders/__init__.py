"""Load any supported dataset into a ``LesionDataset``: detect the format, then dispatch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.dataset import LesionDataset
from common.errors import ConfigError
from common.log import get_logger

from .detect import FORMATS, SYNTHETIC_KEYS, detect_format, is_synthetic, parse_synthetic
from .folders import load_folders
from .ham10000 import load_ham10000
from .isic import EXTRA_CLASS_MODES, load_isic
from .medmnist import load_npz

__all__ = [
    "EXTRA_CLASS_MODES",
    "FORMATS",
    "detect_format",
    "load_dataset",
    "load_folders",
    "load_ham10000",
    "load_isic",
    "load_npz",
    "load_synthetic",
    "parse_synthetic",
]

log = get_logger("data")


def load_synthetic(spec: str = "synthetic", **options: Any) -> LesionDataset:
    """Generate the synthetic dataset a ``synthetic[:key=value,...]`` spec describes.

    Parameters
    ----------
    spec : str (default: "synthetic")
        ``"synthetic"`` or e.g. ``"synthetic:n=300,size=32,sites=3,seed=1,mode=dermoscopy"``.
    **options
        The same keys as keyword arguments (``n``, ``size``, ``sites``, ``seed``, ``mode``);
        a key may be given in the spec or here, not both.

    Raises
    ------
    ConfigError
        If the spec or an option is invalid.
    """
    kwargs = parse_synthetic(spec)
    for key, value in options.items():
        if key not in SYNTHETIC_KEYS:
            raise ConfigError(
                f"unknown synthetic option {key!r}", f"use only {', '.join(SYNTHETIC_KEYS)}"
            )
        name, kind = SYNTHETIC_KEYS[key]
        if name in kwargs:
            raise ConfigError(f"synthetic option {key!r} is given twice", "give it once")
        try:
            kwargs[name] = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"synthetic option {key}={value!r} is not a valid {kind.__name__}",
                f"give {key} as a {kind.__name__}",
            ) from None
    from common.synthetic import make_synthetic

    return make_synthetic(**kwargs)


#: Format → loader and the keyword options it accepts.
_LOADERS: dict[str, tuple[Callable[..., LesionDataset], tuple[str, ...]]] = {
    "ham10000": (load_ham10000, ()),
    "isic": (load_isic, ("extra_classes",)),
    "npz": (load_npz, ()),
    "folders": (load_folders, ()),
    "synthetic": (load_synthetic, tuple(SYNTHETIC_KEYS)),
}


def load_dataset(path: str | Path, format: str | None = None, **options: Any) -> LesionDataset:
    """Load the dataset at ``path``, detecting its format unless ``format`` is given.

    Parameters
    ----------
    path : str | Path
        A dataset folder, a HAM10000 metadata CSV, an ISIC ground-truth CSV, a MedMNIST
        ``.npz`` file, or a ``synthetic[:key=value,...]`` spec.
    format : str | None (default: None)
        One of ``"ham10000"``, ``"isic"``, ``"npz"``, ``"folders"``, ``"synthetic"``;
        None detects it with ``detect_format``.
    **options
        Format-specific options: ``extra_classes`` for ``"isic"`` (see ``load_isic``);
        ``n``, ``size``, ``sites``, ``seed``, ``mode`` for ``"synthetic"``.

    Returns
    -------
    LesionDataset
        Images as file paths (decoded lazily by ``read_image``), or in memory for ``npz``
        and ``synthetic``.

    Raises
    ------
    ConfigError
        If ``format`` is unknown or an option does not apply to the format.
    DataError
        If the path matches no format or the data is malformed.
    """
    if format is not None and format not in _LOADERS:
        raise ConfigError(f"unknown dataset format {format!r}", f"use one of {', '.join(_LOADERS)}")
    fmt = format or detect_format(path)
    loader, accepted = _LOADERS[fmt]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"option(s) {', '.join(unknown)} do not apply to the {fmt!r} format",
            f"the {fmt!r} loader accepts {', '.join(accepted) or 'no options'}",
        )
    if fmt == "synthetic" and not is_synthetic(path):
        raise ConfigError(
            f"format 'synthetic' needs a synthetic spec, got path {str(path)!r}",
            f"use {FORMATS['synthetic']}",
        )
    ds = loader(str(path) if fmt == "synthetic" else Path(path), **options)
    log.info(
        "loaded %d images, %d lesions, %d classes (%s) from %s",
        len(ds),
        ds.num_lesions,
        ds.num_classes,
        fmt,
        ds.root or path,
    )
    return ds
