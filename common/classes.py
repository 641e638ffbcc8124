"""The HAM10000 7-class vocabulary and how other datasets' class names map onto it."""

from __future__ import annotations

from .errors import DataError

#: HAM10000 diagnosis codes in label-index order (alphabetical, as in DermaMNIST).
HAM_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

#: Class prior of HAM10000 (fraction of images), used by the synthetic generator.
HAM_PRIOR: dict[str, float] = {
    "nv": 0.67,
    "mel": 0.11,
    "bkl": 0.11,
    "bcc": 0.05,
    "akiec": 0.03,
    "vasc": 0.014,
    "df": 0.012,
}

#: Upper-case ISIC column names and aliases mapped onto the HAM10000 vocabulary.
ISIC_TO_HAM: dict[str, str] = {
    "MEL": "mel",
    "NV": "nv",
    "BCC": "bcc",
    "AKIEC": "akiec",
    "AK": "akiec",
    "BKL": "bkl",
    "DF": "df",
    "VASC": "vasc",
}

#: ISIC 2019 classes with no HAM10000 counterpart; loaders must handle them explicitly.
ISIC_EXTRA: tuple[str, ...] = ("SCC", "UNK")


def to_ham(name: str) -> str:
    """Map a class name (any case, ISIC or HAM spelling) onto the HAM10000 vocabulary.

    Raises
    ------
    DataError
        If the name has no HAM10000 counterpart.
    """
    key = name.strip()
    if key.lower() in HAM_CLASSES:
        return key.lower()
    if key.upper() in ISIC_TO_HAM:
        return ISIC_TO_HAM[key.upper()]
    raise DataError(
        f"unknown class label {name!r}",
        f"use one of {', '.join(HAM_CLASSES)} (or the ISIC names "
        f"{', '.join(sorted(ISIC_TO_HAM))})",
    )
