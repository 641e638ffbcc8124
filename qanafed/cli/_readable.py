"""Find, report and leave out the images a command cannot decode (``data split``, ``evaluate``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from common.dataset import LesionDataset

#: How many unreadable files a message names.
SHOWN = 3


def unreadable(ds: LesionDataset) -> list[tuple[int, str, str]]:
    """List ``(index, image_id, detail)`` of the images of ``ds`` that do not decode."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress

    from common.quality import find_unreadable
    from qanafed.cli._common import console

    if ds.in_memory:
        return []
    with Progress("{task.description}", BarColumn(), MofNCompleteColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("checking files", total=len(ds))
        return find_unreadable(ds, progress=lambda done, _n: bar.update(task, completed=done))


def describe(bad: list[tuple[int, str, str]]) -> str:
    """Name the first unreadable files: ``'a.jpg: reason; b.jpg: reason (and 3 more)'``."""
    shown = "; ".join(detail for _, _, detail in bad[:SHOWN])
    return shown + (f" (and {len(bad) - SHOWN} more)" if len(bad) > SHOWN else "")


def refuse_if_strict(bad: list[tuple[int, str, str]], strict: bool) -> None:
    """Under ``--strict`` stop at the first unreadable files, naming them."""
    from common.errors import DataError

    if bad and strict:
        raise DataError(
            f"{len(bad)} image file(s) cannot be decoded: {describe(bad)}",
            "re-export or remove those files, or drop --strict to skip and count them",
        )


def scoring_indices(
    ds: LesionDataset, split: Path | None, part: str, *, strict: bool = False
) -> tuple[np.ndarray | None, list[tuple[int, str, str]]]:
    """Choose the indices of ``ds`` to score (``--split``/``--part``), unreadable images left out.

    A split file made on the whole dataset or on its readable images (``qanafed data split``
    leaves unreadable files out) both load.

    Returns
    -------
    tuple[np.ndarray | None, list[tuple[int, str, str]]]
        The indices (None: every image, none unreadable) and the unreadable images skipped.

    Raises
    ------
    ConfigError
        ``--part`` is not train, val or test.
    DataError
        Unreadable images under ``strict``, or a split file of another dataset.
    """
    import numpy as np

    from common.errors import ConfigError, DataError

    if split is not None and part not in ("train", "val", "test"):
        raise ConfigError(f"--part {part!r} is not a split part", "use train, val or test")
    bad = unreadable(ds)
    refuse_if_strict(bad, strict)
    bad_idx = np.asarray([i for i, _, _ in bad], dtype=np.int64)
    readable = np.setdiff1d(np.arange(len(ds)), bad_idx)
    if split is None:
        return (readable if bad else None), bad
    from common.splits import Split

    try:
        indices = getattr(Split.load(split, ds), part)
    except DataError:
        if not bad:
            raise
        indices = readable[getattr(Split.load(split, ds.subset(readable)), part)]
    skipped = [b for b in bad if b[0] in set(indices.tolist())]
    return np.setdiff1d(indices, bad_idx), skipped
