"""Seeded tf.data input pipelines with on-the-fly augmentation, from arrays or image files."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from .errors import ConfigError, DataError
from .log import get_logger
from .preprocess import check_pixel_range

log = get_logger("augment")

#: Fill modes accepted by the affine warp (``tf.raw_ops.ImageProjectiveTransformV3``).
FILL_MODES: tuple[str, ...] = ("reflect", "wrap", "nearest", "constant")

#: RGB -> YIQ (NTSC) for column vectors; row 0 is the ITU-R 601 luma.
_RGB_TO_YIQ = np.array([
    [0.299, 0.587, 0.114],
    [0.595716, -0.274453, -0.321263],
    [0.211456, -0.522591, 0.311135],
])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)

#: cos/sin of k * 90 degrees, exact (no float rounding), indexed by k.
_COS90 = (1.0, 0.0, -1.0, 0.0)
_SIN90 = (0.0, 1.0, 0.0, -1.0)


@dataclass(frozen=True)
class AugmentConfig:
    """Knobs of the random augmentation; a zero disables the corresponding op.

    Geometric ops are combined into one affine warp per image (bilinear, one
    resampling); hue and saturation into one 3x3 colour matrix per image (hue rotated
    in YIQ space); the result is clipped to 0-255.

    Parameters
    ----------
    flip : bool (default: True)
        Random horizontal and vertical flips (lesions have no canonical orientation).
    rot90 : bool (default: True)
        Random rotation by a multiple of 90 degrees (exact, no interpolation loss).
    max_rotation : float (default: 15.0)
        Extra small-angle rotation, uniform in +-``max_rotation`` degrees.
    scale : tuple[float, float] (default: (1.0, 1.15))
        Zoom factor range; > 1 zooms in, which with ``translate`` is a random crop.
    translate : float (default: 0.05)
        Maximum shift, as a fraction of the image side, along each axis.
    brightness : float (default: 0.1)
        Maximum brightness delta, as a fraction of the full 0-255 range.
    contrast : float (default: 0.1)
        Contrast factor uniform in ``[1 - contrast, 1 + contrast]``.
    saturation : float (default: 0.1)
        Saturation factor uniform in ``[1 - saturation, 1 + saturation]``.
    hue : float (default: 0.02)
        Maximum hue shift, as a fraction of the hue circle (0.5 = 180 degrees).
    fill_mode : str (default: "reflect")
        How the warp fills pixels coming from outside the image, one of :data:`FILL_MODES`.
    """

    flip: bool = True
    rot90: bool = True
    max_rotation: float = 15.0
    scale: tuple[float, float] = (1.0, 1.15)
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    fill_mode: str = "reflect"

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ConfigError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        for name, top in (("max_rotation", 180.0), ("translate", 0.5), ("brightness", 1.0),
                          ("contrast", 1.0), ("saturation", 1.0), ("hue", 0.5)):
            value = getattr(self, name)
            if not 0 <= value <= top:
                raise ConfigError(f"{name} must be in [0, {top}], got {value}")
        if self.fill_mode not in FILL_MODES:
            raise ConfigError(f"fill_mode must be one of {FILL_MODES}, got {self.fill_mode!r}")

    @property
    def warps(self) -> bool:
        """Whether any geometric op is on."""
        return (self.flip or self.rot90 or self.max_rotation > 0 or self.translate > 0
                or self.scale != (1.0, 1.0))


def augment_batch(images: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Randomly augment a float32 0-255 batch ``(B, H, W, 3)``; deterministic given ``seed``.

    Parameters
    ----------
    images : tf.Tensor
        float32 images in 0-255.
    seed : tf.Tensor
        int32/int64 shape ``(2,)`` stateless seed; each image gets its own draws.
    config : AugmentConfig
        Which ops and how strong.

    Returns
    -------
    tf.Tensor
        float32 ``(B, H, W, 3)`` in 0-255, same shape as ``images``.
    """
    seeds = tf.random.experimental.stateless_split(seed, num=10)
    n = tf.shape(images)[0]

    def uniform(k: int, low: float, high: float) -> tf.Tensor:
        return tf.random.stateless_uniform([n], seeds[k], low, high)

    x = images
    if config.warps:
        x = _warp(x, config, seeds)
    if config.saturation or config.hue:
        hue = uniform(7, -config.hue, config.hue) * (2.0 * math.pi)
        saturation = uniform(8, 1 - config.saturation, 1 + config.saturation)
        x = tf.einsum("bhwc,bcd->bhwd", x, _colour_matrices(hue, saturation))
    if config.contrast:
        factor = uniform(6, 1 - config.contrast, 1 + config.contrast)[:, None, None, None]
        mean = tf.reduce_mean(x, axis=(1, 2), keepdims=True)
        x = (x - mean) * factor + mean
    if config.brightness:
        x = x + uniform(5, -config.brightness, config.brightness)[:, None, None, None] * 255.0
    return tf.clip_by_value(x, 0.0, 255.0)


