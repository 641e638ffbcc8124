"""Class balancing of the training split (SMOTE / random oversampling) and class weights."""

from __future__ import annotations

from collections import Counter

import numpy as np
from imblearn.over_sampling import SMOTE, RandomOverSampler
from sklearn.utils.class_weight import compute_class_weight

from .errors import ConfigError, DataError
from .log import get_logger

log = get_logger("balance")

#: Accepted values of ``method``.
METHODS: tuple[str, ...] = ("smote", "oversample", "none")

#: SMOTE's default neighbour count, lowered when the smallest class is smaller.
SMOTE_NEIGHBOURS = 5


def balance_train(
    train_x: np.ndarray, train_y: np.ndarray, method: str = "smote", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Balance the **training split only, never validation/test**; the entry point of training.

    Synthetic samples must never reach an evaluation split: they are interpolations of
    training images, so scoring on them (or training on interpolations of test images)
    inflates every metric. Call this after splitting, on the training arrays alone.

    Parameters
    ----------
    train_x : np.ndarray
        Training images, uint8 ``(N, H, W, 3)``.
    train_y : np.ndarray
        Training labels, integer ``(N,)``.
    method : str (default: "smote")
        One of :data:`METHODS`, see :func:`balance`.
    seed : int (default: 0)
        Random seed of the resampler.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        The ``N`` original samples, unchanged and first, then the added ones.
    """
    before = Counter(np.asarray(train_y).tolist())
    x, y = balance(train_x, train_y, method=method, seed=seed)
    log.info(
        "balanced training split with %r: %d -> %d images, per class %s -> %s",
        method, len(train_y), len(y), dict(sorted(before.items())),
        dict(sorted(Counter(y.tolist()).items())),
    )
    return x, y


def balance(
    x: np.ndarray, y: np.ndarray, method: str = "smote", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Oversample every class up to the largest class's count.

    Parameters
    ----------
    x : np.ndarray
        Images, uint8 ``(N, H, W, 3)`` (any uint8 ``(N, ...)`` works).
    y : np.ndarray
        Integer labels ``(N,)``.
    method : str (default: "smote")
        ``"smote"``: imbalanced-learn SMOTE on the flattened raw pixels, ``k_neighbors``
        lowered to (smallest class - 1) when that is below 5; a class with a single
        sample cannot be interpolated and is randomly oversampled (duplicated) instead,
        with a warning. SMOTE works on a float32 copy: at 64 px, 16k output images take
        ~0.8 GB. ``"oversample"``: imbalanced-learn RandomOverSampler (duplicates).
        ``"none"``: return ``x`` and ``y`` themselves.
    seed : int (default: 0)
        Random seed of the resamplers.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        uint8 images of the input's shape per sample and labels of the input's dtype;
        the original samples come first, in order, followed by the added ones.

    Raises
    ------
    ConfigError
        If ``method`` is unknown.
    DataError
        If ``x`` is not uint8 or counts disagree.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown balancing method {method!r}", f"use one of {METHODS}")
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != np.uint8 or x.ndim < 2:
        raise DataError(
            f"balance needs uint8 images (N, ...), got {x.dtype} {x.shape}",
            "balance the uint8 arrays from load_arrays, before any rescaling",
        )
    if y.shape != (len(x),) or (len(y) and not np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"need {len(x)} integer labels, got {y.dtype} {y.shape}")
    counts = Counter(y.tolist())
    if method == "none" or len(counts) < 2:
        return x, y
    target = max(counts.values())
    flat = x.reshape(len(x), -1)
    if method == "oversample":
        flat, y_out = RandomOverSampler(random_state=seed).fit_resample(flat, y)
        return flat.reshape(-1, *x.shape[1:]), y_out.astype(y.dtype)
    return _smote(flat, y, counts, target, seed, x.shape[1:])


def _smote(
    flat: np.ndarray, y: np.ndarray, counts: Counter, target: int, seed: int,
    sample_shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """SMOTE the classes with >= 2 samples, duplicate the single-sample ones, up to ``target``."""
    singles = {c: target for c, k in counts.items() if k == 1 and k < target}
    minority = {c: target for c, k in counts.items() if 1 < k < target}
    x_out, y_out = flat, y
    if singles:
        log.warning(
            "classes %s have a single training image: SMOTE cannot interpolate them, so they "
            "are duplicated %d times (random oversampling)", sorted(singles), target - 1,
        )
        x_out, y_out = RandomOverSampler(
            sampling_strategy=singles, random_state=seed
        ).fit_resample(x_out, y_out)
    if minority:
        k = min(SMOTE_NEIGHBOURS, min(counts[c] for c in minority) - 1)
        if k < SMOTE_NEIGHBOURS:
            log.info("SMOTE with k_neighbors=%d (smallest class has %d images)", k, k + 1)
        smote = SMOTE(sampling_strategy=minority, k_neighbors=k, random_state=seed)
        x_float, y_out = smote.fit_resample(x_out.astype(np.float32), y_out)
        # uint8 -> float32 -> uint8 is exact, so the originals come back unchanged.
        x_out = np.clip(np.rint(x_float), 0, 255).astype(np.uint8)
    return x_out.reshape(-1, *sample_shape), y_out.astype(y.dtype)


def class_weights(y: np.ndarray, num_classes: int) -> dict[int, float]:
    """Return ``{class: weight}`` with sklearn's ``"balanced"`` weights, for Keras ``class_weight``.

    Weights are ``n_samples / (n_present_classes * count)``. Classes with no sample get
    1.0 (they never occur, but Keras wants a key for every class).

    Raises
    ------
    DataError
        If ``y`` is empty or holds a label outside ``0..num_classes-1``.
    """
    y = np.asarray(y)
    if y.size == 0:
        raise DataError("cannot compute class weights of an empty label array")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"labels span {y.min()}..{y.max()} but num_classes is {num_classes}")
    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    out = dict.fromkeys(range(num_classes), 1.0)
    out.update({int(c): float(w) for c, w in zip(present, weights, strict=True)})
    return out


def sampling_probs(labels: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Per-image sampling probabilities that draw class ``c`` in proportion to ``n_c^(1-power)``.

    ``power = 1`` gives class-balanced batches (every class equally often), ``0.5`` square-root
    balancing, ``0`` the natural frequencies. Images of one class are equally likely.

    Raises
    ------
    ConfigError
        ``power`` outside [0, 1].
    """
    if not 0.0 <= power <= 1.0:
        raise ConfigError(
            f"sampling power {power} is outside [0, 1]",
            "use 1 (class-balanced), 0.5 (square-root) or 0 (natural)",
        )
    y = np.asarray(labels, dtype=np.int64).ravel()
    counts = np.bincount(y)
    weights = counts[y].astype(np.float64) ** (-power)
    return weights / weights.sum()


def effective_prior(
    labels: np.ndarray, num_classes: int, power: float = 0.0, warn: bool = True
) -> np.ndarray:
    """Class prior of training batches drawn with :func:`sampling_probs` at ``power``.

    A class without training images counts as one image (with a warning naming it, unless
    ``warn`` is False: a federated site lacking classes is expected), so the prior stays
    positive and the logit-adjusted loss stays defined; such a class is never a training
    label, so the model cannot learn it from these images either way.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size and warn:
        log.warning("classes %s have no training images; their prior counts them as one image",
                    empty.tolist())
    mass = np.maximum(counts, 1).astype(np.float64) ** (1.0 - power)
    return mass / mass.sum()
