"""akidanet-akd1000: AkidaNet-style baseline for Akida 1.0, sized like qana-akd1000."""

from __future__ import annotations

import tf_keras as keras

from common.models.blocks import conv_bn_act, scale_channels, spike_head, stem
from common.models.registry import StageSpec, VariantInfo, register_model, resolve_blocks

L = keras.layers

#: Block types this variant builds; the first is the default of a stage with ``block=None``.
BLOCKS = ("sep", "conv")

INFO = VariantInfo(
    name="akidanet-akd1000",
    target="akd1000",
    akida_version="v1",
    weight_bits=4,
    activation_bits=4,
    input_bits=8,
    edge_learning=True,
    description=(
        "Baseline: AkidaNet-style plain CNN for Akida 1.0 (3×3 conv stem and blocks, then "
        "separable blocks, BN + ReLU(6), no Ghost modules); same head, spike generator, "
        "bits, strides and input sizes as qana-akd1000; on-chip learning."
    ),
    stem_channels=32,
    stages=(
        StageSpec(64, stride=1, block="conv"),
        StageSpec(128, blocks=2, block="conv"),
        StageSpec(256, blocks=2, block="sep"),
        StageSpec(512, blocks=1, block="sep"),
    ),
    head_channels=256,
)


@register_model(INFO)
def akidanet_akd1000(
    info: VariantInfo,
    *,
    input_size: int,
    num_classes: int,
    width: float,
    stages: tuple[StageSpec, ...],
    seed: int = 0,
) -> keras.Model:
    """Build the AkidaNet-style Akida 1.0 baseline.

    Like BrainChip's AkidaNet: a plain 3×3 convolution stem, standard 3×3 convolution blocks
    while the maps are large, then depthwise-separable blocks, each ``conv → BN → ReLU(6)``,
    with the stride on the first block of a stage. AkidaNet's 1024-channel stride-2 stage
    and its stack of 512-channel blocks are dropped so that the total stride (16), the input
    sizes and the size match qana-akd1000; the head is qana-akd1000's
    (SepConv → BN → GAP → 1-bit spike generator → Dense), so on-chip learning works the
    same way.

    Layers: ``stem_*``, per stage ``i`` and block ``b`` the block ``s{i}_b{b}`` with
    ``s{i}_b{b}_bn`` and ``s{i}_b{b}_relu``, then ``head_*``.

    Parameters at 7 classes (``count_params()``, BN statistics included; independent of the
    input size): width 1.0: 619,623 (qana-akd1000: 556,551, so +11.3 %); width 0.5: 159,799
    (142,343); width 0.25: 42,399 (37,191).

    ``seed`` is accepted for the registry's signature; this variant has no seeded init.
    """
    kinds = resolve_blocks(info, stages, BLOCKS)
    inputs = L.Input((input_size, input_size, 3), name="input")
    x = stem(inputs, scale_channels(info.stem_channels, width))
    for i, (stage, kind) in enumerate(zip(stages, kinds, strict=True), 1):
        out = scale_channels(stage.channels, width)
        for b in range(stage.blocks):
            stride = stage.stride if b == 0 else 1
            x = conv_bn_act(x, out, 3, f"s{i}_b{b}", stride=stride, kind=kind)
    outputs = spike_head(x, scale_channels(info.head_channels, width), num_classes)
    return keras.Model(inputs, outputs, name=info.name.replace("-", "_"))
