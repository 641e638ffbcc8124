"""Bit-exact Akida 1.0 conversion: power-of-two output scales and integer thresholds.

Why the plain cnn2snn conversion drifts (measured on quantizeml 1.2.5 / cnn2snn 2.19.3 /
akida 2.19.3, see docs/akida-parity.md):

- quantizeml computes a 4-bit layer output as ``floor((n·qs + 2^(K-1)) / 2^K)`` — the integer
  accumulator ``n`` (bias included) times an 8-bit per-channel scale ``qs``, rounded half up
  after the shift ``K`` — i.e. ``floor(n/S + 1/2)`` with the step ``S = 2^K / qs``.
- An Akida 1.0 neuron computes ``clip(ceil((p - threshold) / act_step), 0, 15)`` on the
  accumulator without bias ``p``, with an **integer** threshold. cnn2snn sets
  ``threshold = -bias + round(S/2)`` and ``act_step = S``. Whenever ``S/2`` is not an integer
  the two disagree on a band of accumulator values at every level, and at exact ties even
  when it is. On small 4-bit layers ``S`` is about 5–20 accumulator units, so 2–10 % of the
  activations of one layer come out one level off, and every following layer amplifies it.

The two cures here make every level boundary an integer that Akida can represent:

1. :func:`pow2_output_scales` rescales each output channel of every 4-bit block by a factor
   in [0.71, 1.41] (and its consumer's input channel by the inverse), so the channel's
   quantizeml scale is just above a power of two and ``qs`` is exactly 128: ``S`` becomes a
   power of two.
2. :func:`exact_thresholds` then sets, per neuron, the integer threshold and the step whose
   level boundaries are exactly quantizeml's (always possible once ``S`` is an integer; for
   any other layer it keeps cnn2snn's values where no exact solution exists, and 1-bit spike
   layers are always exact because only the threshold matters).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from math import ceil
from typing import TYPE_CHECKING

import numpy as np
import tf_keras as keras

from common.log import get_logger

if TYPE_CHECKING:
    import akida

    from common.models import VariantInfo

log = get_logger("akida_exact")

#: Target a quantizeml scale this much above a power of two: at exactly 2^k its 8-bit
#: quantization saturates to 255 instead of giving 128.
_POW2_MARGIN = 2.0**-12
#: Channel factors closer to 1 than this are left alone (keeps the transform idempotent).
_ALPHA_TOL = 1e-5


@dataclass
class ThresholdReport:
    """What :func:`exact_thresholds` changed in one Akida layer."""

    name: str
    act_bits: int
    neurons: int
    changed: int
    inexact: int


def _main_layers(qmodel: keras.Model) -> list[keras.layers.Layer]:
    """Quantized layers with weights, in model order (each starts an Akida 1.0 layer)."""
    return [layer for layer in qmodel.layers
            if hasattr(layer, "weight_quantizer") or hasattr(layer, "pw_weight_quantizer")]


def _block_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """``layer`` and the single-outbound chain after it, up to its output quantizer."""
    chain = [layer]
    while len(layer.outbound_nodes) == 1 and getattr(layer, "out_quantizer", None) is None:
        layer = layer.outbound_nodes[0].outbound_layer
        chain.append(layer)
    return chain


def _int_max(quantizer) -> int:
    return 2 ** int(quantizer.value_bits) - 1


def _channel_scales(layer: keras.layers.Layer) -> np.ndarray:
    """Per-output-channel weight scale quantizeml will use (``max|w| / int_max``)."""
    if hasattr(layer, "pw_weight_quantizer"):
        dw = np.abs(layer.depthwise_kernel.numpy()).max() / _int_max(layer.dw_weight_quantizer)
        pw = np.abs(layer.pointwise_kernel.numpy()).max(axis=(0, 1, 2))
        return dw * pw / _int_max(layer.pw_weight_quantizer)
    kernel = np.abs(layer.kernel.numpy())
    return kernel.max(axis=tuple(range(kernel.ndim - 1))) / _int_max(layer.weight_quantizer)


def _input_scale(layer: keras.layers.Layer) -> float:
    """Float scale of the layer's input (the model's Rescaling before the first layer, else 1)."""
    inbound = layer.inbound_nodes[0].inbound_layers
    inbound = inbound[0] if isinstance(inbound, list) else inbound
    scale = getattr(inbound, "scale", None) if type(inbound).__name__ == "QuantizedRescaling" \
        else None
    return 1.0 if scale is None else float(np.float32(scale))


def _scale_outputs(layer: keras.layers.Layer, alpha: np.ndarray) -> None:
    var = layer.pointwise_kernel if hasattr(layer, "pw_weight_quantizer") else layer.kernel
    var.assign(var.numpy() * alpha)
    if getattr(layer, "use_bias", False):
        layer.bias.assign(layer.bias.numpy() * alpha)


def _scale_inputs(layer: keras.layers.Layer, inv_alpha: np.ndarray) -> None:
    var = layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel
    shape = [1] * len(var.shape)
    shape[-2] = len(inv_alpha)
    var.assign(var.numpy() * inv_alpha.reshape(shape))


#: How :func:`pow2_output_scales` picks each channel's power of two.
POW2_ROUNDING: tuple[str, ...] = ("nearest", "down", "up")


def pow2_output_scales(qmodel: keras.Model, rounding: str = "nearest") -> int:
    """Make every multi-bit block's output scale a power of two, in place (Akida 1.0).

    For a block ``conv → (GAP) → QuantizedReLU(out_quantizer)`` followed by another weighted
    layer, output channel ``c`` is multiplied by ``α_c`` (kernel and bias) and the next
    layer's input channel ``c`` by ``1/α_c``; ``α_c`` is the factor in [0.71, 1.41] that
    brings ``input_scale × weight_scale_c × rescaling_rate`` (quantizeml's output scale, the
    input scale being the model's 1/255 Rescaling for the first layer) just above a power of
    two. The float function
    is unchanged except that channel ``c`` now saturates at ``max_value / α_c`` and uses a
    grid ``α_c`` times finer (so accuracy moves slightly; measure the quantized model after
    this, not before). 1-bit (spike) blocks and the last layer are left alone; the
    transform is idempotent, deterministic and data-free (every site gets the same bits).

    ``rounding`` picks the power of two: ``"nearest"`` (``α`` in [0.71, 1.41]), ``"down"``
    (``α`` in (0.5, 1]: a channel never saturates earlier, its grid is at most 2× coarser) or
    ``"up"`` (``α`` in [1, 2): a finer grid, earlier saturation).

    Returns
    -------
    int
        Number of blocks whose weights changed.
    """
    mains = _main_layers(qmodel)
    changed = 0
    for cur, nxt in zip(mains[:-1], mains[1:], strict=True):
        quantizer = getattr(_block_layers(cur)[-1], "out_quantizer", None)
        if quantizer is None or quantizer.bitwidth < 2:
            continue
        rate = np.asarray(quantizer.rescaling_rate.numpy(), dtype=np.float64)
        if rate.ndim:
            log.warning("%s: per-axis output quantizer; power-of-two scales need per-tensor "
                        "activations (Akida 1.0 quantization_params)", cur.name)
            continue
        scales = _channel_scales(cur).astype(np.float64) * float(rate) * _input_scale(cur)
        live = scales > 0
        round_fn = {"nearest": np.round, "down": np.floor, "up": np.ceil}[rounding]
        target = np.exp2(round_fn(np.log2(np.where(live, scales, 1.0)))) * (1 + _POW2_MARGIN)
        alpha = np.where(live, target / np.where(live, scales, 1.0), 1.0)
        alpha = np.where(np.abs(alpha - 1) < _ALPHA_TOL, 1.0, alpha).astype(np.float32)
        if np.all(alpha == 1.0):
            continue
        _scale_outputs(cur, alpha)
        _scale_inputs(nxt, (1.0 / alpha).astype(np.float32))
        changed += 1
        log.debug("%s: output channel factors in [%.3f, %.3f]", cur.name, alpha.min(),
                  alpha.max())
    log.info("power-of-two output scales: %d blocks rescaled", changed)
    return changed


def _boundaries(qs: int, shift: int, bias: int, pool: int, levels: int) -> list[int]:
    """Smallest Akida accumulator value reaching each quantizeml output level 1..levels.

    quantizeml: level ``>= j`` iff ``n·qs·2^shift + 1/2 >= j`` with ``n = p + pool·bias``.
    """
    step = Fraction(2) ** (-shift - 1) / qs  # half an output step, in accumulator units
    return [ceil((2 * j - 1) * step) - pool * bias for j in range(1, levels + 1)]


def _fit_neuron(bounds: list[int]) -> tuple[int, float] | None:
    """Integer threshold and step whose Akida boundaries equal ``bounds`` (None if none do).

    Akida reaches level ``j`` iff ``p > threshold + (j-1)·step``, i.e. at
    ``floor(threshold + (j-1)·step) + 1``.
    """
    threshold = bounds[0] - 1
    if len(bounds) == 1:
        return threshold, 1.0
    lo = max(Fraction(b - bounds[0], j) for j, b in enumerate(bounds[1:], 1))
    hi = min(Fraction(b - bounds[0] + 1, j) for j, b in enumerate(bounds[1:], 1))
    if lo >= hi:
        return None
    return threshold, float((lo + hi) / 2)


def exact_thresholds(qmodel: keras.Model, ak_model: akida.Model) -> list[ThresholdReport]:
    """Set each Akida 1.0 neuron's threshold and step to reproduce ``qmodel``'s rounding.

    Parameters
    ----------
    qmodel : tf_keras.Model
        The quantized model ``ak_model`` was converted from (not changed).
    ak_model : akida.Model
        Its Akida 1.0 conversion, changed in place.

    Returns
    -------
    list[ThresholdReport]
        Per layer with an activation: neurons, how many changed, and how many have no exact
        integer solution (those keep cnn2snn's values; 0 after :func:`pow2_output_scales`).
    """
    from quantizeml.layers import QuantizedGlobalAveragePooling2D
    from quantizeml.models import record_quantization_variables

    record_quantization_variables(qmodel)
    names = {layer.name for layer in qmodel.layers}
    reports = []
    for ak_layer in ak_model.layers:
        try:
            if not ak_layer.parameters.activation or ak_layer.name not in names:
                continue
        except ValueError:  # layers without an activation parameter (input quantizer)
            continue
        block = _block_layers(qmodel.get_layer(ak_layer.name))
        main, quantizer = block[0], getattr(block[-1], "out_quantizer", None)
        if quantizer is None or getattr(quantizer, "qscales", None) is None:
            continue
        bits = int(ak_layer.parameters.act_bits)
        threshold = np.asarray(ak_layer.variables["threshold"]).astype(np.int64)
        act_step = np.asarray(ak_layer.variables["act_step"]).astype(np.float32)
        n = len(threshold)
        qs = np.broadcast_to(np.asarray(quantizer.qscales.value.values).astype(np.int64), (n,))
        shift = np.broadcast_to(np.asarray(quantizer.shift.value).astype(np.int64), (n,))
        bias = (np.asarray(main.bias_quantizer.qweights.value.values).astype(np.int64).ravel()
                if getattr(main, "use_bias", False) else np.zeros(n, np.int64))
        pools = [layer for layer in block if isinstance(layer, QuantizedGlobalAveragePooling2D)]
        pool = int(np.prod(pools[0].input_shape[1:3])) if pools else 1
        new_threshold, new_step, inexact = threshold.copy(), act_step.copy(), 0
        for c in range(n):
            bounds = _boundaries(int(qs[c]), int(shift[c]), int(bias[c]), pool, 2**bits - 1)
            fit = _fit_neuron(bounds)
            if fit is None:
                inexact += 1
                continue
            new_threshold[c] = fit[0]
            if bits > 1:  # a 1-bit neuron fires iff p > threshold, whatever its step
                new_step[c] = fit[1] * 2.0 ** (bits - 4)
        changed = int(np.sum((new_threshold != threshold) | (new_step != act_step)))
        ak_layer.variables["threshold"] = new_threshold.astype(np.int32)
        ak_layer.variables["act_step"] = new_step.astype(np.float32)
        reports.append(ThresholdReport(ak_layer.name, bits, n, changed, inexact))
        if inexact:
            log.warning("%s: %d of %d neurons have no exact Akida threshold (kept cnn2snn's)",
                        ak_layer.name, inexact, n)
    log.info("exact thresholds: %d neurons changed in %d layers",
             sum(r.changed for r in reports), len(reports))
    return reports


def restore_weights_after_spikes(qmodel: keras.Model, ak_model: akida.Model) -> list[str]:
    """Give each layer fed by a 1-bit layer the quantized model's integer weights again.

    When a layer's activation step exceeds 65535 cnn2snn clamps it and floor-divides the next
    layer's weights to compensate (``fix_v1_activation_variables``). After a 1-bit layer the
    step does not matter (a spike is a spike) but the division still truncates the weights;
    on full-width models the spike layer's step exceeds the limit and the classifier's logits
    drift by 1–3. Writing the quantized integer weights back removes that drift.

    Returns
    -------
    list[str]
        The Akida layers whose weights were restored (changed or not).
    """
    names = {layer.name for layer in qmodel.layers}
    restored = []
    layers = list(ak_model.layers)
    for prev, layer in zip(layers, layers[1:], strict=False):
        try:
            spikes = bool(prev.parameters.activation) and int(prev.parameters.act_bits) == 1
        except (ValueError, AttributeError):
            continue
        if not spikes or layer.name not in names:
            continue
        quantizer = getattr(qmodel.get_layer(layer.name), "weight_quantizer", None)
        qweights = getattr(quantizer, "qweights", None)
        if qweights is None or "weights" not in layer.get_variable_names():
            continue
        current = np.asarray(layer.variables["weights"])
        values = np.asarray(qweights.value.values).astype(current.dtype)
        if values.size != current.size:
            log.warning("%s: quantized weights %s do not fit Akida's %s; left as converted",
                        layer.name, values.shape, current.shape)
            continue
        layer.variables["weights"] = values.reshape(current.shape)
        restored.append(layer.name)
    return restored


def convert_exact(qmodel: keras.Model, variant: str | VariantInfo) -> akida.Model:
    """Convert ``qmodel`` so that the Akida model reproduces it bit for bit (Akida 1.0).

    On Akida 1.0 this releases ReLU clips that sit at their output range
    (:func:`common.pact.release_saturating_clips`; PACT puts them there) and applies
    :func:`pow2_output_scales` to ``qmodel`` **in place** (so
    evaluate ``qmodel`` after this call), converts with :func:`common.convert.convert_model`
    and fixes the thresholds with :func:`exact_thresholds`. Other targets are converted as
    they are.

    Returns
    -------
    akida.Model
        The converted model.
    """
    from common.convert import convert_model
    from common.models import get_variant
    from common.pact import release_saturating_clips

    info = get_variant(variant)
    if info.akida_version == "v1":
        release_saturating_clips(qmodel)  # PACT's clips sit at the range: Akida saturates
        pow2_output_scales(qmodel)
    ak_model = convert_model(qmodel, info)
    if info.akida_version == "v1":
        exact_thresholds(qmodel, ak_model)
        restore_weights_after_spikes(qmodel, ak_model)
    return ak_model
