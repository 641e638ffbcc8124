"""Colour constancy: remove a global colour cast (camera, lighting, site) from uint8 images."""

from __future__ import annotations

import numpy as np

from .errors import ConfigError, DataError

#: Accepted colour-constancy settings (``none`` leaves images unchanged).
COLOUR_METHODS: tuple[str, ...] = ("none", "shades-of-gray", "gray-world")

#: Minkowski norm of Shades of Gray (Finlayson & Trezzi 2004; p = 6 as in ISIC pipelines).
SHADES_OF_GRAY_P = 6.0


def check_colour(method: str) -> str:
    """Return ``method`` if it is a colour-constancy setting, else raise ConfigError."""
    if method not in COLOUR_METHODS:
        raise ConfigError(
            f"colour constancy {method!r} is not a known setting",
            f"use one of {', '.join(COLOUR_METHODS)}",
        )
    return method


def illuminant(images: np.ndarray, p: float) -> np.ndarray:
    """Estimate each image's illuminant as the per-channel Minkowski p-mean, shape ``(N, 3)``.

    ``p = 1`` is Gray World (the channel means); large ``p`` tends to White Patch (max).
    """
    x = images.astype(np.float64) / 255.0
    flat = x.reshape(len(x), -1, 3)
    return np.power(np.mean(np.power(flat, p), axis=1), 1.0 / p)


def apply_colour(images: np.ndarray, method: str) -> np.ndarray:
    """Apply colour constancy to uint8 ``(N, H, W, 3)`` (or one ``(H, W, 3)``) images.

    Each channel is divided by its illuminant estimate and scaled so that the estimate
    becomes neutral grey **at the image's own mean brightness** (the mean of the three
    estimates is kept). Keeping the brightness matters: the common normalisation to a unit
    illuminant vector brightens dark images and clips their highlights, which shifts what
    the 8-bit input quantizer sees. The result is rounded and clipped to uint8.

    Parameters
    ----------
    images : np.ndarray
        uint8 images, ``(N, H, W, 3)`` or ``(H, W, 3)``.
    method : str
        One of :data:`COLOUR_METHODS`.

    Returns
    -------
    np.ndarray
        uint8 images of the same shape (the input itself for ``"none"``).

    Raises
    ------
    ConfigError
        Unknown ``method``.
    DataError
        Not uint8 RGB images.
    """
    check_colour(method)
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.shape[-1:] != (3,) or arr.ndim not in (3, 4):
        raise DataError(
            f"colour constancy needs uint8 RGB images, got {arr.dtype} {arr.shape}",
            "decode images to uint8 (H, W, 3) first (common.preprocess.load_arrays)",
        )
    if method == "none":
        return arr
    single = arr.ndim == 3
    batch = arr[None] if single else arr
    p = 1.0 if method == "gray-world" else SHADES_OF_GRAY_P
    est = illuminant(batch, p)
    gain = est.mean(axis=1, keepdims=True) / np.maximum(est, 1e-6)
    out = batch.astype(np.float32) * gain[:, None, None, :].astype(np.float32)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out[0] if single else out
