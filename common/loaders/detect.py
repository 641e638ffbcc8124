"""Recognise a dataset's format from its path, and parse ``synthetic:key=value`` specs."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

from common.errors import ConfigError, DataError

from .folders import class_folders
from .ham10000 import IMAGE_DIRS, METADATA_CSV, find_metadata
from .isic import GROUND_TRUTH_SUFFIX, INPUT_SUFFIX, find_ground_truth

#: Every format ``detect_format`` can return, with what it expects to find.
FORMATS: dict[str, str] = {
    "ham10000": f"a folder holding {METADATA_CSV} and {IMAGE_DIRS[0]}/ (and/or "
    f"{IMAGE_DIRS[1]}/), or that CSV itself",
    "isic": f"a folder holding <name>{GROUND_TRUTH_SUFFIX} and <name>{INPUT_SUFFIX}/ "
    "(optionally <name>_Metadata.csv), or that CSV itself",
    "npz": "a MedMNIST .npz file (train_images, train_labels, val_..., test_...)",
    "folders": "a folder with one sub-folder of .jpg/.jpeg/.png images per class (2 or more)",
    "synthetic": "the text 'synthetic' or 'synthetic:n=600,size=64,sites=3,seed=0,"
    "mode=dermoscopy' (any subset of those keys)",
}

#: ``synthetic:`` spec keys → ``make_synthetic`` keyword and type.
SYNTHETIC_KEYS: dict[str, tuple[str, type]] = {
    "n": ("n", int),
    "size": ("size", int),
    "sites": ("num_sites", int),
    "seed": ("seed", int),
    "mode": ("mode", str),
}


def is_synthetic(path: str | Path) -> bool:
    """Whether ``path`` is a synthetic dataset spec rather than a file system path."""
    text = str(path)
    return text == "synthetic" or text.startswith("synthetic:")


def parse_synthetic(spec: str) -> dict[str, int | str]:
    """Parse ``synthetic[:key=value,...]`` into ``make_synthetic`` keyword arguments.

    Keys are ``n``, ``size``, ``sites`` (→ ``num_sites``), ``seed`` and ``mode``; omitted keys
    keep ``make_synthetic``'s defaults.

    Raises
    ------
    ConfigError
        If the spec does not start with ``synthetic``, an item is not ``key=value``, a key
        is unknown or repeated, or an integer key has a non-integer value.
    """
    if not is_synthetic(spec):
        raise ConfigError(
            f"{spec!r} is not a synthetic dataset spec", f"use {FORMATS['synthetic']}"
        )
    body = spec[len("synthetic:") :] if spec.startswith("synthetic:") else ""
    kwargs: dict[str, int | str] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not value:
            raise ConfigError(
                f"synthetic spec item {item!r} in {spec!r} is not key=value",
                f"use {FORMATS['synthetic']}",
            )
        if key not in SYNTHETIC_KEYS:
            raise ConfigError(
                f"unknown synthetic spec key {key!r} in {spec!r}",
                f"use only the keys {', '.join(SYNTHETIC_KEYS)}",
            )
        name, kind = SYNTHETIC_KEYS[key]
        if name in kwargs:
            raise ConfigError(f"synthetic spec key {key!r} repeats in {spec!r}", "give it once")
        try:
            kwargs[name] = kind(value)
        except ValueError:
            raise ConfigError(
                f"synthetic spec {key}={value!r} in {spec!r} is not an integer",
                f"give {key} as a whole number",
            ) from None
    return kwargs


def detect_format(path: str | Path) -> str:
    """Return the format of the dataset at ``path``.

    Parameters
    ----------
    path : str | Path
        A dataset folder, a HAM10000 metadata CSV, an ISIC ground-truth CSV, a ``.npz`` file,
        or a ``synthetic[:...]`` spec.

    Returns
    -------
    str
        One of ``"ham10000"``, ``"isic"``, ``"npz"``, ``"folders"``, ``"synthetic"``.

    Raises
    ------
    DataError
        If ``path`` does not exist or matches no format; the message lists what each format
        expects.
    """
    if is_synthetic(path):
        return "synthetic"
    p = Path(path)
    if not p.exists():
        _fail(f"dataset path {str(p)!r} does not exist")
    if p.is_file() and p.suffix.lower() == ".npz":
        return "npz"
    if find_metadata(p) is not None:
        return "ham10000"
    if find_ground_truth(p) is not None:
        return "isic"
    if p.is_dir():
        tree = {name: files for name, files in class_folders(p).items() if files}
        lookalike = [n for n in tree if n.startswith("HAM10000_images") or n.endswith(INPUT_SUFFIX)]
        if lookalike:
            _fail(
                f"{str(p)!r} holds {', '.join(lookalike)}/ but no {METADATA_CSV} or "
                f"*{GROUND_TRUTH_SUFFIX} describing it"
            )
        if len(tree) >= 2:
            return "folders"
    _fail(f"{str(p)!r} matches no known dataset format")


def _fail(problem: str) -> NoReturn:
    """Raise a DataError listing what every format expects."""
    expected = "; ".join(f"{name}: {what}" for name, what in FORMATS.items())
    raise DataError(problem, f"give one of — {expected}")
