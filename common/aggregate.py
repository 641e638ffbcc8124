"""What each phase exchanges, and how site contributions are combined into one global model.

Exchange rules (by variable group, see :mod:`common.weights`):

* **warm-up** (float model): trainable weights and BatchNormalization moving statistics are sent
  and averaged, weighted by each site's number of training examples (FedAvg, or the FedProx /
  FedAdam server update on top of that mean).
* **calibration**: only quantizer state is sent — each site's calibrated activation ranges.
  They are combined by the rule below into ONE quantized global model, built by the server.
* **QAT** (quantized model): trainable weights (and BN statistics, if the variant keeps any) are
  averaged as in warm-up. Quantizer state is **not** exchanged: it was fixed at calibration and
  stays identical on every site, so every site converts the same bits to Akida.

Guard (:func:`screen`): before any of this, a site's reply is refused — dropped from the
round, with its reason logged and reported — when it holds NaN/Inf, misses or adds keys, has a
wrong shape, claims a non-positive example count, or (training rounds) its update norm is more
than ``guard.max-norm-ratio`` times the median update norm of the other replies. The median of
the *others* (not of all) is what makes one outsized reply detectable among two or three.

Calibration combination rule: **per-channel maximum of the raw calibrated ranges** (and minimum
of ``range_min``). quantizeml calibrates an activation's ``range_max`` as a moving average of
batch maxima, then (cross-layer equalization) rounds it to the ideal fixed-point value and folds
the ratio into ``rescaling_rate`` and the next layer's kernel. We recover each site's raw range
as ``range_max / rescaling_rate``, take the maximum over sites, and apply it to the server's
quantized model with quantizeml's own equalization. The maximum is chosen over an
example-weighted mean because a range that is too small saturates the activations of the site
with the widest distribution (silently wrong outputs there), while one that is slightly too
large only costs a fraction of a bit of resolution everywhere; the moving-average calibration
already damps single outliers. It is also independent of site sizes, so a large site cannot
shrink a small site's range.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from .errors import ModelError
from .weights import BN_STATS, QUANTIZER, TRAINABLE, is_statistic

#: Variable groups sent by sites and averaged by the server, per phase.
EXCHANGED: dict[str, tuple[str, ...]] = {
    "warmup": (TRAINABLE, BN_STATS),
    "calibrate": (QUANTIZER,),
    "qat": (TRAINABLE, BN_STATS),
}

RANGE_MAX = "range_max"
RANGE_MIN = "range_min"
RATE = "rescaling_rate"


def weighted_mean(
    site_arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Example-weighted mean of named arrays (the FedAvg rule, stated for tests and docs).

    Parameters
    ----------
    site_arrays : Sequence[Mapping[str, np.ndarray]]
        One ``{key: array}`` per site, all with the same keys and shapes.
    weights : Sequence[float]
        Number of training examples per site.

    Raises
    ------
    ModelError
        If the sites' keys differ or the weights sum to zero.
    """
    keys = set(site_arrays[0])
    for i, arrays in enumerate(site_arrays[1:], start=1):
        if set(arrays) != keys:
            raise ModelError(f"site {i} sent keys {sorted(set(arrays) ^ keys)} the others did not")
    total = float(sum(weights))
    if total <= 0:
        raise ModelError(f"site weights {list(weights)} sum to {total}", "sites must train on data")
    return {
        k: sum(np.asarray(a[k], dtype=np.float64) * (w / total) for a, w in zip(
            site_arrays, weights, strict=True)).astype(np.asarray(site_arrays[0][k]).dtype)
        for k in site_arrays[0]
    }


def _shape(a: np.ndarray) -> tuple[int, ...]:
    return tuple(np.shape(a))


def _keys_note(keys: Collection[str], limit: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit})" if len(keys) > limit else "")


