"""Load MedMNIST ``.npz`` files (DermaMNIST and its siblings) into memory."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from common.classes import HAM_CLASSES
from common.dataset import LesionDataset
from common.errors import DataError
from common.log import get_logger

log = get_logger("data")

#: The official MedMNIST splits, in the order they are concatenated.
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: The keys a MedMNIST file holds.
EXPECTED_KEYS: tuple[str, ...] = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))


def load_npz(path: str | Path) -> LesionDataset:
    """Load a MedMNIST ``.npz`` file; the three official splits are concatenated.

    DermaMNIST's label order (akiec, bcc, bkl, df, mel, nv, vasc) is ``HAM_CLASSES``, so a
    file whose name contains ``derma`` or whose labels span 7 classes gets ``HAM_CLASSES``;
    any other file gets ``class_0``, ``class_1`` ... . MedMNIST has no lesion ids: every image
    is its own lesion (image id ``<split>_<index>``), every site is ``"unknown"``, and each
    image's official split is kept as ``metadata[i]["split"]``. Grayscale images
    ``(N, H, W)`` or ``(N, H, W, 1)`` are converted to RGB by repeating the channel.

    Parameters
    ----------
    path : str | Path
        The ``.npz`` file.

    Returns
    -------
    LesionDataset
        Format ``"npz"``, images in memory as uint8 ``(N, H, W, 3)``.

    Raises
    ------
    DataError
        If the file is unreadable, lacks the expected keys, or holds images that are not
        uint8 ``(N, H, W[, 1|3])`` of one size, or labels that are not one non-negative
        integer per image.
    """
    p = Path(path)
    try:
        archive = np.load(p, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(
            f"cannot read {str(p)!r} as a .npz file ({err})", "re-download the MedMNIST file"
        ) from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{str(p)!r} holds a single array, not a .npz archive of named arrays",
            f"use a MedMNIST file with the keys {', '.join(EXPECTED_KEYS)}",
        )
    with archive:
        found = sorted(archive.files)
        splits = [s for s in SPLITS if f"{s}_images" in found and f"{s}_labels" in found]
        if not splits:
            raise DataError(
                f"{str(p)!r} has keys {', '.join(found) or '(none)'}; expected "
                f"{', '.join(EXPECTED_KEYS)} (at least one <split>_images/<split>_labels pair)",
                "use a MedMNIST file such as dermamnist.npz",
            )
        parts = [_split_arrays(archive, s, p) for s in splits]

    shapes = {imgs.shape[1:3] for imgs, _ in parts}
    if len(shapes) > 1:
        raise DataError(
            f"{str(p)!r} splits have different image sizes {sorted(shapes)}",
            "every split must hold images of one size",
        )
    images = np.concatenate([imgs for imgs, _ in parts])
    labels = np.concatenate([lbls for _, lbls in parts])
    split_of = [s for s, (_, lbls) in zip(splits, parts, strict=True) for _ in range(len(lbls))]
    names = [
        f"{s}_{i:05d}" for s, (_, lbls) in zip(splits, parts, strict=True) for i in range(len(lbls))
    ]

    num_classes = int(labels.max()) + 1 if len(labels) else 0
    if num_classes == len(HAM_CLASSES) or ("derma" in p.name.lower() and num_classes <= 7):
        class_names = HAM_CLASSES
    else:
        class_names = tuple(f"class_{i}" for i in range(num_classes))
    log.info(
        "%s: %d images in splits %s; MedMNIST has no lesion ids, each image is its own lesion",
        p.name,
        len(labels),
        ", ".join(splits),
    )
    ids = np.asarray(names, dtype=str)
    return LesionDataset(
        images=images,
        labels=labels,
        class_names=class_names,
        lesion_ids=ids,
        sites=np.full(len(labels), "unknown"),
        image_ids=ids.copy(),
        metadata=tuple({"split": s} for s in split_of),
        format="npz",
        root=str(p),
    )


def _split_arrays(
    archive: np.lib.npyio.NpzFile, split: str, p: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Return one split's RGB uint8 images and int64 labels, checked."""
    images = archive[f"{split}_images"]
    labels = archive[f"{split}_labels"]
    if images.dtype != np.uint8:
        raise DataError(
            f"{str(p)!r} {split}_images has dtype {images.dtype}",
            "MedMNIST images must be uint8 0-255",
        )
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 3:
        log.info("%s %s_images are grayscale; repeating the channel to RGB", p.name, split)
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"{str(p)!r} {split}_images has shape {images.shape}",
            "images must be (N, H, W, 3) RGB or (N, H, W) grayscale",
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    integer = np.issubdtype(labels.dtype, np.integer)
    if labels.ndim != 1 or len(labels) != len(images) or not integer:
        raise DataError(
            f"{str(p)!r} {split}_labels has {labels.dtype} shape {labels.shape} for "
            f"{len(images)} images",
            "labels must be one integer class per image, shape (N,) or (N, 1) "
            "(multi-label files such as ChestMNIST are not supported)",
        )
    if len(labels) and labels.min() < 0:
        raise DataError(f"{str(p)!r} {split}_labels has negative labels", "labels must be >= 0")
    return images, labels.astype(np.int64)
