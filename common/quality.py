"""Image quality filter: drop unreadable, tiny, dark, bright, blurry or colourless images."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from .dataset import LesionDataset
from .errors import ConfigError
from .log import get_logger

log = get_logger("quality")

#: Drop reasons. Checks run in this order, except that grey *content* (an RGB file whose
#: channels are equal) is tested after dark/bright, so a black image is ``too_dark``.
#: An image gets the first reason that applies.
REASONS: tuple[str, ...] = (
    "unreadable", "too_small", "not_rgb", "too_dark", "too_bright", "blurry",
)

#: Accepted values of ``QualityConfig.require_rgb``.
RGB_POLICIES: tuple[str, ...] = ("color", "mode", "off")

#: PIL modes that carry no colour at all.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

#: Errors PIL raises for missing, truncated or non-image files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError,
                  Image.DecompressionBombError)


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of the quality filter.

    The defaults are loose on purpose: on the 5,984 real HAM10000 images (224 px JPEGs)
    they drop none. Tighten them for data of unknown origin.

    Parameters
    ----------
    min_side : int (default: 64)
        Smallest accepted shorter side of the original image, in pixels.
    dark_threshold : float (default: 20.0)
        Images whose mean luminance (ITU-R 601, 0-255) is below this are ``too_dark``.
    bright_threshold : float (default: 240.0)
        Images whose mean luminance is above this are ``too_bright``.
    blur_threshold : float (default: 3.0)
        Images whose Laplacian variance at ``working_size`` is below this are ``blurry``.
        Dermoscopy is smooth: real HAM10000 images score 9-600 (median 44); a
        Gaussian blur of radius 4 px at 224 px brings a median one to ~3. The measure
        depends on content, so this only catches gross blur.
    working_size : int (default: 96)
        Shorter side, in pixels, the image is reduced to before luminance, colour and
        sharpness are measured, so thresholds do not depend on the source resolution.
    require_rgb : str (default: "color")
        ``"color"`` drops images stored in a grey mode and RGB images whose channels are
        (nearly) equal; ``"mode"`` only drops grey modes; ``"off"`` keeps both.
    min_chroma : float (default: 2.0)
        Under ``"color"``, images whose mean per-pixel channel spread (max - min over
        R, G, B, 0-255) is below this count as grey.
    """

    min_side: int = 64
    dark_threshold: float = 20.0
    bright_threshold: float = 240.0
    blur_threshold: float = 3.0
    working_size: int = 96
    require_rgb: str = "color"
    min_chroma: float = 2.0

    def __post_init__(self) -> None:
        if self.min_side < 1:
            raise ConfigError(f"min_side must be >= 1 pixel, got {self.min_side}")
        if not 0.0 <= self.dark_threshold < self.bright_threshold <= 255.0:
            raise ConfigError(
                f"need 0 <= dark_threshold < bright_threshold <= 255, got "
                f"dark_threshold={self.dark_threshold}, bright_threshold={self.bright_threshold}",
                "luminance thresholds are on the 0-255 scale",
            )
        if self.blur_threshold < 0:
            raise ConfigError(f"blur_threshold must be >= 0, got {self.blur_threshold}")
        if self.working_size < 16:
            raise ConfigError(f"working_size must be >= 16 pixels, got {self.working_size}")
        if self.require_rgb not in RGB_POLICIES:
            raise ConfigError(
                f"require_rgb must be one of {RGB_POLICIES}, got {self.require_rgb!r}"
            )
        if self.min_chroma < 0:
            raise ConfigError(f"min_chroma must be >= 0, got {self.min_chroma}")


