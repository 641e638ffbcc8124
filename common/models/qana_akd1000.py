"""qana-akd1000: strictly sequential QANA for Akida 1.0 (AKD1000/AKD1500) with edge learning."""

from __future__ import annotations

import tf_keras as keras

from common.models.blocks import (
    conv_bn_act,
    ghost_folded,
    init_ghost_folds,
    scale_channels,
    spike_head,
    stem,
)
from common.models.registry import StageSpec, VariantInfo, register_model, resolve_blocks

L = keras.layers

INFO = VariantInfo(
    name="qana-akd1000",
    target="akd1000",
    akida_version="v1",
    weight_bits=4,
    activation_bits=4,
    input_bits=8,
    edge_learning=True,
    description=(
        "Sequential QANA for Akida 1.0: folded Ghost modules, bounded ReLUs, separable "
        "downsampling, 1-bit spike generator before the head; 8/4/4 bits; on-chip learning."
    ),
    stem_channels=32,
    stages=(
        StageSpec(32, stride=1),
        StageSpec(64),
        StageSpec(128),
        StageSpec(256),
    ),
    head_channels=256,
)


@register_model(INFO)
def qana_akd1000(
    info: VariantInfo,
    *,
    input_size: int,
    num_classes: int,
    width: float,
    stages: tuple[StageSpec, ...],
    seed: int = 0,
) -> keras.Model:
    """Build the Akida 1.0 QANA: stem, Ghost stages, SepConv→BN→GAP→spike→Dense head."""
    resolve_blocks(info, stages, ("ghost",))
    inputs = L.Input((input_size, input_size, 3), name="input")
    channels = scale_channels(info.stem_channels, width)
    x = stem(inputs, channels)
    for i, stage in enumerate(stages, 1):
        out = scale_channels(stage.channels, width)
        if stage.stride != 1 or out != channels:
            x = conv_bn_act(x, out, 3, f"s{i}_down", stride=stage.stride, kind="sep")
        for b in range(stage.blocks):
            x = ghost_folded(x, out, f"s{i}_b{b}")
        channels = out
    # Spike-compatible transformation and projection head, ending in the 1-bit spikes
    # on-chip learning needs.
    outputs = spike_head(x, scale_channels(info.head_channels, width), num_classes)
    model = keras.Model(inputs, outputs, name=info.name.replace("-", "_"))
    init_ghost_folds(model, seed)
    return model
