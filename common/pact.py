"""PACT: a learnable activation clip α per bounded ReLU, baked into ``ReLU(max_value=α)`` for Akida.

PACT (Choi et al., 2018, arXiv 1805.06085) replaces ``ReLU(max_value=6)`` by
``y = clip(x, 0, α)`` with a trainable α per layer and an L2 penalty on α, so that the activation
range used by quantization is learned instead of fixed. The gradient of ``y`` with respect to α
is 1 where ``x >= α`` and 0 elsewhere; with respect to ``x`` it is 1 on ``0 < x < α``.

How the learned α reaches quantization (measured on quantizeml 1.2.5): ``quantize`` turns each
``ReLU(max_value=α)`` into a ``QuantizedReLU`` that clips at α (aligned to its input's fixed-point
grid), and calibration sets the output quantizer's range to the observed maximum of the float
activations — at most α, and exactly α once a calibration batch saturates. Cross-layer
equalization then stores that range as a power-of-two ``range_max`` times a ``rescaling_rate``
(and divides the next layer's weights by the rate), so the *effective* 4-bit range
``range_max / rescaling_rate`` equals the calibrated value: α needs no power-of-two rounding.
:func:`effective_ranges` reads it back. On Akida 1.0 the ReLU bound itself is not transferred:
the converted layer saturates at its 4-bit output range, which is the calibrated α.

Akida 1.0 parity: an Akida 1.0 layer has no clip, only saturation at its top output level.
quantizeml clips at α aligned to the input grid of each channel, and when α *is* the calibrated
range (what PACT makes the norm) that clip can land a rounding step below the top level's
boundary: quantizeml then outputs 14 where Akida outputs 15 (measured: 0.6 % of the stem's
activations, top-1 agreement 0.81 on 32 images). With the clips of such layers removed the
same model converts bit for bit (every layer 0 mismatch, agreement 1.0 on the same images).
:func:`release_saturating_clips` moves them out of reach (cnn2snn wants a bound on Akida 1.0
but does not use it); the output quantizer still saturates at α.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import tensorflow as tf
import tf_keras as keras

from common.errors import ConfigError, ModelError
from common.log import get_logger
from common.models import SPIKE_LAYER

log = get_logger("pact")

#: Smallest α training may reach (α → 0 would silence the layer for good).
MIN_ALPHA = 1e-2
#: A released clip sits at this multiple of its output range (never reached before saturation).
RELEASE_FACTOR = 2.0


@keras.saving.register_keras_serializable(package="qanafed")
class MinValue(keras.constraints.Constraint):
    """Keep a weight at or above ``min_value``."""

    def __init__(self, min_value: float = MIN_ALPHA) -> None:
        self.min_value = float(min_value)

    def __call__(self, w):
        """Clip ``w`` from below."""
        return tf.maximum(w, self.min_value)

    def get_config(self) -> dict:
        """Return ``{"min_value": ...}``."""
        return {"min_value": self.min_value}


@keras.saving.register_keras_serializable(package="qanafed")
class PACTReLU(keras.layers.Layer):
    """ReLU clipped at a learnable α: ``y = clip(x, 0, α)`` (PACT).

    Parameters
    ----------
    alpha_init : float (default: 6.0)
        Initial clip level; must be > 0.
    l2 : float (default: 1e-4)
        L2 penalty ``l2 · α²`` added to the model's losses (0 disables it).
    **kwargs
        Keras layer arguments (``name`` ...).

    Raises
    ------
    ConfigError
        If ``alpha_init <= 0`` or ``l2 < 0``.
    """

    def __init__(self, alpha_init: float = 6.0, l2: float = 1e-4, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_alpha(alpha_init)
        if not l2 >= 0:
            raise ConfigError(f"PACT l2={l2} is negative", "use 0 (no penalty) or e.g. 1e-4")
        self.alpha_init = float(alpha_init)
        self.l2 = float(l2)

    def build(self, input_shape) -> None:
        """Create the scalar α."""
        self.alpha = self.add_weight(
            name="alpha",
            shape=(),
            initializer=keras.initializers.Constant(self.alpha_init),
            regularizer=keras.regularizers.L2(self.l2) if self.l2 > 0 else None,
            constraint=MinValue(MIN_ALPHA),
            trainable=True,
        )
        super().build(input_shape)

    def call(self, inputs):
        """Return ``min(relu(x), α)``: gradient 1 to α where the input saturates."""
        alpha = tf.cast(self.alpha, inputs.dtype)
        return tf.minimum(tf.nn.relu(inputs), alpha)

    def compute_output_shape(self, input_shape):
        """Return the input shape (elementwise layer)."""
        return input_shape

    def get_config(self) -> dict:
        """Return the layer config (``alpha_init``, ``l2``)."""
        return {**super().get_config(), "alpha_init": self.alpha_init, "l2": self.l2}


def _check_alpha(alpha: float | None) -> None:
    if alpha is not None and not (np.isfinite(alpha) and alpha > 0):
        raise ConfigError(
            f"PACT alpha_init={alpha} is not a positive number",
            "use alpha_init > 0 (e.g. 6.0, the ReLU6 bound), or None to start from each "
            "ReLU's own max_value",
        )


def _is_pact_target(layer: keras.layers.Layer, exclude: Collection[str]) -> bool:
    return (
        type(layer) is keras.layers.ReLU
        and layer.max_value is not None
        and layer.name not in exclude
        and float(layer.negative_slope) == 0.0
        and float(layer.threshold) == 0.0
    )


def _clone_copying_weights(model: keras.Model, clone_function) -> keras.Model:
    """Clone ``model`` with ``clone_function`` and copy every unchanged layer's weights by name."""
    clone = keras.models.clone_model(model, clone_function=clone_function)
    for layer in clone.layers:
        try:
            source = model.get_layer(layer.name)
        except ValueError:
            continue
        if type(source) is type(layer) and source.weights:
            layer.set_weights(source.get_weights())
    return clone


