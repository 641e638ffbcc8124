"""qana-akida2: QANA for the Akida 2.0 IP (Ghost concat, residual Add, additive attention)."""

from __future__ import annotations

from collections.abc import Callable

import tf_keras as keras

from common.models.blocks import (
    HEAD_DENSE,
    conv_bn_act,
    ghost_concat,
    init_upsamplers,
    sa_eca_additive,
    scale_channels,
    se_additive,
    stem,
)
from common.models.registry import StageSpec, VariantInfo, register_model, resolve_blocks

L = keras.layers

INFO = VariantInfo(
    name="qana-akida2",
    target="akida2",
    akida_version="v2",
    weight_bits=8,
    activation_bits=8,
    input_bits=8,
    edge_learning=False,
    description=(
        "QANA for the Akida 2.0 IP: Ghost modules with concatenation, residual Ghost "
        "bottlenecks, additive spatially-aware ECA (hard_silu) and additive SE; 8-bit; "
        "inference only."
    ),
    stem_channels=32,
    stages=(
        StageSpec(32, stride=1, attention="eca", residual=True),
        StageSpec(64, attention="eca", residual=True),
        StageSpec(128, attention="eca", residual=True),
        StageSpec(256, attention="eca", residual=True),
    ),
    head_channels=256,
    se=True,
)


def build_graph(
    info: VariantInfo,
    *,
    input_size: int,
    num_classes: int,
    width: float,
    stages: tuple[StageSpec, ...],
    act: str,
    eca: Callable,
    se: Callable,
) -> keras.Model:
    """Build the graph QANA shared by qana-akida2 and qana-float.

    Stem; per stage a depthwise(stride)+pointwise downsampling, Ghost blocks (residual
    bottleneck ``x + ghost2(ghost1(x))`` when ``stage.residual``) each followed by ``eca``; the
    spike-compatible transformation ``se`` (prefix ``sct``); head 1×1 conv → BN → ``act`` →
    GAP → Dense.
    """
    resolve_blocks(info, stages, ("ghost",))
    inputs = L.Input((input_size, input_size, 3), name="input")
    channels = scale_channels(info.stem_channels, width)
    x = stem(inputs, channels)
    for i, stage in enumerate(stages, 1):
        out = scale_channels(stage.channels, width)
        if stage.stride != 1 or out != channels:
            x = conv_bn_act(x, None, 3, f"s{i}_down_dw", stride=stage.stride, act=act, kind="dw")
            x = conv_bn_act(x, out, 1, f"s{i}_down_pw", act=act)
        for b in range(stage.blocks):
            prefix = f"s{i}_b{b}"
            if stage.residual:
                y = ghost_concat(x, out, f"{prefix}_g1", act=act)
                y = ghost_concat(y, out, f"{prefix}_g2", act=None)
                x = L.Add(name=f"{prefix}_add")([x, y])
            else:
                x = ghost_concat(x, out, prefix, act=act)
            if stage.attention == "eca":
                x = eca(x, prefix)
        channels = out
    if info.se:
        x = se(x, "sct")
    x = conv_bn_act(x, scale_channels(info.head_channels, width), 1, "head_conv", act=act)
    x = L.GlobalAveragePooling2D(name="head_pool")(x)
    outputs = L.Dense(num_classes, name=HEAD_DENSE)(x)
    return keras.Model(inputs, outputs, name=info.name.replace("-", "_"))


@register_model(INFO)
def qana_akida2(
    info: VariantInfo,
    *,
    input_size: int,
    num_classes: int,
    width: float,
    stages: tuple[StageSpec, ...],
    seed: int = 0,
) -> keras.Model:
    """Build the Akida 2.0 QANA with additive attention (no tensor×tensor multiply)."""
    model = build_graph(
        info,
        input_size=input_size,
        num_classes=num_classes,
        width=width,
        stages=stages,
        act="relu6",
        eca=sa_eca_additive,
        se=se_additive,
    )
    init_upsamplers(model)
    return model
