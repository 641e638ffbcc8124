"""Variant table, registry and builder entry point of the QANA model family."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import tf_keras as keras

from common.errors import ModelError
from common.log import get_logger

log = get_logger("models")

Target = Literal["akd1000", "akida2", "float"]

#: Largest spatial area GlobalAveragePooling accepts on Akida (W·H <= 144, i.e. 12×12).
MAX_GAP_AREA = 144
#: Smallest GAP input side AKD1000 can map ("the output of the convolution must have at least
#: 3 rows"), measured with akida 2.19.3.
MIN_GAP_SIDE_V1 = 3
#: Largest input size accepted for the float reference.
MAX_FLOAT_SIZE = 512


@dataclass(frozen=True)
class StageSpec:
    """One backbone stage.

    Parameters
    ----------
    channels : int
        Output channels at width 1.0.
    blocks : int (default: 1)
        Ghost blocks in the stage (overridden by ``create_model(depth=...)``).
    stride : int (default: 2)
        Stride of the stage's downsampling convolution (1: no downsampling).
    attention : str | None (default: None)
        ``"eca"`` for spatially-aware ECA after each block, None for none.
    residual : bool (default: False)
        Whether each block is a residual Ghost bottleneck (needs Add: not on Akida 1.0).
    block : str | None (default: None)
        Block type: ``"ghost"`` (QANA), ``"conv"`` (3×3 convolution) or ``"sep"`` (3×3
        separable convolution, AkidaNet); None means the variant's own default block.
    """

    channels: int
    blocks: int = 1
    stride: int = 2
    attention: str | None = None
    residual: bool = False
    block: str | None = None


@dataclass(frozen=True)
class VariantInfo:
    """What a registered variant is, what it targets and which inputs it accepts."""

    name: str
    target: Target
    akida_version: str | None
    weight_bits: int | None
    activation_bits: int | None
    input_bits: int | None
    edge_learning: bool
    description: str
    stem_channels: int = 32
    stages: tuple[StageSpec, ...] = ()
    head_channels: int = 256
    se: bool = False
    allowed_sizes: tuple[int, ...] = field(default=())

    @property
    def convertible(self) -> bool:
        """Whether this variant is meant to be quantized and converted to Akida."""
        return self.target != "float"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready description (stage table included)."""
        out = dataclasses.asdict(self)
        out["stages"] = [dataclasses.asdict(s) for s in self.stages]
        out["allowed_sizes"] = list(self.allowed_sizes)
        return out


Builder = Callable[..., keras.Model]
_REGISTRY: dict[str, tuple[VariantInfo, Builder]] = {}


def total_stride(stages: Sequence[StageSpec]) -> int:
    """Downsampling factor of stem (2) and stages."""
    stride = 2
    for stage in stages:
        stride *= stage.stride
    return stride


def allowed_sizes(target: Target, stages: Sequence[StageSpec], se: bool = False) -> tuple[int, ...]:
    """Input sizes a target can run for a stage table.

    Sizes are multiples of the total stride; on Akida the GAP input must be <= 12×12 (and at
    least 3×3 on AKD1000), and the additive SE broadcast (Akida 2.0) needs a power-of-two
    final feature map.
    """
    step = total_stride(stages)
    sizes = []
    for size in range(step, MAX_FLOAT_SIZE + 1, step):
        side = size // step
        if target != "float" and side * side > MAX_GAP_AREA:
            break
        if target != "float" and se and side & (side - 1):
            continue
        if target == "akd1000" and side < MIN_GAP_SIDE_V1:
            continue
        sizes.append(size)
    return tuple(sizes)


def resolve_blocks(
    info: VariantInfo, stages: Sequence[StageSpec], allowed: tuple[str, ...]
) -> tuple[str, ...]:
    """Return each stage's block type, ``allowed[0]`` where a stage leaves it None.

    Raises
    ------
    ModelError
        A block type the variant does not build, or (on Akida 1.0) a residual or attention
        stage, which needs Add/Multiply.
    """
    blocks = []
    for i, stage in enumerate(stages, 1):
        if info.akida_version == "v1" and (stage.residual or stage.attention):
            raise ModelError(
                f"stage {i} of {info.name} asks for residual={stage.residual}, "
                f"attention={stage.attention!r}: Akida 1.0 graphs are strictly sequential "
                "(no Add/Concatenate/Multiply)",
                "use residual=False, attention=None, or the qana-akida2 variant",
            )
        block = stage.block or allowed[0]
        if block not in allowed:
            raise ModelError(
                f"stage {i} of {info.name} asks for block={stage.block!r}",
                f"use one of {list(allowed)} (or None for {allowed[0]!r})",
            )
        blocks.append(block)
    return tuple(blocks)


