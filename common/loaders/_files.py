"""CSV reading and image-folder indexing shared by the CSV-based loaders."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from common.errors import DataError
from common.log import get_logger

log = get_logger("data")

#: File suffixes (lower case) accepted as images by every loader.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})

#: How many missing image ids a warning or error names.
_SHOWN = 5


#: A CSV data row with its 1-based line number in the file.
Row = tuple[int, dict[str, str]]


def read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[Row]]:
    """Read a CSV file with a header row, checking that the required columns exist.

    Parameters
    ----------
    path : Path
        The CSV file (UTF-8, an optional byte-order mark is ignored).
    required : Sequence[str]
        Column names that must be present in the header.

    Returns
    -------
    tuple[list[str], list[Row]]
        The column names, and each data row with its 1-based line number in the file.

    Raises
    ------
    DataError
        If the file cannot be read, has no header, lacks a required column, has no data rows,
        or has a row whose field count differs from the header's.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [name.strip() for name in next(reader, [])]
            rows: list[Row] = []
            for fields in reader:
                if not fields or all(not f.strip() for f in fields):
                    continue
                if len(fields) != len(header):
                    raise DataError(
                        f"{str(path)!r} line {reader.line_num} has {len(fields)} fields but the "
                        f"header has {len(header)} ({', '.join(header)})",
                        "fix or remove that line so every row matches the header",
                    )
                rows.append(
                    (reader.line_num, {k: v.strip() for k, v in zip(header, fields, strict=True)})
                )
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(
            f"cannot read CSV file {str(path)!r} ({err})", "check that it is a UTF-8 CSV file"
        ) from err
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{str(path)!r} is missing column(s) {', '.join(missing)}; "
            f"found columns: {', '.join(header) if header else '(none)'}",
            f"the file needs the columns {', '.join(required)} in its header row",
        )
    if not rows:
        raise DataError(f"{str(path)!r} has a header but no data rows", "check the file")
    return header, rows


def index_images(folders: Iterable[Path]) -> dict[str, Path]:
    """Map image id (file name without suffix) to path for the image files in ``folders``.

    Folders that do not exist are ignored; when an id occurs twice, the first folder wins.
    Only the directory listing is read, no image is opened.
    """
    index: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                if suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                    index.setdefault(stem, Path(entry.path))
    return index


def strip_image_suffix(image_id: str) -> str:
    """Return an image id without a trailing image suffix (``ISIC_1.jpg`` → ``ISIC_1``)."""
    stem, suffix = os.path.splitext(image_id)
    return stem if suffix.lower() in IMAGE_SUFFIXES else image_id


def report_missing(missing: Sequence[str], total: int, source: Path, where: str) -> None:
    """Warn that listed images are absent (they are skipped); raise when all of them are.

    Parameters
    ----------
    missing : Sequence[str]
        Image ids listed in ``source`` with no image file.
    total : int
        How many images ``source`` lists.
    source : Path
        The listing file (metadata or ground-truth CSV).
    where : str
        Human description of where the images were looked for.

    Raises
    ------
    DataError
        If none of the listed images exists.
    """
    if not missing:
        return
    shown = ", ".join(missing[:_SHOWN]) + (", ..." if len(missing) > _SHOWN else "")
    if len(missing) == total:
        raise DataError(
            f"none of the {total} images listed in {str(source)!r} exists in {where} "
            f"(e.g. {shown})",
            "put the image files in that folder, or point at the right dataset folder",
        )
    log.warning(
        "%d of %d images listed in %s are missing from %s and are skipped: %s",
        len(missing),
        total,
        source,
        where,
        shown,
    )
