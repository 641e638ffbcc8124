"""Load ISIC challenge data: a one-hot ground-truth CSV, an image folder, optional metadata.

ISIC 2018 Task 3 (MEL, NV, BCC, AKIEC, BKL, DF, VASC) and ISIC 2019 (MEL, NV, BCC, AK, BKL,
DF, VASC, SCC, UNK) are mapped onto the HAM10000 vocabulary with ``to_ham`` (AK → akiec).
SCC and UNK have no HAM10000 counterpart and are handled as ``extra_classes`` says.

Lesion ids and sites come from ``<name>_Metadata.csv`` when it exists: the lesion id is its
``lesion_id`` (the image id when empty) and the site is the lesion id's prefix before the first
``_`` (``BCN_0000123`` → ``BCN``, ``HAM_0000456`` → ``HAM``, ``MSK4_0000789`` → ``MSK4``), or
``"unknown"`` when the lesion id is empty or has no ``_``. Without metadata every image is its
own lesion and every site is ``"unknown"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.classes import HAM_CLASSES, ISIC_EXTRA, ISIC_TO_HAM
from common.dataset import LesionDataset
from common.errors import ConfigError, DataError
from common.log import get_logger

from ._files import index_images, read_csv, report_missing, strip_image_suffix

log = get_logger("data")

GROUND_TRUTH_SUFFIX = "_GroundTruth.csv"
INPUT_SUFFIX = "_Input"
METADATA_SUFFIX = "_Metadata.csv"

#: Ground-truth columns that are not classes (ISIC 2019 test ground truth); kept as metadata.
NON_CLASS_COLUMNS: tuple[str, ...] = ("score_weight",)

#: What to do with images labelled SCC or UNK.
EXTRA_CLASS_MODES: tuple[str, ...] = ("error", "drop", "keep")


def find_ground_truth(path: str | Path) -> Path | None:
    """Return the ground-truth CSV for ``path`` (the folder or the CSV), or None.

    Raises
    ------
    DataError
        If the folder holds several ground-truth CSVs (the user must pick one).
    """
    p = Path(path)
    if p.is_file():
        return p if p.name.endswith(GROUND_TRUTH_SUFFIX) else None
    if not p.is_dir():
        return None
    found = sorted(p.glob(f"*{GROUND_TRUTH_SUFFIX}"))
    if len(found) > 1:
        raise DataError(
            f"{str(p)!r} holds several ISIC ground-truth files: {', '.join(f.name for f in found)}",
            "pass the path of the one ground-truth CSV you want to load",
        )
    return found[0] if found else None


def load_isic(path: str | Path, extra_classes: str = "error") -> LesionDataset:
    """Load an ISIC ground-truth CSV and its ``<name>_Input/`` folder, without decoding images.

    Parameters
    ----------
    path : str | Path
        The folder holding ``<name>_GroundTruth.csv``, or that CSV itself.
    extra_classes : str (default: "error")
        How to treat images labelled SCC or UNK, which have no HAM10000 class:
        ``"error"`` raises a DataError naming the counts and these options (the default, so
        that nothing is dropped or relabelled silently); ``"drop"`` skips those images and
        warns with the count; ``"keep"`` appends ``"scc"``/``"unk"`` (for each such column
        the CSV has, whether or not any image carries it) after ``HAM_CLASSES``.
        Files without any SCC/UNK image load the same under every mode except that
        ``"keep"`` still widens the vocabulary.

    Returns
    -------
    LesionDataset
        Format ``"isic"``; images as file paths; the metadata CSV's other columns
        (``age_approx``, ``anatom_site_general``, ``sex`` ...) and the ground truth's
        ``score_weight`` (ISIC 2019 test) as per-image metadata.

    Raises
    ------
    ConfigError
        If ``extra_classes`` is not one of ``EXTRA_CLASS_MODES``.
    DataError
        If the CSV or image folder is absent, a class column is unknown, a row is not
        one-hot (zero or several 1s, or a value other than 0/1), an image repeats, SCC/UNK
        images exist under ``"error"``, or none of the listed images exists. Listed images
        that are absent are skipped with a warning naming a few.
    """
    if extra_classes not in EXTRA_CLASS_MODES:
        raise ConfigError(
            f"extra_classes={extra_classes!r} is not understood",
            f"use one of {', '.join(EXTRA_CLASS_MODES)}",
        )
    gt_path = find_ground_truth(path)
    if gt_path is None:
        raise DataError(
            f"no *{GROUND_TRUTH_SUFFIX} file found at {str(path)!r}",
            f"point at the ISIC folder holding <name>{GROUND_TRUTH_SUFFIX} and "
            f"<name>{INPUT_SUFFIX}/, or at the CSV itself",
        )
    name = gt_path.name[: -len(GROUND_TRUTH_SUFFIX)]
    root = gt_path.parent
    input_dir = root / f"{name}{INPUT_SUFFIX}"
    if not input_dir.is_dir():
        raise DataError(
            f"image folder {str(input_dir)!r} for {gt_path.name} does not exist",
            f"unpack the ISIC images into {input_dir.name}/ beside the ground-truth CSV",
        )

    header, rows = read_csv(gt_path, ("image",))
    info_columns = [c for c in header if c in NON_CLASS_COLUMNS]
    columns = [c for c in header if c != "image" and c not in NON_CLASS_COLUMNS]
    unknown = [c for c in columns if c.upper() not in ISIC_TO_HAM and c.upper() not in ISIC_EXTRA]
    if unknown or not columns:
        raise DataError(
            f"{str(gt_path)!r} has unknown class column(s) {', '.join(unknown) or '(none)'}; "
            f"found columns: {', '.join(header)}",
            f"class columns must be among {', '.join([*ISIC_TO_HAM, *ISIC_EXTRA])}",
        )
    extras = [c.lower() for c in columns if c.upper() in ISIC_EXTRA]
    class_names = HAM_CLASSES + (tuple(extras) if extra_classes == "keep" else ())
    label_of = {n: i for i, n in enumerate(class_names)}
    column_class = {
        c: ISIC_TO_HAM[c.upper()] if c.upper() in ISIC_TO_HAM else c.lower() for c in columns
    }

    meta = _read_metadata(root / f"{name}{METADATA_SUFFIX}")
    index = index_images([input_dir])

    images: list[str] = []
    labels: list[int] = []
    lesions: list[str] = []
    sites: list[str] = []
    image_ids: list[str] = []
    metadata: list[dict[str, str]] = []
    missing: list[str] = []
    extra_seen: dict[str, int] = {}
    seen: set[str] = set()
    for line, row in rows:
        image_id = strip_image_suffix(row["image"])
        if not image_id or image_id in seen:
            raise DataError(
                f"{str(gt_path)!r} line {line} has an empty or repeated image {row['image']!r}",
                "every row must name a distinct image",
            )
        seen.add(image_id)
        cls = column_class[_one_hot(row, columns, gt_path, image_id)]
        if cls not in HAM_CLASSES:
            extra_seen[cls] = extra_seen.get(cls, 0) + 1
            if extra_classes != "keep":
                continue
        file = index.get(image_id)
        if file is None:
            missing.append(image_id)
            continue
        info = dict(meta.get(image_id, {})) | {c: row[c] for c in info_columns}
        lesion = info.pop("lesion_id", "") or image_id
        images.append(str(file))
        labels.append(label_of[cls])
        lesions.append(lesion)
        sites.append(lesion.split("_", 1)[0] if lesion != image_id and "_" in lesion else "unknown")
        image_ids.append(image_id)
        metadata.append(info)

    if extra_seen:
        counts = ", ".join(f"{n} {c.upper()}" for c, n in sorted(extra_seen.items()))
        if extra_classes == "error":
            raise DataError(
                f"{str(gt_path)!r} has images labelled {counts}, which have no HAM10000 class",
                "pass extra_classes='drop' (CLI: --extra-classes drop) to skip them, or "
                "extra_classes='keep' (--extra-classes keep) to add 'scc'/'unk' classes",
            )
        if extra_classes == "drop":
            log.warning("dropped %s images from %s (extra_classes='drop')", counts, gt_path)
    listed = len(rows) - (sum(extra_seen.values()) if extra_classes == "drop" else 0)
    report_missing(missing, listed, gt_path, f"{input_dir}")
    if not meta:
        log.info("no %s%s: each image is its own lesion, site 'unknown'", name, METADATA_SUFFIX)
    return LesionDataset(
        images=tuple(images),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=class_names,
        lesion_ids=np.asarray(lesions, dtype=str),
        sites=np.asarray(sites, dtype=str),
        image_ids=np.asarray(image_ids, dtype=str),
        metadata=tuple(metadata),
        format="isic",
        root=str(root),
    )


def _one_hot(row: dict[str, str], columns: list[str], gt_path: Path, image_id: str) -> str:
    """Return the one class column set to 1 in ``row``."""
    hot: list[str] = []
    for c in columns:
        try:
            value = float(row[c])
        except ValueError:
            value = float("nan")
        if value not in (0.0, 1.0):
            raise DataError(
                f"{str(gt_path)!r} image {image_id!r} has {c}={row[c]!r}",
                "ground-truth class columns must hold 0 or 1",
            )
        if value == 1.0:
            hot.append(c)
    if len(hot) != 1:
        raise DataError(
            f"{str(gt_path)!r} image {image_id!r} has {len(hot)} classes set to 1 "
            f"({', '.join(hot) or 'none'})",
            "each ground-truth row must set exactly one class column to 1",
        )
    return hot[0]


def _read_metadata(path: Path) -> dict[str, dict[str, str]]:
    """Read ``<name>_Metadata.csv`` into image id → its other columns; empty when absent."""
    if not path.is_file():
        return {}
    header, rows = read_csv(path, ("image",))
    return {
        strip_image_suffix(row["image"]): {c: row[c] for c in header if c != "image"}
        for _, row in rows
    }