def apply_pact(
    model: keras.Model,
    alpha_init: float | None = None,
    l2: float = 1e-4,
    exclude: Collection[str] = (SPIKE_LAYER,),
) -> keras.Model:
    """Clone ``model`` with every bounded ReLU replaced by a :class:`PACTReLU` of the same name.

    Parameters
    ----------
    model : tf_keras.Model
        A float model, e.g. from :func:`common.models.create_model` (not yet quantized).
    alpha_init : float | None (default: None)
        Initial α of every PACT layer; None starts each at its ReLU's ``max_value`` (6 in QANA).
    l2 : float (default: 1e-4)
        L2 penalty on α, part of ``model.losses`` (hence of the training loss).
    exclude : Collection[str] (default: ("head_spike",))
        ReLU names kept as they are. The Akida 1.0 spike generator ``head_spike`` (ReLU max 1,
        quantized to 1 bit) must stay fixed.

    Returns
    -------
    tf_keras.Model
        A new, uncompiled model sharing no variables with ``model``; all other weights copied.
        ReLUs without ``max_value`` and non-ReLU activations are left alone (a model with no
        bounded ReLU, e.g. the hard-SiLU ``qana-akida2``, comes back unchanged with a warning).

    Raises
    ------
    ConfigError
        If ``alpha_init <= 0`` or ``l2 < 0``.
    """
    _check_alpha(alpha_init)
    if not l2 >= 0:
        raise ConfigError(f"PACT l2={l2} is negative", "use 0 (no penalty) or e.g. 1e-4")
    replaced: list[str] = []

    def clone_function(layer: keras.layers.Layer) -> keras.layers.Layer:
        if _is_pact_target(layer, exclude):
            replaced.append(layer.name)
            alpha = float(layer.max_value) if alpha_init is None else alpha_init
            return PACTReLU(alpha, l2=l2, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    clone = _clone_copying_weights(model, clone_function)
    if replaced:
        log.info("PACT: %d learnable clips in %s (%s)", len(replaced), model.name,
                 ", ".join(replaced))
    else:
        log.warning("PACT: %s has no bounded ReLU outside %s; model unchanged",
                    model.name, sorted(exclude))
    return clone


def pact_alphas(model: keras.Model) -> dict[str, float]:
    """Return ``{layer name: α}`` of every PACT layer of ``model`` (in layer order)."""
    return {
        layer.name: float(layer.alpha.numpy())
        for layer in model.layers
        if isinstance(layer, PACTReLU)
    }


def bake_pact(model: keras.Model) -> keras.Model:
    """Clone ``model`` with every :class:`PACTReLU` replaced by ``ReLU(max_value=learned α)``.

    The result is an ordinary QANA model: ``quantize_model`` calibrates each ReLU's output
    range to at most α (see the module docstring) and ``convert_model`` converts it.

    Parameters
    ----------
    model : tf_keras.Model
        Output of :func:`apply_pact`, trained.

    Returns
    -------
    tf_keras.Model
        A new, uncompiled model with the same layer names and weights.

    Raises
    ------
    ModelError
        If ``model`` has no PACT layer (nothing to bake: pass the model on as it is).
    """
    alphas = pact_alphas(model)
    if not alphas:
        raise ModelError(
            f"model {model.name!r} has no PACTReLU layer to bake",
            "call bake_pact only on a model returned by apply_pact",
        )

    def clone_function(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, PACTReLU):
            # float32 → Python float keeps the exact learned value in the saved config.
            return keras.layers.ReLU(max_value=alphas[layer.name], name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    baked = _clone_copying_weights(model, clone_function)
    log.info("PACT baked into %s: %s", model.name,
             ", ".join(f"{k}={v:.3f}" for k, v in alphas.items()))
    return baked


def effective_ranges(qmodel: keras.Model) -> dict[str, float]:
    """Return the effective output range of every quantized ReLU of ``qmodel``.

    The range is ``range_max / rescaling_rate`` of the layer's output quantizer (largest over
    channels for a per-axis quantizer): the float value that maps to the largest integer
    (calibration stores a power-of-two ``range_max`` and folds the ratio into the next layer).
    """
    out: dict[str, float] = {}
    for layer in qmodel.layers:
        quantizer = getattr(layer, "out_quantizer", None)
        if quantizer is None or type(layer).__name__ != "QuantizedReLU":
            continue
        out[layer.name] = _effective_range(quantizer)
    return out


def _effective_range(quantizer) -> float:
    """``range_max / rescaling_rate`` of an output quantizer (largest over channels)."""
    ratio = np.asarray(quantizer.range_max.numpy()) / np.asarray(quantizer.rescaling_rate.numpy())
    return float(np.max(ratio))


def release_saturating_clips(qmodel: keras.Model) -> list[str]:
    """Move the clip of every multi-bit quantized ReLU whose output range ends at it out of reach.

    Such a clip is redundant (the output quantizer saturates at the range first) except for a
    rounding step at the top, where it disagrees with Akida 1.0, which has no clip (see the
    module docstring). Its ``max_value`` becomes ``RELEASE_FACTOR`` × the output range: cnn2snn
    needs a bounded ReLU on Akida 1.0 but does not use the bound, and the output still
    saturates at the range (α). Apply it to a quantized Akida 1.0 model after QAT and before
    conversion; it changes the quantized model only in that rounding step, towards what the
    Akida model computes. 1-bit (spike) layers and clips below the range are left alone.

    Parameters
    ----------
    qmodel : tf_keras.Model
        A quantized model (from :func:`common.quantize.quantize_model`), changed in place.

    Returns
    -------
    list[str]
        Names of the layers whose clip was removed.
    """
    released = []
    for layer in qmodel.layers:
        quantizer = getattr(layer, "out_quantizer", None)
        if (type(layer).__name__ != "QuantizedReLU" or layer.max_value is None
                or quantizer is None or int(quantizer.bitwidth) < 2):
            continue
        top = _effective_range(quantizer)
        if top <= float(layer.max_value) * (1 + 1e-6):
            layer.max_value = RELEASE_FACTOR * top
            released.append(layer.name)
    if released:
        log.info("released %d saturating ReLU clips (Akida 1.0 saturates instead): %s",
                 len(released), ", ".join(released))
    return released
