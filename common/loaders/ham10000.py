"""Load HAM10000 in its official layout: a metadata CSV beside one or two image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.classes import HAM_CLASSES, to_ham
from common.dataset import LesionDataset
from common.errors import DataError
from common.log import get_logger

from ._files import index_images, read_csv, report_missing, strip_image_suffix

log = get_logger("data")

#: The metadata file name of the official release.
METADATA_CSV = "HAM10000_metadata.csv"

#: Image folders searched, in order (the official release splits images into two parts).
IMAGE_DIRS: tuple[str, ...] = (
    "HAM10000_images_part_1",
    "HAM10000_images_part_2",
    "HAM10000_images",
)

#: Columns that must be present in the metadata CSV.
REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx")

#: Column naming the source site; older copies lack it and every site is then ``"unknown"``.
SITE_COLUMN = "dataset"


def find_metadata(path: str | Path) -> Path | None:
    """Return the HAM10000 metadata CSV for ``path`` (the folder or the CSV), or None."""
    p = Path(path)
    if p.is_file():
        return p if p.name == METADATA_CSV else None
    candidate = p / METADATA_CSV
    return candidate if candidate.is_file() else None


def load_ham10000(path: str | Path) -> LesionDataset:
    """Load HAM10000 from its folder (or its ``HAM10000_metadata.csv``), without decoding images.

    Images are looked up in ``HAM10000_images_part_1/``, ``HAM10000_images_part_2/`` and
    ``HAM10000_images/`` beside the CSV; ``image_id`` may carry a ``.jpg`` suffix or not.
    Columns other than ``lesion_id``, ``image_id``, ``dx`` and ``dataset`` go to the metadata.

    Parameters
    ----------
    path : str | Path
        The dataset folder or its metadata CSV.

    Returns
    -------
    LesionDataset
        Format ``"ham10000"``, classes ``HAM_CLASSES``, sites from the ``dataset`` column
        (``"unknown"`` when the column is absent), images as file paths.

    Raises
    ------
    DataError
        If the CSV is absent, lacks a required column, has an unknown ``dx``, an empty
        ``lesion_id`` or a duplicated ``image_id``, or if none of the listed images exists.
        Listed images that are absent are skipped with a warning naming a few.
    """
    csv_path = find_metadata(path)
    if csv_path is None:
        raise DataError(
            f"no {METADATA_CSV} found at {str(path)!r}",
            f"point at the HAM10000 folder holding {METADATA_CSV} and {IMAGE_DIRS[0]}/",
        )
    root = csv_path.parent
    header, rows = read_csv(csv_path, REQUIRED_COLUMNS)
    has_site = SITE_COLUMN in header
    if not has_site:
        log.info("%s has no %r column; every site is 'unknown'", csv_path, SITE_COLUMN)
    extra = [c for c in header if c not in REQUIRED_COLUMNS and c != SITE_COLUMN]
    index = index_images(root / d for d in IMAGE_DIRS)
    label_of = {name: i for i, name in enumerate(HAM_CLASSES)}

    images: list[str] = []
    labels: list[int] = []
    lesions: list[str] = []
    sites: list[str] = []
    image_ids: list[str] = []
    metadata: list[dict[str, str]] = []
    missing: list[str] = []
    seen: set[str] = set()
    for line, row in rows:
        image_id = strip_image_suffix(row["image_id"])
        if not image_id:
            raise DataError(f"{str(csv_path)!r} line {line} has an empty image_id", "fill it in")
        if image_id in seen:
            raise DataError(
                f"{str(csv_path)!r} line {line} repeats image_id {image_id!r}",
                "remove the duplicate row",
            )
        seen.add(image_id)
        if not row["lesion_id"]:
            raise DataError(
                f"{str(csv_path)!r} line {line} (image {image_id!r}) has an empty lesion_id",
                "fill in the lesion id; splits group images by lesion",
            )
        try:
            label = label_of[to_ham(row["dx"])]
        except DataError as err:
            raise DataError(
                f"{str(csv_path)!r} line {line} (image {image_id!r}) has unknown dx {row['dx']!r}",
                err.fix,
            ) from None
        file = index.get(image_id)
        if file is None:
            missing.append(image_id)
            continue
        images.append(str(file))
        labels.append(label)
        lesions.append(row["lesion_id"])
        sites.append((row[SITE_COLUMN] or "unknown") if has_site else "unknown")
        image_ids.append(image_id)
        metadata.append({c: row[c] for c in extra})

    report_missing(missing, len(rows), csv_path, f"{root} ({', '.join(IMAGE_DIRS)})")
    log.debug("loaded %d HAM10000 images from %s", len(images), root)
    return LesionDataset(
        images=tuple(images),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=HAM_CLASSES,
        lesion_ids=np.asarray(lesions, dtype=str),
        sites=np.asarray(sites, dtype=str),
        image_ids=np.asarray(image_ids, dtype=str),
        metadata=tuple(metadata),
        format="ham10000",
        root=str(root),
    )
