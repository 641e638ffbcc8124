"""CPU latency per image of an Akida model in software, or of a tf_keras model."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from common.errors import ConfigError, DataError
from common.log import get_logger
from common.preprocess import check_pixel_range

__all__ = ["measure_latency"]

log = get_logger("edge.latency")


def _is_akida(model: Any) -> bool:
    return type(model).__module__.startswith("akida")


def measure_latency(
    model: Any,
    images: np.ndarray,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, Any]:
    """Time inference per image on this CPU at each batch size.

    An ``akida.Model`` is first returned to software (``model.map(None)``) and fed uint8;
    a tf_keras model gets the same raw 0–255 pixels as float32 through ``predict_on_batch``.
    So a bench can compare Keras float and Akida software at batch 1 and 32.

    Parameters
    ----------
    model : akida.Model | tf_keras.Model
        The model to time.
    images : np.ndarray
        Raw 0–255 images ``(N, H, W, 3)``; repeated when a batch needs more than N.
    batch_sizes : Sequence[int] (default: (1, 32))
        Batch sizes to time.
    repeats : int (default: 5)
        Timed runs per batch size; the median is reported.
    warmup : int (default: 1)
        Untimed runs first (graph tracing, allocation).

    Returns
    -------
    dict[str, Any]
        ``backend`` (``"akida-software"`` or ``"keras"``), ``repeats`` and ``batches``:
        batch size (str) → ``ms_per_image``, ``ms_per_batch``, ``images_per_s``.

    Raises
    ------
    ConfigError
        If a batch size or ``repeats`` is not positive.
    DataError
        If ``images`` is empty or not raw 0–255 pixels.
    """
    if repeats < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(
            f"latency needs positive batch sizes and repeats, got batch_sizes={batch_sizes!r}, "
            f"repeats={repeats}, warmup={warmup}",
            "use e.g. batch_sizes=(1, 32), repeats=5",
        )
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise DataError(f"latency needs a non-empty (N, H, W, C) batch, got shape {images.shape}")
    check_pixel_range(images)
    if _is_akida(model):
        model.map(None)
        backend = "akida-software"
        data = images.astype(np.uint8)
        run: Callable[[np.ndarray], Any] = model.predict
    else:
        backend = "keras"
        data = images.astype(np.float32)
        run = model.predict_on_batch
    batches: dict[str, dict[str, float]] = {}
    for size in batch_sizes:
        batch = data[np.arange(size) % len(data)]
        for _ in range(warmup):
            run(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - start)
        per_batch = float(np.median(times)) * 1000.0
        batches[str(size)] = {
            "ms_per_image": per_batch / size,
            "ms_per_batch": per_batch,
            "images_per_s": 1000.0 * size / per_batch if per_batch > 0 else float("inf"),
        }
        log.debug("%s batch %d: %.3f ms/image", backend, size, per_batch / size)
    return {"backend": backend, "repeats": repeats, "batches": batches}
