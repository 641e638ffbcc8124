"""Decode, resize and centre-crop images into uint8 arrays; guard the 0-255 pixel range."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from .colour import apply_colour, check_colour
from .dataset import LesionDataset
from .errors import DataError
from .log import get_logger

log = get_logger("preprocess")

#: Resampling filter for every resize (antialiased when shrinking; tf's "bicubic" matches it).
RESAMPLE = Image.Resampling.BICUBIC


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    """Return the ``(left, top, right, bottom)`` box of the centred square of an image.

    Cropping this box and resizing it to ``size x size`` equals resizing the shorter side
    to ``size`` and then centre-cropping, with a single resampling. ``make_file_dataset`` uses the
    same integer offsets so both loaders crop identically.
    """
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def resize_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB image's shorter side to ``size``, centre-crop; uint8 ``(size, size, 3)``."""
    box = centre_square(*img.size)
    if img.size == (size, size):
        return np.array(img, dtype=np.uint8)
    # Crop first: a resize with ``box=`` would let the filter read pixels outside the square.
    return np.asarray(img.crop(box).resize((size, size), RESAMPLE), dtype=np.uint8)


def load_arrays(
    ds: LesionDataset,
    size: int,
    indices: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
    colour: str = "none",
) -> np.ndarray:
    """Return images of ``ds`` as uint8 ``(N, size, size, 3)``, shorter side resized, centred.

    Parameters
    ----------
    ds : LesionDataset
        File-backed (decoded with PIL) or in-memory (resized) dataset.
    size : int
        Output side in pixels.
    indices : np.ndarray | None (default: None)
        Which images, in that order; all of them when None.
    progress : Callable[[int, int], None] | None (default: None)
        Called as ``progress(done, total)`` after each image.
    colour : str (default: "none")
        Colour constancy applied to each resized image (:data:`common.colour.COLOUR_METHODS`);
        a model must be scored with the setting it was trained with (its ``.meta.json``).

    Raises
    ------
    DataError
        If ``size`` is not positive, an index is out of range, or a file is missing or
        corrupt (run :func:`common.quality.check_quality` first to filter those out).
    """
    if size < 1:
        raise DataError(f"image size must be a positive number of pixels, got {size}")
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(ds)):
        raise DataError(
            f"indices span {idx.min()}..{idx.max()} but the dataset has {len(ds)} images"
        )
    check_colour(colour)
    out = np.empty((len(idx), size, size, 3), dtype=np.uint8)
    for k, i in enumerate(idx.tolist()):
        out[k] = apply_colour(_load_one(ds, i, size), colour)
        if progress is not None:
            progress(k + 1, len(idx))
    log.debug("loaded %d images at %d px", len(idx), size)
    return out


def _load_one(ds: LesionDataset, i: int, size: int) -> np.ndarray:
    """Decode (or take) image ``i`` and resize/crop it to ``size``.

    ``read_image`` raises a DataError naming the file when it is missing or corrupt.
    """
    return resize_crop(Image.fromarray(ds.read_image(i)), size)


def check_pixel_range(x: np.ndarray) -> None:
    """Raise if a batch is not raw 0-255 pixels.

    Akida models take raw 0-255 pixels and give silently wrong outputs on 0-1 floats;
    the Keras models carry their own Rescaling layer, so they want 0-255 too.

    Parameters
    ----------
    x : np.ndarray
        Image batch, uint8 or float. An all-zero batch is accepted (cannot be told apart).

    Raises
    ------
    DataError
        If ``x`` is float with values in 0-1 (already rescaled), negative values
        (normalised), or values above 255.
    """
    arr = np.asarray(x)
    if arr.dtype == np.uint8 or arr.size == 0:
        return
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"image batch has non-numeric dtype {arr.dtype}", "pass uint8 0-255")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0:
        raise DataError(
            f"image batch {arr.dtype} {arr.shape} has negative values (min {lo:.3g}); it looks "
            "normalised",
            "pass raw 0-255 pixels; the models rescale internally",
        )
    if hi > 255:
        raise DataError(
            f"image batch {arr.dtype} {arr.shape} has values above 255 (max {hi:.3g})",
            "pass raw 0-255 pixels",
        )
    if 0 < hi <= 1.0 and np.issubdtype(arr.dtype, np.floating):
        raise DataError(
            f"image batch {arr.dtype} {arr.shape} spans {lo:.3g}..{hi:.3g}; it looks like "
            "0-1 floats",
            "pass raw 0-255 pixels (multiply by 255 or skip the division); Akida models give "
            "silently wrong outputs on 0-1 input",
        )