def update_norm(arrays: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``arrays - current`` over the trained weights (statistics left out)."""
    total = 0.0
    for k, v in arrays.items():
        if k in current and not is_statistic(k):
            total += float(np.sum((np.asarray(v, np.float64) - np.asarray(current[k],
                                                                            np.float64)) ** 2))
    return float(np.sqrt(total))


def _malformed(
    arrays: Mapping[str, np.ndarray],
    keys: Collection[str],
    shapes: Mapping[str, tuple[int, ...]],
    weight: float | None,
) -> str | None:
    """Why a reply cannot be combined (keys, shapes, dtype, NaN/Inf, example count), or None."""
    if weight is not None and not (np.isfinite(weight) and weight > 0):
        return f"example count {weight!r} is not a positive number"
    missing, extra = set(keys) - set(arrays), set(arrays) - set(keys)
    if missing or extra:
        return "keys differ from the expected ones: " + "; ".join(
            part for part in (f"missing {_keys_note(missing)}" if missing else "",
                              f"unexpected {_keys_note(extra)}" if extra else "") if part)
    for k in arrays:  # in the site's order: the first bad array is named
        a = np.asarray(arrays[k])
        if _shape(a) != shapes[k]:
            return f"array {k!r} has shape {_shape(a)}, expected {shapes[k]}"
        if a.dtype.kind not in "fiu":
            return f"array {k!r} has dtype {a.dtype}, not a number"
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            return f"array {k!r} holds {bad} NaN/Inf value(s)"
    return None


def screen(
    replies: Mapping[str, Mapping[str, np.ndarray]],
    current: Mapping[str, np.ndarray],
    expected: Collection[str] | None = None,
    max_norm_ratio: float | None = None,
    weights: Mapping[str, float] | None = None,
) -> dict[str, str]:
    """Tell which replies must not be aggregated, and why (the guard).

    Parameters
    ----------
    replies : Mapping[str, Mapping[str, np.ndarray]]
        Site → the arrays it sent.
    current : Mapping[str, np.ndarray]
        The global arrays the sites started from: the reference shapes, and the origin of
        each update.
    expected : Collection[str] | None (default: None)
        The keys every reply must hold exactly; None: the key set most replies hold
        (calibration, whose keys the global model does not have yet).
    max_norm_ratio : float | None (default: None)
        Refuse a reply whose :func:`update_norm` exceeds this times the median update norm
        of the other well-formed replies (training rounds); None: no norm check.
    weights : Mapping[str, float] | None (default: None)
        Site → claimed example count, which must be a positive number.

    Returns
    -------
    dict[str, str]
        Site → reason, for the refused replies only (sites in ``replies``' order).
    """
    if expected is None:
        counts = Counter(frozenset(a) for a in replies.values())
        expected = set(counts.most_common(1)[0][0]) if counts else set()
    shapes: dict[str, tuple[int, ...]] = {}
    for k in expected:
        if k in current:
            shapes[k] = _shape(current[k])
        else:  # no global value yet: the shape most replies agree on
            seen = Counter(_shape(a[k]) for a in replies.values() if k in a)
            shapes[k] = seen.most_common(1)[0][0]
    refused: dict[str, str] = {}
    for site, arrays in replies.items():
        why = _malformed(arrays, expected, shapes, None if weights is None else weights[site])
        if why is not None:
            refused[site] = why
    if max_norm_ratio is None:
        return refused
    norms = {s: update_norm(a, current) for s, a in replies.items() if s not in refused}
    for site, norm in norms.items():
        others = [n for s, n in norms.items() if s != site]
        ref = float(np.median(others)) if others else 0.0
        if ref > 0 and norm > max_norm_ratio * ref:
            refused[site] = (f"update norm {norm:.3g} is {norm / ref:.3g} x the median of the "
                             f"other sites' ({ref:.3g}); guard.max-norm-ratio is "
                             f"{max_norm_ratio:g}")
    return {s: refused[s] for s in replies if s in refused}


def raw_ranges(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Recover the calibrated (pre-equalization) ranges from a quantized model's quantizer state.

    Parameters
    ----------
    state : Mapping[str, np.ndarray]
        Quantizer-group arrays (``.../range_max``, ``.../range_min``, ``.../rescaling_rate``).

    Returns
    -------
    dict[str, np.ndarray]
        ``{".../range_max": raw max, ".../range_min": min}`` with ``raw = range_max / rate``.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        prefix, leaf = key.rsplit("/", 1)
        if leaf == RANGE_MAX:
            rate = np.asarray(state.get(f"{prefix}/{RATE}", 1.0), dtype=np.float32)
            rate = np.where(rate == 0, 1.0, rate)
            out[key] = (np.asarray(value, dtype=np.float32) / rate).astype(np.float32)
        elif leaf == RANGE_MIN:
            out[key] = np.asarray(value, dtype=np.float32)
    return out


def combine_ranges(site_states: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Combine the sites' calibrated ranges: per-channel max of ``range_max``, min of ``range_min``.

    Parameters
    ----------
    site_states : Sequence[Mapping[str, np.ndarray]]
        Each site's quantizer state (as sent in the calibration phase).

    Returns
    -------
    dict[str, np.ndarray]
        Raw global ranges, to be applied with :func:`apply_ranges`.

    Raises
    ------
    ModelError
        If no site contributed or the sites' quantizers differ.
    """
    if not site_states:
        raise ModelError("no site sent calibration ranges", "check the calibration round replies")
    raws = [raw_ranges(s) for s in site_states]
    keys = set(raws[0])
    for i, r in enumerate(raws[1:], start=1):
        if set(r) != keys:
            raise ModelError(
                f"site {i} calibrated quantizers {sorted(set(r) ^ keys)} the others did not"
            )
    out = {}
    for key in raws[0]:
        stack = np.stack([r[key] for r in raws])
        out[key] = (stack.min(0) if key.endswith(RANGE_MIN) else stack.max(0)).astype(np.float32)
    return out


def _equalized_next_layer(qmodel, layer):
    """Return the layer whose kernel quantizeml divides by ``layer``'s rescaling rate (or None)."""
    from quantizeml.layers import (
        BufferTempConv,
        DepthwiseBufferTempConv,
        DepthwiseConv2DTranspose,
        Dequantizer,
        PaddedConv2D,
    )
    from quantizeml.models.calibrate import _get_next_layer
    from tf_keras.layers import (
        Conv2D,
        Conv2DTranspose,
        Dense,
        DepthwiseConv2D,
        Dropout,
        Flatten,
        GlobalAvgPool2D,
        MaxPool2D,
        Reshape,
        SeparableConv2D,
    )

    # The same tuples as quantizeml.models.calibrate._set_and_equalize (quantizeml 1.2.5).
    supported = (Conv2D, PaddedConv2D, Conv2DTranspose, SeparableConv2D, DepthwiseConv2D, Dense,
                 DepthwiseConv2DTranspose, BufferTempConv, DepthwiseBufferTempConv)
    skippable = (Dropout, MaxPool2D, GlobalAvgPool2D, Dequantizer)
    if layer.out_quantizer.axis == "per-tensor":
        skippable += (Reshape, Flatten)
    reshape_ops: list = []
    nxt = _get_next_layer(layer, supported, skippable, reshape_ops)
    return nxt, bool(reshape_ops)


def apply_ranges(qmodel, ranges: Mapping[str, np.ndarray]) -> None:
    """Set global calibrated ranges on a quantized model, in place, as quantizeml would.

    Any equalization from a previous calibration of ``qmodel`` is undone first (next-layer
    kernel multiplied back by the old rescaling rate, rate reset to 1), then quantizeml's
    ``_set_and_equalize`` / ``_set_and_fold_zero_point`` apply the new ranges.

    Parameters
    ----------
    qmodel : tf_keras.Model
        A quantizeml model of the same variant (e.g. freshly quantized from the global
        float weights with any calibration).
    ranges : Mapping[str, np.ndarray]
        Raw ranges from :func:`combine_ranges`.

    Raises
    ------
    ModelError
        If a range names a layer the model lacks, or equalization crosses a reshape.
    """
    import tensorflow as tf
    from quantizeml.models.calibrate import _set_and_equalize, _set_and_fold_zero_point

    from .weights import canonical_layers

    layers = canonical_layers(qmodel)
    for key, raw_max in ranges.items():
        if not key.endswith(RANGE_MAX):
            continue
        layer_name = key.split("/", 1)[0]
        if layer_name not in layers:
            raise ModelError(
                f"calibration range {key!r} names layer {layer_name!r} absent from the model",
                "sites and server must quantize the same variant, size and width",
            )
        layer = layers[layer_name]
        quantizer = getattr(layer, "out_quantizer", None)
        if quantizer is None:  # an InputQuantizer: ranges, and zero point folding when signed
            range_min = ranges.get(key[: -len(RANGE_MAX)] + RANGE_MIN, np.zeros_like(raw_max))
            _set_and_fold_zero_point(
                qmodel, layer.name, tf.constant(range_min), tf.constant(raw_max)
            )
            continue
        old_rate = np.asarray(quantizer.rescaling_rate.numpy())
        if not np.all(old_rate == 1.0):
            nxt, reshaped = _equalized_next_layer(qmodel, layer)
            if nxt is None or reshaped:
                raise ModelError(
                    f"cannot undo the equalization of {layer_name!r} (next layer "
                    f"{getattr(nxt, 'name', None)!r}, reshape={reshaped})",
                    "federated calibration supports Conv/Dense chains without Flatten",
                )
            weights = nxt.get_weights()
            rate = old_rate if nxt.__class__.__name__.endswith("Conv2DTranspose") else (
                np.expand_dims(old_rate, -1))
            weights[0] = weights[0] * rate
            nxt.set_weights(weights)
            quantizer.rescaling_rate.assign(np.ones_like(old_rate))
        _set_and_equalize(qmodel, layer.name, tf.constant(np.asarray(raw_max, np.float32)))
