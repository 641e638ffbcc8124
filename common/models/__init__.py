"""QANA model family: variant registry, builders and Akida compatibility checks."""

from common.models import (  # noqa: F401  (registration)
    akidanet_akd1000,
    qana_akd1000,
    qana_akida2,
    qana_float,
)
from common.models.blocks import (
    HEAD_DENSE,
    SPIKE_LAYER,
    GhostFold,
    SpikeReLU,
    fold_ghost,
    spike_as_relu,
)
from common.models.compat import check_convertible
from common.models.registry import (
    StageSpec,
    VariantInfo,
    create_model,
    get_variant,
    list_variants,
    register_model,
)

__all__ = [
    "HEAD_DENSE",
    "SPIKE_LAYER",
    "GhostFold",
    "SpikeReLU",
    "StageSpec",
    "VariantInfo",
    "check_convertible",
    "create_model",
    "fold_ghost",
    "get_variant",
    "list_variants",
    "register_model",
    "spike_as_relu",
]
