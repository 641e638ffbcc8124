"""Find and load HAM10000 lesion masks, cropped and resized exactly like their images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .dataset import LesionDataset
from .errors import DataError
from .log import get_logger
from .preprocess import RESAMPLE, centre_square

log = get_logger("masks")

#: Folder of the HAM10000 lesion segmentations (Tschandl et al.), beside the image folders.
MASK_DIR = "HAM10000_segmentations_lesion_tschandl"

#: Suffix of a mask file name after its image id.
MASK_SUFFIX = "_segmentation.png"

#: Skipped masks a warning names (the others are counted).
FIRST_NAMED = 5


def mask_dir(ds: LesionDataset) -> Path | None:
    """Return the mask folder of ``ds`` (``<root>/MASK_DIR``), or None when it has none.

    A file-backed dataset has masks when that folder exists beside its data: in its root
    folder, or beside its root file (a metadata CSV).
    """
    if ds.in_memory or not ds.root:
        return None
    root = Path(ds.root)
    base = root if root.is_dir() else root.parent
    folder = base / MASK_DIR
    return folder if folder.is_dir() else None


def mask_paths(ds: LesionDataset) -> np.ndarray:
    """Mask file path of each image of ``ds``, ``""`` where it has none.

    Masks are looked up as ``<root>/HAM10000_segmentations_lesion_tschandl/<image_id>
    _segmentation.png``; only the folder listing is read, no mask is opened.

    Parameters
    ----------
    ds : LesionDataset
        Any loaded dataset; in-memory datasets and datasets without the mask folder have none.

    Returns
    -------
    np.ndarray
        str array of ``len(ds)`` paths.
    """
    out = np.full(len(ds), "", dtype=object)
    folder = mask_dir(ds)
    if folder is not None:
        with os.scandir(folder) as entries:
            names = {e.name for e in entries if e.name.endswith(MASK_SUFFIX)}
        for i, image_id in enumerate(np.asarray(ds.image_ids).astype(str).tolist()):
            name = f"{image_id}{MASK_SUFFIX}"
            if name in names:
                out[i] = str(folder / name)
    return out.astype(str)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Crop a 2-d mask to its centred square, resize it to ``size`` and threshold at 0.5.

    The crop box and the resampling filter are those of :func:`common.preprocess.resize_crop`,
    so a mask stays aligned with its image; the resampled 0–1 values are thresholded at 0.5.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == (size, size):
        return mask.copy()
    img = Image.fromarray(mask.astype(np.float32))  # mode "F"
    box = centre_square(*img.size)
    return np.asarray(img.crop(box).resize((size, size), RESAMPLE)) >= 0.5


def _image_size(ds: LesionDataset, i: int) -> tuple[int, int]:
    """``(width, height)`` of image ``i`` (header only for files)."""
    if ds.in_memory:
        h, w = ds.images[i].shape[:2]
        return int(w), int(h)
    with Image.open(ds.images[i]) as img:
        return img.size


def _read_mask(path: str) -> np.ndarray:
    """Decode a mask PNG into a bool ``(H, W)`` array (non-zero is lesion)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L")) > 0


def load_masks(
    ds: LesionDataset, size: int, indices: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return the lesion masks of ``ds`` as bool ``(N, size, size)``, aligned with its images.

    Each mask is centre-cropped and resized like :func:`common.preprocess.load_arrays` crops
    its image. A mask whose size differs from its image's, or that cannot be decoded, is never
    used: it is counted and skipped with a warning naming the first few. Images without a mask
    file are counted.

    Parameters
    ----------
    ds : LesionDataset
        Any loaded dataset (see :func:`mask_paths`).
    size : int
        Output side in pixels (the model input size).
    indices : np.ndarray | None (default: None)
        Which images, in that order; all of them when None.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``masks`` bool ``(N, size, size)`` (all False where absent) and ``present`` bool
        ``(N,)``: whether image k has a usable mask.

    Raises
    ------
    DataError
        If ``size`` is not positive or an index is out of range.
    """
    if size < 1:
        raise DataError(f"mask size must be a positive number of pixels, got {size}",
                        "pass the model input size, e.g. 224")
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(ds)):
        raise DataError(
            f"indices span {idx.min()}..{idx.max()} but the dataset has {len(ds)} images",
            "pass indices into this dataset",
        )
    paths = mask_paths(ds)
    masks = np.zeros((len(idx), size, size), dtype=bool)
    present = np.zeros(len(idx), dtype=bool)
    missing = 0
    skipped: list[str] = []
    for k, i in enumerate(idx.tolist()):
        path = paths[i]
        if not path:
            missing += 1
            continue
        try:
            mask = _read_mask(path)
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            skipped.append(f"{ds.image_ids[i]} (unreadable: {err})")
            continue
        image_size = _image_size(ds, i)
        if (mask.shape[1], mask.shape[0]) != image_size:
            skipped.append(f"{ds.image_ids[i]} (mask {mask.shape[1]}x{mask.shape[0]}, "
                           f"image {image_size[0]}x{image_size[1]})")
            continue
        masks[k] = resize_mask(mask, size)
        present[k] = True
    if skipped:
        log.warning(
            "%d of %d masks skipped (wrong size or unreadable), e.g. %s; re-export them at "
            "their images' size from %s",
            len(skipped), len(idx), "; ".join(skipped[:FIRST_NAMED]), mask_dir(ds),
        )
    if missing:
        log.info("%d of %d images have no mask file", missing, len(idx))
    return masks, present