def register_model(info: VariantInfo) -> Callable[[Builder], Builder]:
    """Register a builder ``fn(info, *, input_size, num_classes, width, stages, seed)``.

    The variant's ``allowed_sizes`` are derived from its stage table when left empty.
    """

    def decorator(fn: Builder) -> Builder:
        if info.name in _REGISTRY:
            raise ModelError(f"model variant {info.name!r} is registered twice")
        full = info
        if not info.allowed_sizes:
            sizes = allowed_sizes(info.target, info.stages, info.se)
            full = dataclasses.replace(info, allowed_sizes=sizes)
        _REGISTRY[info.name] = (full, fn)
        return fn

    return decorator


def list_variants() -> list[VariantInfo]:
    """Return every registered variant, sorted by name."""
    return [info for _, (info, _) in sorted(_REGISTRY.items())]


def get_variant(variant: str | VariantInfo) -> VariantInfo:
    """Resolve a variant name (or pass a VariantInfo through); ModelError if unknown."""
    if isinstance(variant, VariantInfo):
        return variant
    if variant not in _REGISTRY:
        raise ModelError(
            f"unknown model variant {variant!r}",
            f"use one of {sorted(_REGISTRY)} (see `qanafed model list`)",
        )
    return _REGISTRY[variant][0]


def _check_size(info: VariantInfo, stages: Sequence[StageSpec], input_size: int) -> None:
    sizes = allowed_sizes(info.target, stages, info.se)
    if input_size in sizes:
        return
    step = total_stride(stages)
    side = input_size / step
    if info.target != "float" and input_size % step == 0 and side * side > MAX_GAP_AREA:
        why = (
            f"its GlobalAveragePooling input would be {int(side)}×{int(side)} > 12×12, "
            "which Akida cannot run"
        )
        fix = (
            f"use one of {list(sizes)}, or pass stages=... with one more stride-2 stage "
            f"(total stride {step * 2})"
        )
    elif info.target == "akd1000" and input_size % step == 0 and side < MIN_GAP_SIDE_V1:
        why = (
            f"its GlobalAveragePooling input would be {int(side)}×{int(side)}; AKD1000 maps "
            f"GAP only on >= {MIN_GAP_SIDE_V1}×{MIN_GAP_SIDE_V1} maps"
        )
        fix = f"use one of {list(sizes)}, or pass stages=... with fewer stride-2 stages"
    elif input_size % step:
        why = f"it is not a multiple of the total stride {step}"
        fix = f"use one of {list(sizes)}"
    else:
        why = (
            f"the additive SE needs a power-of-two final map, got {int(side)}×{int(side)}"
        )
        fix = f"use one of {list(sizes)}"
    raise ModelError(
        f"input_size={input_size} is not allowed for {info.name} ({info.target}): {why}", fix
    )


def create_model(
    name: str,
    *,
    input_size: int = 64,
    num_classes: int = 7,
    width: float = 1.0,
    depth: int | None = None,
    **kw: Any,
) -> keras.Model:
    """Build a registered QANA variant as a tf_keras model taking raw 0–255 pixels.

    Parameters
    ----------
    name : str
        Registered variant name, e.g. ``"qana-akd1000"`` (see :func:`list_variants`).
    input_size : int (default: 64)
        Square input side in pixels; must be in the variant's ``allowed_sizes``.
    num_classes : int (default: 7)
        Number of output logits (7 for HAM10000, 8 for Kvasir).
    width : float (default: 1.0)
        Channel multiplier (channels rounded to multiples of 4).
    depth : int | None (default: None)
        Ghost blocks per stage; None keeps the variant's stage table.
    **kw
        ``stages`` (a sequence of :class:`StageSpec` replacing the table) and ``seed``
        (int, default 0, for the deterministic Ghost-fold initialisation).

    Returns
    -------
    tf_keras.Model
        Uncompiled model named after the variant with logits output ``(None, num_classes)``.

    Raises
    ------
    ModelError
        Unknown variant, or a size / class count / width / depth the target cannot run.
    """
    info = get_variant(name)
    _, builder = _REGISTRY[info.name]
    stages = tuple(kw.pop("stages", info.stages))
    seed = int(kw.pop("seed", 0))
    if kw:
        raise ModelError(
            f"unknown create_model option(s) {sorted(kw)} for {info.name}",
            "allowed: input_size, num_classes, width, depth, stages, seed",
        )
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(f"num_classes={num_classes!r} is invalid", "pass an int >= 2")
    if not width > 0:
        raise ModelError(f"width={width!r} is invalid", "pass a positive multiplier, e.g. 1.0")
    if depth is not None:
        if not isinstance(depth, int) or depth < 1:
            raise ModelError(f"depth={depth!r} is invalid", "pass an int >= 1 or None")
        stages = tuple(dataclasses.replace(s, blocks=depth) for s in stages)
    _check_size(info, stages, input_size)
    model = builder(
        info,
        input_size=input_size,
        num_classes=num_classes,
        width=width,
        stages=stages,
        seed=seed,
    )
    log.debug("built %s: %d params at %d px", info.name, model.count_params(), input_size)
    return model