def _colour_matrices(hue: tf.Tensor, saturation: tf.Tensor) -> tf.Tensor:
    """Per-image ``(B, 3, 3)`` RGB matrices (row vectors) rotating hue and scaling saturation.

    Hue turns by ``hue`` radians around the luma axis in YIQ space; saturation blends
    each pixel with its luma. Both keep luma (ITU-R 601) unchanged and cost one 3x3
    product per pixel, several times cheaper than an HSV round trip.
    """
    cos, sin = tf.cos(hue), tf.sin(hue)
    one, zero = tf.ones_like(hue), tf.zeros_like(hue)
    rotate = tf.stack([
        tf.stack([one, zero, zero], axis=-1),
        tf.stack([zero, cos, sin], axis=-1),
        tf.stack([zero, -sin, cos], axis=-1),
    ], axis=1)  # row-vector form of a rotation of (I, Q)
    hue_m = tf.constant(_RGB_TO_YIQ.T, tf.float32) @ rotate @ tf.constant(_YIQ_TO_RGB.T, tf.float32)
    luma = tf.constant(_RGB_TO_YIQ[0], tf.float32)[:, None] * tf.ones([1, 3])
    s = saturation[:, None, None]
    sat_m = s * tf.eye(3) + (1.0 - s) * luma
    return hue_m @ sat_m


