"""Walk a Keras model and refuse, by layer name, what its Akida target cannot run."""

from __future__ import annotations

import tf_keras as keras

from common.errors import ModelError
from common.models.registry import MAX_GAP_AREA, VariantInfo, get_variant

L = keras.layers

_PASS_THROUGH = (L.InputLayer, L.BatchNormalization, L.Dropout)
_MULTI_INPUT = (L.Add, L.Concatenate, L.Multiply, L.Subtract, L.Average, L.Maximum, L.Minimum)
_FUSED_OK = ("linear", "relu")


def _quantizable_class_names() -> set[str]:
    from quantizeml.layers.layers_base import _GLOBAL_LAYER_TO_QLAYER

    return set(_GLOBAL_LAYER_TO_QLAYER)


def _problem(layer: keras.layers.Layer, version: str) -> str | None:
    """Why ``layer`` cannot run on Akida ``version`` ("v1" | "v2"), or None if it can."""
    from quantizeml.layers import Activation as QActivation

    from common.models.blocks import SpikeReLU

    kind = type(layer).__name__
    if isinstance(layer, SpikeReLU):
        return None  # quantized as ReLU(1.0) with a 1-bit output (see spike_as_relu)
    if isinstance(layer, L.Multiply):
        return (
            "multiplies two tensors (sigmoid/hard-sigmoid gating as in SE/ECA): neither Akida "
            "version can; quantizeml inserts a Dequantizer and convert() may silently truncate "
            "the model"
        )
    if isinstance(layer, L.Conv1D):
        return "Conv1D does not quantize (ECA's channel convolution); use a 1×1 Conv2D"
    fused = getattr(layer, "activation", None)
    if fused is not None and not isinstance(layer, (L.Activation, QActivation)):
        fused_name = keras.activations.serialize(fused)
        fused_name = fused_name if isinstance(fused_name, str) else str(fused_name)
        if fused_name not in _FUSED_OK:
            return f"has a fused {fused_name!r} activation that does not quantize"
    if isinstance(layer, L.Activation) and keras.activations.serialize(layer.activation) != "relu":
        return (
            f"Keras Activation({keras.activations.serialize(layer.activation)!r}) does not "
            "quantize; use ReLU(max_value=...) or quantizeml Activation('hard_silu'|'swish')"
        )
    if isinstance(layer, _PASS_THROUGH):
        return None
    if kind not in _quantizable_class_names() and not isinstance(layer, QActivation):
        return f"{kind} has no quantized equivalent in quantizeml"
    if isinstance(layer, L.GlobalAveragePooling2D):
        _, h, w, _ = layer.input_shape
        if h is not None and w is not None and h * w > MAX_GAP_AREA:
            return f"GlobalAveragePooling input is {h}×{w}; Akida accepts at most 12×12"
    if version == "v1":
        if isinstance(layer, _MULTI_INPUT):
            return f"{kind} merges branches; Akida 1.0 graphs are strictly sequential"
        if kind in ("DepthwiseConv2D", "DepthwiseConv2DTranspose", "Conv2DTranspose"):
            return f"{kind} does not convert on Akida 1.0; use SeparableConv2D"
        if isinstance(layer, QActivation):
            return f"Activation({layer.activation!r}) exists only on Akida 2.0"
        unbounded = isinstance(layer, L.ReLU) and layer.max_value is None
        if unbounded or isinstance(layer, L.Activation):
            return "unbounded ReLU is not supported on Akida 1.0; set max_value (e.g. 6)"
    if version == "v2" and isinstance(layer, L.SeparableConv2D):
        return "SeparableConv2D does not convert on Akida 2.0; split it into DepthwiseConv2D + 1×1"
    return None


def check_convertible(model: keras.Model, variant: str | VariantInfo) -> None:
    """Raise ModelError naming the first layer ``variant``'s Akida target cannot run.

    Parameters
    ----------
    model : tf_keras.Model
        A float model (before quantization).
    variant : str | VariantInfo
        Target variant; a ``float`` target is refused outright, naming the first layer that
        would also block conversion to Akida 2.0 (or the variant when there is none).

    Raises
    ------
    ModelError
        Naming the offending layer, its type and the reason.
    """
    info = get_variant(variant)
    version = info.akida_version or "v2"
    problems = [(layer, why) for layer in model.layers if (why := _problem(layer, version))]
    where = f"model {model.name!r}"
    if problems:
        layer, why = problems[0]
        more = f" ({len(problems) - 1} more offending layers)" if len(problems) > 1 else ""
        raise ModelError(
            f"{where} cannot be converted for {info.name} ({info.target}): layer "
            f"{layer.name!r} ({type(layer).__name__}) {why}{more}",
            "build the model with create_model('qana-akd1000' | 'qana-akida2') for Akida",
        )
    if not info.convertible:
        raise ModelError(
            f"{where}: variant {info.name!r} is a float reference and is never converted",
            "quantize/convert a 'qana-akd1000' or 'qana-akida2' model instead",
        )