@dataclass
class QualityReport:
    """Outcome of :func:`check_quality`.

    Attributes
    ----------
    kept : np.ndarray
        Indices (int64, ascending) of the images that passed.
    dropped : list[tuple[int, str, str]]
        ``(index, image_id, reason)`` per dropped image, reason one of :data:`REASONS`.
    total : int
        Number of images checked.
    config : QualityConfig
        The thresholds used.
    seconds : float
        Wall time of the check.
    details : dict[int, str]
        Human-readable measurement behind each drop, by index.
    measures : dict[str, np.ndarray]
        ``luminance``, ``chroma`` and ``sharpness`` (Laplacian variance) per image,
        NaN where the image could not be measured.
    """

    kept: np.ndarray
    dropped: list[tuple[int, str, str]]
    total: int
    config: QualityConfig
    seconds: float = 0.0
    details: dict[int, str] = field(default_factory=dict)
    measures: dict[str, np.ndarray] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        """Return the number of dropped images per reason, every reason listed."""
        counts = dict.fromkeys(REASONS, 0)
        for _, _, reason in self.dropped:
            counts[reason] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict: counts, drops with details, config, measures."""
        percentiles = {}
        for name, values in self.measures.items():
            finite = values[np.isfinite(values)]
            if finite.size:
                p = np.percentile(finite, [0, 1, 50, 99, 100])
                percentiles[name] = dict(
                    zip(("min", "p1", "median", "p99", "max"), map(float, p), strict=True)
                )
        return {
            "total": self.total,
            "kept": int(len(self.kept)),
            "dropped": [
                {"index": i, "image_id": image_id, "reason": reason,
                 "detail": self.details.get(i, "")}
                for i, image_id, reason in self.dropped
            ],
            "summary": self.summary(),
            "config": asdict(self.config),
            "seconds": round(self.seconds, 3),
            "measures": percentiles,
        }


def check_quality(
    ds: LesionDataset,
    config: QualityConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> QualityReport:
    """Check every image of ``ds`` and return which ones to keep.

    Files are decoded at reduced resolution (``Image.draft``), so a pass over
    thousands of JPEGs takes seconds. Missing or corrupt files are dropped as
    ``"unreadable"``, never raised.

    Parameters
    ----------
    ds : LesionDataset
        File-backed or in-memory dataset.
    config : QualityConfig | None (default: None)
        Thresholds; ``QualityConfig()`` when None.
    progress : Callable[[int, int], None] | None (default: None)
        Called as ``progress(done, total)`` after each image.

    Returns
    -------
    QualityReport
        Kept indices, dropped ``(index, image_id, reason)`` and per-image measures.
    """
    cfg = config or QualityConfig()
    n = len(ds)
    start = time.perf_counter()
    measures = {name: np.full(n, np.nan) for name in ("luminance", "chroma", "sharpness")}
    kept: list[int] = []
    dropped: list[tuple[int, str, str]] = []
    details: dict[int, str] = {}
    for i in range(n):
        reason, detail = _check_one(ds, i, cfg, measures)
        if reason is None:
            kept.append(i)
        else:
            dropped.append((i, str(ds.image_ids[i]), reason))
            details[i] = detail
            log.debug("dropping image %d (%s): %s, %s", i, ds.image_ids[i], reason, detail)
        if progress is not None:
            progress(i + 1, n)
    report = QualityReport(
        kept=np.asarray(kept, dtype=np.int64),
        dropped=dropped,
        total=n,
        config=cfg,
        seconds=time.perf_counter() - start,
        details=details,
        measures=measures,
    )
    log.info(
        "quality check: kept %d of %d images in %.1f s, dropped %s",
        len(kept), n, report.seconds, {k: v for k, v in report.summary().items() if v},
    )
    return report


def _check_one(
    ds: LesionDataset, i: int, cfg: QualityConfig, measures: dict[str, np.ndarray]
) -> tuple[str | None, str]:
    """Return ``(reason, detail)`` for image ``i``, reason None when it passes."""
    if ds.in_memory:
        array = ds.images[i]
        size, mode = (array.shape[1], array.shape[0]), "RGB"
        img = Image.fromarray(array)
    else:
        path = ds.images[i]
        try:
            with Image.open(path) as src:
                size, mode = src.size, src.mode
                src.draft("RGB" if mode in ("RGB", "YCbCr") else None,
                          (cfg.working_size, cfg.working_size))
                img = src.convert("L" if mode in _GRAY_MODES else "RGB")
        except _DECODE_ERRORS as err:
            return "unreadable", f"{path}: {err}"

    if min(size) < cfg.min_side:
        return "too_small", f"{size[0]}x{size[1]} px, shorter side < {cfg.min_side}"
    if cfg.require_rgb != "off" and mode in _GRAY_MODES:
        return "not_rgb", f"stored in grey mode {mode!r}"

    work = _reduce(img, cfg.working_size)
    chroma = _chroma(np.asarray(work.convert("RGB")))
    gray = np.asarray(work.convert("L"), dtype=np.float32)
    luminance = float(gray.mean())
    sharpness = float(ndimage.laplace(gray).var())
    measures["luminance"][i] = luminance
    measures["chroma"][i] = chroma
    measures["sharpness"][i] = sharpness

    if luminance < cfg.dark_threshold:
        return "too_dark", f"mean luminance {luminance:.1f} < {cfg.dark_threshold}"
    if luminance > cfg.bright_threshold:
        return "too_bright", f"mean luminance {luminance:.1f} > {cfg.bright_threshold}"
    if cfg.require_rgb == "color" and chroma < cfg.min_chroma:
        return "not_rgb", f"grey content: mean channel spread {chroma:.2f} < {cfg.min_chroma}"
    if sharpness < cfg.blur_threshold:
        return "blurry", f"Laplacian variance {sharpness:.2f} < {cfg.blur_threshold}"
    return None, ""


def _chroma(rgb: np.ndarray) -> float:
    """Return the mean per-pixel channel spread ``max(R,G,B) - min(R,G,B)`` of a uint8 image."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return float(spread.mean())


def _reduce(img: Image.Image, side: int) -> Image.Image:
    """Resize ``img`` so that its shorter side is ``side`` pixels (aspect kept)."""
    w, h = img.size
    scale = side / min(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                      Image.Resampling.BILINEAR)


def find_unreadable(
    ds: LesionDataset, progress: Callable[[int, int], None] | None = None
) -> list[tuple[int, str, str]]:
    """Find the images that cannot be decoded (missing, truncated or not an image).

    Only decodes (at reduced resolution for JPEGs); no other quality check runs. In-memory
    datasets have none.

    Parameters
    ----------
    ds : LesionDataset
        The dataset.
    progress : Callable[[int, int], None] | None (default: None)
        Called as ``progress(done, total)`` after each image.

    Returns
    -------
    list[tuple[int, str, str]]
        ``(index, image_id, detail)`` per unreadable image, in index order.
    """
    if ds.in_memory:
        return []
    bad: list[tuple[int, str, str]] = []
    n = len(ds)
    for i, path in enumerate(ds.images):
        try:
            with Image.open(path) as src:
                src.draft("RGB" if src.mode in ("RGB", "YCbCr") else None, (64, 64))
                src.load()
        except _DECODE_ERRORS as err:
            bad.append((i, str(ds.image_ids[i]), f"{path}: {err}"))
        if progress is not None:
            progress(i + 1, n)
    if bad:
        log.info("%d of %d images are unreadable, e.g. %s", len(bad), n, bad[0][2])
    return bad
