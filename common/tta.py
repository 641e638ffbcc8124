"""Model outputs with test-time augmentation: flips and 90° rotations, logits averaged."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import ConfigError

#: The views, in the order ``--tta N`` takes them (all exact: no interpolation).
VIEWS: tuple[str, ...] = (
    "identity",
    "flip-lr",
    "flip-ud",
    "rot180",
    "transpose",
    "rot90",
    "rot270",
    "anti-transpose",
)

#: Largest ``--tta`` count (the 8 symmetries of the square).
MAX_TTA = len(VIEWS)


def check_tta(n: int) -> int:
    """Return ``n`` if it is a valid view count, else raise ConfigError naming ``--tta``."""
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_TTA:
        raise ConfigError(
            f"--tta {n!r} is not a number of views",
            f"use 1 (no test-time augmentation) to {MAX_TTA} (flips and 90° rotations)",
        )
    return int(n)


def view(x: np.ndarray, name: str) -> np.ndarray:
    """Return ``x`` (``(N, H, W, C)``, square) seen through view ``name``."""
    ops = {
        "identity": lambda a: a,
        "flip-lr": lambda a: a[:, :, ::-1],
        "flip-ud": lambda a: a[:, ::-1],
        "rot180": lambda a: a[:, ::-1, ::-1],
        "transpose": lambda a: a.transpose(0, 2, 1, 3),
        "rot90": lambda a: np.rot90(a, 1, axes=(1, 2)),
        "rot270": lambda a: np.rot90(a, 3, axes=(1, 2)),
        "anti-transpose": lambda a: np.rot90(a, 2, axes=(1, 2)).transpose(0, 2, 1, 3),
    }
    return np.ascontiguousarray(ops[name](x))


def is_akida(model: Any) -> bool:
    """Whether ``model`` is an ``akida.Model`` (else a Keras model is assumed)."""
    return type(model).__module__.split(".")[0] == "akida"


def model_logits(model: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Output scores ``(N, classes)`` of a Keras (float/quantized) or Akida model.

    Both take raw 0–255 pixels: Keras models as float32, Akida models as uint8 (checked:
    Akida gives silently wrong outputs on 0–1 input). Akida 1.0 outputs equal the
    quantized model's dequantized logits (bit-exact conversion), so both can be averaged
    and soft-maxed alike.
    """
    from .preprocess import check_pixel_range

    check_pixel_range(images)
    n = len(images)
    if is_akida(model):
        x = np.asarray(images).astype(np.uint8)
        out = [
            np.asarray(model.predict(x[i : i + batch_size])).reshape(len(x[i : i + batch_size]), -1)
            for i in range(0, n, batch_size)
        ]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)
    logits = model.predict(np.asarray(images, dtype=np.float32), batch_size=batch_size, verbose=0)
    return np.asarray(logits, dtype=np.float32).reshape(n, -1)


def predict_classes(model: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Top-1 class of each raw 0–255 image for a Keras (float/quantized) or Akida model."""
    return model_logits(model, images, batch_size).argmax(axis=-1)


def tta_logits(
    model: Any, images: np.ndarray, tta: int = 1, batch_size: int = 64,
    predict: Callable[[Any, np.ndarray, int], np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Mean logits over the first ``tta`` views of :data:`VIEWS`, and timing.

    Parameters
    ----------
    model : Any
        Keras or Akida model (see :func:`model_logits`).
    images : np.ndarray
        Raw 0–255 images ``(N, S, S, 3)``.
    tta : int (default: 1)
        Number of views, 1..:data:`MAX_TTA`.
    batch_size : int (default: 64)
        Images per call.
    predict : Callable | None (default: None)
        ``predict(model, images, batch_size) -> (N, classes)`` scores of one view;
        :func:`model_logits` when None.

    Returns
    -------
    tuple[np.ndarray, dict[str, Any]]
        ``(N, classes)`` mean logits, and ``{"tta", "views", "ms_per_image_per_view"}``.
    """
    n_views = check_tta(tta)
    total = None
    t0 = time.perf_counter()
    for name in VIEWS[:n_views]:
        out = (predict or model_logits)(model, view(images, name), batch_size)
        total = out if total is None else total + out
    seconds = time.perf_counter() - t0
    per_view_ms = 1000.0 * seconds / max(1, n_views * len(images))
    info = {
        "tta": n_views,
        "views": list(VIEWS[:n_views]),
        "ms_per_image_per_view": per_view_ms,
    }
    return total / n_views, info