def _warp(x: tf.Tensor, config: AugmentConfig, seeds: tf.Tensor) -> tf.Tensor:
    """Apply one random affine warp (flips, rotation, zoom, shift) per image.

    ``seeds`` are the stateless seeds of :func:`augment_batch`; rows 0-4 and 9 are used here.
    """
    n = tf.shape(x)[0]

    def uniform(k: int, low: float, high: float) -> tf.Tensor:
        return tf.random.stateless_uniform([n], seeds[k], low, high)

    height = tf.cast(tf.shape(x)[1], tf.float32)
    width = tf.cast(tf.shape(x)[2], tf.float32)
    ones = tf.ones([n])
    # Output pixel p maps to input point M (p - c) + c + t, M = R90 R(theta) F / s.
    fx = tf.where(uniform(1, 0.0, 1.0) < 0.5, -ones, ones) if config.flip else ones
    fy = tf.where(uniform(2, 0.0, 1.0) < 0.5, -ones, ones) if config.flip else ones
    if config.rot90:
        k = tf.random.stateless_uniform([n], seeds[0], 0, 4, dtype=tf.int32)
        cos90, sin90 = tf.gather(_COS90, k), tf.gather(_SIN90, k)
    else:
        cos90, sin90 = ones, tf.zeros([n])
    theta = uniform(3, -1.0, 1.0) * (config.max_rotation * math.pi / 180.0)
    cos = cos90 * tf.cos(theta) - sin90 * tf.sin(theta)
    sin = sin90 * tf.cos(theta) + cos90 * tf.sin(theta)
    inv_scale = 1.0 / uniform(4, *config.scale) if config.scale != (1.0, 1.0) else ones
    a0, a1 = cos * fx * inv_scale, -sin * fy * inv_scale
    b0, b1 = sin * fx * inv_scale, cos * fy * inv_scale
    shift = tf.random.stateless_uniform([n, 2], seeds[9], -config.translate, config.translate)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    tx, ty = shift[:, 0] * width, shift[:, 1] * height
    a2 = cx + tx - a0 * cx - a1 * cy
    b2 = cy + ty - b0 * cx - b1 * cy
    zeros = tf.zeros([n])
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=transforms,
        output_shape=tf.shape(x)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode=config.fill_mode.upper(),
    )


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 32,
    augment: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    config: AugmentConfig | None = None,
    sample_probs: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Return a batched, prefetched ``tf.data.Dataset`` of in-memory images.

    Shuffling permutes indices (no shuffle buffer holding image copies) and is
    re-drawn every epoch; augmentation is drawn per batch from stateless seeds. Each
    epoch draws new shuffles and augmentations, and the same ``seed`` gives the same
    sequence of batches in every run.

    Parameters
    ----------
    images : np.ndarray
        ``(N, H, W, 3)`` uint8, or float in 0-255.
    labels : np.ndarray
        ``(N,)`` integer labels.
    batch_size : int (default: 32)
        Images per batch (the last batch may be smaller).
    augment : bool (default: False)
        Apply :func:`augment_batch` with ``config``.
    shuffle : bool (default: False)
        Reshuffle every epoch.
    seed : int (default: 0)
        Seed of the shuffle and the augmentation.
    config : AugmentConfig | None (default: None)
        Augmentation knobs; ``AugmentConfig()`` when None.
    sample_probs : np.ndarray | None (default: None)
        Per-image sampling probabilities (e.g. :func:`common.balance.sampling_probs`): each
        epoch then draws ``N`` images **with replacement** from this distribution (seeded,
        re-drawn every epoch) instead of permuting them; ``shuffle`` is then implied.

    Yields
    ------
    tuple[tf.Tensor, tf.Tensor]
        float32 ``(B, H, W, 3)`` images in 0-255 and int32 ``(B,)`` labels.

    Raises
    ------
    DataError
        If shapes disagree or the images are not 0-255.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"images must be (N, H, W, 3), got shape {images.shape}")
    check_pixel_range(images)
    y = _check_labels(labels, len(images))
    _check_batch(batch_size)
    cfg = config or AugmentConfig()
    n = len(images)
    pixels = tf.constant(images)
    targets = tf.constant(y)
    if sample_probs is not None:
        ds = _weighted_indices(np.asarray(sample_probs, dtype=np.float64), n, seed)
    else:
        ds = tf.data.Dataset.range(n)
        if shuffle:
            ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(
        lambda idx: (tf.cast(tf.gather(pixels, idx), tf.float32), tf.gather(targets, idx)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return _finish(ds, augment, seed, cfg)


def _weighted_indices(probs: np.ndarray, n: int, seed: int) -> tf.data.Dataset:
    """``n`` image indices per epoch drawn with replacement from ``probs`` (seeded)."""
    if probs.shape != (n,) or not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.sum() <= 0:
        raise DataError(
            f"sample_probs must be {n} finite non-negative weights with a positive sum, got "
            f"shape {probs.shape}",
            "pass one weight per training image (common.balance.sampling_probs)",
        )
    cdf = tf.constant(np.cumsum(probs / probs.sum()), tf.float64)
    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(n)

    def pick(r: tf.Tensor) -> tf.Tensor:
        u = tf.cast(r % (1 << 32), tf.float64) / float(1 << 32)  # Dataset.random: 0..2^32-1
        return tf.minimum(tf.searchsorted(cdf, [u], side="right")[0], n - 1)

    return draws.map(pick)


def make_file_dataset(
    paths: Sequence[str],
    labels: np.ndarray,
    size: int,
    batch_size: int = 32,
    augment: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    config: AugmentConfig | None = None,
) -> tf.data.Dataset:
    """Return a batched, prefetched ``tf.data.Dataset`` decoding JPEG/PNG files with ``tf.io``.

    Each image is centre-cropped to a square and resized to ``size`` (bicubic,
    antialiased), as :func:`common.preprocess.load_arrays` does with PIL, for folders
    too big to hold in memory. Files are not checked for corruption: run
    :func:`common.quality.check_quality` first; a corrupt file fails the iteration.

    Parameters
    ----------
    paths : Sequence[str]
        Image files.
    labels : np.ndarray
        ``(N,)`` integer labels.
    size : int
        Output side in pixels.
    batch_size, augment, shuffle, seed, config
        As in :func:`make_dataset`.

    Yields
    ------
    tuple[tf.Tensor, tf.Tensor]
        float32 ``(B, size, size, 3)`` images in 0-255 and int32 ``(B,)`` labels.

    Raises
    ------
    DataError
        If a file is missing, counts disagree or ``size`` is not positive.
    """
    paths = [str(p) for p in paths]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(paths)} image files do not exist, e.g. {missing[:3]}",
            "check the data path, or filter the listing with check_quality first",
        )
    y = _check_labels(labels, len(paths))
    _check_batch(batch_size)
    if size < 1:
        raise DataError(f"image size must be a positive number of pixels, got {size}")
    cfg = config or AugmentConfig()
    ds = tf.data.Dataset.from_tensor_slices((paths, y))
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(
        lambda path, label: (decode_resize(path, size), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).batch(batch_size)
    return _finish(ds, augment, seed, cfg)


def decode_resize(path: tf.Tensor, size: int) -> tf.Tensor:
    """Decode a JPEG/PNG file, centre-crop to a square, resize to ``size``; float32 0-255."""
    img = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    height, width = tf.shape(img)[0], tf.shape(img)[1]
    side = tf.minimum(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    img = img[top:top + side, left:left + side]
    img = tf.image.resize(img, [size, size], method="bicubic", antialias=True)
    return tf.round(tf.clip_by_value(img, 0.0, 255.0))


def _finish(ds: tf.data.Dataset, augment: bool, seed: int, cfg: AugmentConfig) -> tf.data.Dataset:
    """Add per-batch augmentation (seeded) and prefetching to a batched dataset."""
    if augment:
        batch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, batch_seeds)).map(
            lambda batch, s: (augment_batch(batch[0], s, cfg), batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def _check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    """Return labels as int32, raising when their count or type is wrong."""
    y = np.asarray(labels)
    if y.shape != (n,):
        raise DataError(f"need {n} labels (one per image), got shape {y.shape}")
    if n and not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {y.dtype}",
                        "pass class indices, not names or one-hot vectors")
    return y.astype(np.int32)


def _check_batch(batch_size: int) -> None:
    """Raise unless ``batch_size`` is a positive integer."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
