"""qana-float: the paper's QANA blocks as published (multiplicative SE/ECA), float reference."""

from __future__ import annotations

import tf_keras as keras

from common.models.blocks import sa_eca_multiplicative, se_multiplicative
from common.models.qana_akida2 import INFO as AKIDA2_INFO
from common.models.qana_akida2 import build_graph
from common.models.registry import StageSpec, VariantInfo, register_model

INFO = VariantInfo(
    name="qana-float",
    target="float",
    akida_version=None,
    weight_bits=None,
    activation_bits=None,
    input_bits=None,
    edge_learning=False,
    description=(
        "Float reference QANA as published: residual Ghost modules, multiplicative "
        "spatially-aware ECA (Conv1D + sigmoid gates) and SE; not convertible to Akida."
    ),
    stem_channels=AKIDA2_INFO.stem_channels,
    stages=AKIDA2_INFO.stages,
    head_channels=AKIDA2_INFO.head_channels,
    se=True,
)


@register_model(INFO)
def qana_float(
    info: VariantInfo,
    *,
    input_size: int,
    num_classes: int,
    width: float,
    stages: tuple[StageSpec, ...],
    seed: int = 0,
) -> keras.Model:
    """Build the float QANA with ReLU, multiplicative SA-ECA and SE."""
    return build_graph(
        info,
        input_size=input_size,
        num_classes=num_classes,
        width=width,
        stages=stages,
        act="relu",
        eca=sa_eca_multiplicative,
        se=se_multiplicative,
    )
