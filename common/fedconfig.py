"""Scenario configuration of a federated run, validated from YAML (kebab-case keys)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .tta import MAX_TTA

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian", "fedtrimmedavg",
              "krum")
#: Server learning rate of each server-optimizer strategy when ``strategy.server-lr`` is unset.
SERVER_LR_DEFAULTS = {"fedadam": 3e-2, "fedyogi": 3e-2, "fedavgm": 0.1}
VARIANTS = ("qana-akd1000", "qana-akida2", "qana-float", "akidanet-akd1000")
SCHEMES = ("natural", "iid", "dirichlet")
BALANCES = ("none", "oversample", "smote", "sampler")
LOSSES = ("ce", "logit-adjusted")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


#: The accuracy recipe's numeric keys: ``field: (check, allowed values, fix)``.
_RECIPE_RANGES: dict[str, tuple[Callable[[float], bool], str, str]] = {
    "sampling_power": (
        lambda v: 0.0 <= v <= 1.0, "in [0, 1]",
        "use 1 (class-balanced), 0.5 (square-root, the accuracy recipe) or 0 (natural)",
    ),
    "la_tau": (
        lambda v: math.isfinite(v) and v >= 0.0, "a finite number >= 0",
        "use e.g. 1.0 (0 is plain cross-entropy)",
    ),
    "tta": (
        lambda v: 1 <= v <= MAX_TTA, f"a number of views (1 to {MAX_TTA})",
        f"use 1 (no test-time augmentation) to {MAX_TTA} (flips and 90° rotations)",
    ),
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=_kebab)


class PartitionConfig(_Section):
    """How the data set is split into sites.

    Parameters
    ----------
    scheme : str (default: "natural")
        ``natural`` (the data set's own site column), ``iid`` or ``dirichlet``.
    sites : int (default: 3)
        Number of sites (simulated SuperNodes).
    alpha : float (default: 0.5)
        Dirichlet concentration (``dirichlet`` only); smaller is more heterogeneous.
    seed : int (default: 0)
        Seed of the partition and of the per-site train/test split.
    """

    scheme: Literal["natural", "iid", "dirichlet"] = "natural"
    sites: int = Field(3, ge=1, le=64)
    alpha: float = Field(0.5, gt=0)
    seed: int = 0


class ModelConfig(_Section):
    """Which QANA variant to train, at which input size and width.

    Parameters
    ----------
    variant : str (default: "qana-akd1000")
        One of ``qana-akd1000``, ``qana-akida2``, ``qana-float``, ``akidanet-akd1000``
        (the AkidaNet-style baseline).
    size : int (default: 64)
        Input side in pixels.
    width : float (default: 1.0)
        Channel width multiplier.
    depth : int | None (default: None)
        Ghost blocks per stage; None keeps the variant's stage table.
    colour : str (default: "none")
        Colour constancy every site applies to its images (``none``, ``shades-of-gray``,
        ``gray-world``); recorded beside the global model so it is scored alike.
    """

    variant: Literal["qana-akd1000", "qana-akida2", "qana-float", "akidanet-akd1000"] = (
        "qana-akd1000"
    )
    size: int = Field(64, ge=8, le=512)
    width: float = Field(1.0, gt=0, le=4)
    depth: int | None = Field(None, ge=1, le=8)
    colour: Literal["none", "shades-of-gray", "gray-world"] = "none"


class RoundsConfig(_Section):
    """Number of federated rounds per phase.

    Parameters
    ----------
    warmup : int (default: 3)
        Float warm-up rounds.
    qat : int (default: 2)
        Quantization-aware training rounds after federated calibration.
    """

    warmup: int = Field(3, ge=0)
    qat: int = Field(2, ge=0)


class StrategyConfig(_Section):
    """Server-side aggregation strategy (Flower's message-based strategies).

    Parameters
    ----------
    name : str (default: "fedavg")
        ``fedavg``, ``fedprox``, ``fedadam``, ``fedyogi``, ``fedavgm`` (server momentum), or
        the robust rules ``fedmedian``, ``fedtrimmedavg``, ``krum``.
    proximal-mu : float (default: 0.0)
        FedProx proximal term weight, applied in each site's local loss.
    server-lr : float | None (default: None)
        Server learning rate (FedAdam/FedYogi ``eta``, FedAvgM ``server_learning_rate``).
        None: the strategy's default, :data:`SERVER_LR_DEFAULTS` (see
        :func:`server.strategies.make_strategy` for why).
    server-lr-local : float (default: 1.0)
        FedAdam/FedYogi ``eta_l`` (client learning rate seen by the server update).
    tau : float (default: 1e-3)
        FedAdam/FedYogi adaptivity.
    server-momentum : float (default: 0.9)
        FedAvgM server momentum, in [0, 1).
    trim-beta : float (default: 0.2)
        FedTrimmedAvg: fraction of replies cut from each tail, per coordinate, in [0, 0.5).
    num-malicious : int (default: 0)
        Krum: number of sites assumed malicious (``f``); a site is scored by its distance
        to its ``n - f - 2`` nearest replies.
    """

    name: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian",
                  "fedtrimmedavg", "krum"] = "fedavg"
    proximal_mu: float = Field(0.0, ge=0, description="a weight >= 0, e.g. 0.01")
    server_lr: float | None = Field(None, gt=0, description="a learning rate > 0, e.g. 0.03")
    server_lr_local: float = Field(1.0, gt=0, description="a learning rate > 0, e.g. 1.0")
    tau: float = Field(1e-3, gt=0, description="a small positive number, e.g. 0.001")
    server_momentum: float = Field(0.9, ge=0, lt=1,
                                   description="a momentum in [0, 1), e.g. 0.9")
    trim_beta: float = Field(0.2, ge=0, lt=0.5,
                             description="a fraction in [0, 0.5), e.g. 0.25 for 4 sites")
    num_malicious: int = Field(0, ge=0, description="a count of sites >= 0, e.g. 1")

    @property
    def effective_server_lr(self) -> float:
        """``server-lr``, or the strategy's default when unset."""
        return self.server_lr if self.server_lr is not None else SERVER_LR_DEFAULTS.get(
            self.name, 1.0)

    @model_validator(mode="after")
    def _fedprox_needs_mu(self) -> StrategyConfig:
        if self.name == "fedprox" and self.proximal_mu <= 0:
            raise ValueError(
                f"strategy fedprox needs proximal-mu > 0, got {self.proximal_mu}; "
                "set e.g. proximal-mu: 0.01"
            )
        return self


class GuardConfig(_Section):
    """Checks every site's reply before it is aggregated (:func:`common.aggregate.screen`).

    A reply with NaN/Inf, unknown or missing keys, wrong shapes, or (training rounds) an
    update norm above ``max-norm-ratio`` times the median norm of the other replies is
    dropped with its reason in the log and the report; the round goes on with the quorum.

    Parameters
    ----------
    max-norm-ratio : float | None (default: 10.0)
        Bound on a site's update norm (L2 over its trained weights, ``reply - global``)
        relative to the median of the other sites' update norms; None turns the norm check
        off (NaN/Inf and shape checks always run). Not 5: an honest large site takes more
        local steps per epoch than a small one, so its update is larger (unmeasured here).
    """

    max_norm_ratio: float | None = Field(10.0, gt=1, description="a ratio > 1, e.g. 10, "
                                         "or null to turn the norm check off")


class QuorumConfig(_Section):
    """How many sites a run and a round need.

    Parameters
    ----------
    min-sites : int (default: 2)
        Sites that must be connected before the run starts.
    min-replies : int (default: 2)
        Successful replies a round needs to be aggregated; fewer stops the run.
    """

    min_sites: int = Field(2, ge=1)
    min_replies: int = Field(2, ge=1)


class TimeoutsConfig(_Section):
    """Bounded waits, in seconds.

    Parameters
    ----------
    connect : float (default: 120)
        How long to wait for ``min-sites`` sites to connect.
    round : float (default: 900)
        How long one round waits for replies before going on with those received.
    """

    connect: float = Field(120.0, gt=0)
    round: float = Field(900.0, gt=0)


class EdgeConfig(_Section):
    """On-chip incremental learning at the end of the run (``qana-akd1000`` only).

    Parameters
    ----------
    shots : int (default: 5)
        Local training images per class used for on-chip learning.
    neurons-per-class : int (default: 4)
        Akida neurons per class in the learnable layer.
    new-class : str | None (default: None)
        A class held out of federated training: its images are left out of every site's
        training, calibration and round evaluation, and each site that has some learns it
        on-chip from ``shots`` images at the end (few-shot new class), reporting old- and
        new-class scores before and after.
    """

    shots: int = Field(5, ge=1)
    neurons_per_class: int = Field(4, ge=1)
    new_class: str | None = Field(None, min_length=1)


class PactConfig(_Section):
    """PACT: a learnable clip α per bounded ReLU, trained in the float warm-up rounds.

    α is an ordinary trainable weight (``<layer>/alpha``): sites train it and the server
    averages it with the other weights. Before calibration every site and the server bake the
    global α into ``ReLU(max_value=α)`` (:func:`common.pact.bake_pact`), so all quantize the same
    model; the baked α then travels with the global arrays to build the quantized model.

    Parameters
    ----------
    enabled : bool (default: False)
        Replace the bounded ReLUs (all but the Akida 1.0 spike generator) by PACT layers.
    alpha-init : float | None (default: None)
        Initial α; None starts each at its ReLU's bound (6).
    l2 : float (default: 1e-4)
        L2 penalty on α, added to the local loss.
    """

    enabled: bool = False
    alpha_init: float | None = Field(None, gt=0)
    l2: float = Field(1e-4, ge=0)


class SgtConfig(_Section):
    """Saliency-guided training in the local epochs (:class:`common.sgt.SaliencyGuidedModel`).

    Parameters
    ----------
    enabled : bool (default: False)
        Train locally with cross-entropy + ``kl-weight`` · KL(p(x) ‖ p(masked x)).
    mask-fraction : float (default: 0.1)
        Fraction of lowest-saliency pixels masked per image, in (0, 1).
    kl-weight : float (default: 1.0)
        Weight of the KL term (>= 0).
    in-qat : bool (default: True)
        Also in the QAT rounds (quantized model, straight-through gradients); False: warm-up
        rounds only (an SGT step costs about three plain steps).
    """

    enabled: bool = False
    mask_fraction: float = Field(0.1, gt=0, lt=1)
    kl_weight: float = Field(1.0, ge=0)
    in_qat: bool = True


class DpConfig(_Section):
    """Differential privacy of each site's weight update (:mod:`common.dp`).

    Parameters
    ----------
    enabled : bool (default: False)
        Clip and noise every warm-up and QAT update on the site before it is sent.
    clip : float (default: 1.0)
        L2 bound ``C`` of a site's whole update (all exchanged arrays as one vector), > 0.
    noise-multiplier : float (default: 1.0)
        ``z``: Gaussian noise of standard deviation ``z * C`` per coordinate, > 0.
    delta : float (default: 1e-5)
        The δ of the reported (ε, δ), in (0, 1); pick it below 1 / (patients per site).
    """

    enabled: bool = False
    clip: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5

    @field_validator("clip", "noise_multiplier")
    @classmethod
    def _positive(cls, value: float, info) -> float:
        if not value > 0:
            key = _kebab(info.field_name)
            raise ValueError(
                f"dp.{key} must be > 0, got {value!r}; set e.g. dp.{key}: 1.0 (to train "
                "without noise, set dp.enabled: false)"
            )
        return value

    @field_validator("delta")
    @classmethod
    def _probability(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(
                f"dp.delta must be in (0, 1), got {value!r}; set e.g. dp.delta: 1e-5 "
                "(below 1 / patients per site)"
            )
        return value


class FedConfig(_Section):
    """A federated scenario: data, partition, model, phases, strategy, quorum and timeouts.

    Parameters
    ----------
    name : str
        Scenario name, used in reports.
    data : str
        Data set spec (a path, or ``synthetic:n=600,size=32,sites=3,seed=0``).
    partition, model, rounds, strategy, guard, quorum, timeouts, edge
        Sections, see their classes.
    local-epochs : int (default: 1)
        Local epochs per warm-up round (cheap float epochs).
    qat-local-epochs : int (default: 1)
        Local epochs per QAT round (a QAT epoch costs several float epochs).
    batch-size : int (default: 32)
        Local batch size.
    lr : float (default: 1e-3)
        Local Adam learning rate in warm-up rounds.
    qat-lr : float (default: 1e-4)
        Local Adam learning rate in QAT rounds.
    test-fraction : float (default: 0.2)
        Fraction of each site's lesions held out for its local test set.
    calibration-samples : int (default: 256)
        Training images per site used for federated calibration.
    balance : str (default: "none")
        Local class balancing of the training split: ``none``, ``oversample``, ``smote``
        (arrays resampled), or ``sampler`` (batches drawn with
        :func:`common.balance.sampling_probs` of each site's own labels, no image added).
    sampling-power : float (default: 0.5)
        With ``balance: sampler``: class ``c`` is drawn in proportion to ``n_c^(1-power)``;
        1 class-balanced, 0.5 square-root (the accuracy recipe), 0 natural. In [0, 1].
    loss : str (default: "ce")
        Local label loss: ``ce`` (cross-entropy) or ``logit-adjusted`` (cross-entropy on
        ``logits + la-tau · log(prior)`` with each site's own training prior, see
        :func:`common.site.site_prior`).
    la-tau : float (default: 1.0)
        Strength of the logit adjustment (>= 0; 0 is plain cross-entropy).
    tta : int (default: 1)
        Test-time augmentation views (flips, 90° rotations; 1 to 8) averaged in each
        site's round evaluation and in the final scoring of the global model; recorded
        beside the global model. 1: none.
    augment : bool (default: False)
        Local training augmentation.
    pact, sgt
        PACT and saliency-guided local training, see :class:`PactConfig`, :class:`SgtConfig`.
    dp
        Differential privacy of the sites' updates, see :class:`DpConfig`.
    site-policies : dict[str, dict] (default: {})
        Simulation only: site id (or ``default``) → that site's policy
        (:class:`common.policy.SitePolicy`); a deployed site reads its kit's ``policy.yaml``.
    explain-images : int (default: 4)
        In the final round each site writes saliency overlays (vanilla gradients and
        SmoothGrad, float and quantized global model) of this many of its own test images to
        its local folder; only the float→quantized stability and the file names are reported.
        0 turns it off.
    metrics-key : str | None (default: None)
        Coordinator public key (PEM) sites encrypt metrics to; simulations create one.
    seed : int (default: 0)
        Run seed: local training is seeded per (seed, round, site).
    """

    name: str = Field(min_length=1)
    data: str = Field(min_length=1)
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    rounds: RoundsConfig = RoundsConfig()
    local_epochs: int = Field(1, ge=1)
    qat_local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    qat_lr: float = Field(1e-4, gt=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    calibration_samples: int = Field(256, ge=1)
    strategy: StrategyConfig = StrategyConfig()
    guard: GuardConfig = GuardConfig()
    quorum: QuorumConfig = QuorumConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    balance: Literal["none", "oversample", "smote", "sampler"] = "none"
    sampling_power: float = 0.5
    loss: Literal["ce", "logit-adjusted"] = "ce"
    la_tau: float = 1.0
    tta: int = 1
    augment: bool = False
    edge: EdgeConfig = EdgeConfig()
    pact: PactConfig = PactConfig()
    sgt: SgtConfig = SgtConfig()
    dp: DpConfig = DpConfig()
    site_policies: dict[str, dict[str, Any]] = {}
    explain_images: int = Field(4, ge=0, le=64)
    metrics_key: str | None = None
    seed: int = 0

    @field_validator("site_policies")
    @classmethod
    def _policies_valid(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from .policy import parse_policy

        for site, raw in value.items():
            parse_policy(raw, f"site-policies.{site}")
        return value

    @field_validator(*_RECIPE_RANGES)
    @classmethod
    def _recipe_in_range(cls, value: float, info: ValidationInfo) -> float:
        ok, allowed, fix = _RECIPE_RANGES[info.field_name]
        if not ok(value):
            raise ValueError(f"{_kebab(info.field_name)} {value} is not {allowed}; {fix}")
        return value

    @model_validator(mode="after")
    def _quorum_fits(self) -> FedConfig:
        sites = self.partition.sites
        if self.quorum.min_sites > sites or self.quorum.min_replies > sites:
            raise ValueError(
                f"quorum min-sites={self.quorum.min_sites} / min-replies="
                f"{self.quorum.min_replies} exceed partition.sites={sites}; lower the quorum "
                "or add sites"
            )
        st = self.strategy
        if st.name == "fedtrimmedavg" and int(st.trim_beta * self.quorum.min_replies) < 1:
            need = 1 / self.quorum.min_replies
            fix = (f"set trim-beta >= {need:.3g} (and < 0.5)" if need < 0.5 else
                   "raise quorum.min-replies to 3 or more")
            raise ValueError(
                f"strategy fedtrimmedavg with trim-beta={st.trim_beta} trims nothing when "
                f"{self.quorum.min_replies} sites reply (it cuts int(trim-beta x replies) per "
                f"tail); {fix}, or use fedmedian"
            )
        if st.name == "krum" and st.num_malicious >= self.quorum.min_replies - 2 > 0:
            raise ValueError(
                f"strategy krum with num-malicious={st.num_malicious} leaves no honest "
                f"neighbour to score against when {self.quorum.min_replies} sites reply; "
                f"set num-malicious <= {self.quorum.min_replies - 3} or raise quorum.min-replies"
            )
        if self.quorum.min_replies > self.quorum.min_sites:
            raise ValueError(
                f"quorum min-replies={self.quorum.min_replies} > min-sites="
                f"{self.quorum.min_sites}; a round cannot get more replies than sites"
            )
        return self

    def dump(self) -> dict[str, Any]:
        """Return the config as a kebab-case dict (what a YAML file would hold)."""
        return self.model_dump(by_alias=True, mode="json")


def _expected(loc: tuple) -> str | None:
    """Return the ``description`` (what a valid value looks like) of the field at ``loc``."""
    model: Any = FedConfig
    info = None
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields:
            return None
        info = next((f for n, f in fields.items() if part in (n, f.alias)), None)
        if info is None:
            return None
        model = info.annotation
    return info.description if info is not None else None


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        received = e.get("input")
        shown = "" if isinstance(received, dict) else f" (received {received!r})"
        hint = _expected(tuple(e["loc"]))
        lines.append(f"{source}: {where}: {e['msg']}{shown}" + (f"; expected {hint}" if hint
                                                                  else ""))
    return "\n".join(lines)


def parse_config(raw: Any, source: str = "config") -> FedConfig:
    """Validate a scenario given as a dict.

    Parameters
    ----------
    raw : Any
        The parsed YAML document.
    source : str (default: "config")
        Where it came from, for messages.

    Raises
    ------
    ConfigError
        Naming each bad key, the received value and the allowed values.
    """
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: a scenario must be a mapping of keys, got {type(raw).__name__}: {raw!r}",
            "write `name: ...`, `data: ...` etc. as top-level keys",
        )
    try:
        return FedConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(
            _describe(err, source),
            "fix the keys above (kebab-case, e.g. local-epochs); see simulations/demo.yaml "
            f"for a complete example. Strategies: {', '.join(STRATEGIES)}; "
            f"variants: {', '.join(VARIANTS)}; partition schemes: {', '.join(SCHEMES)}; "
            f"balance: {', '.join(BALANCES)}; loss: {', '.join(LOSSES)}",
        ) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> FedConfig:
    """Read and validate a scenario YAML file.

    Parameters
    ----------
    path : str | Path
        The YAML file.
    overrides : dict[str, Any] | None (default: None)
        Top-level keys replacing the file's (e.g. ``{"data": "/path"}`` from ``--data``).

    Raises
    ------
    ConfigError
        If the file is missing, is not valid YAML, or fails validation.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"scenario file {str(p)!r} does not exist", "pass an existing YAML file to --config"
        )
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"scenario file {str(p)!r} is not valid YAML{where}: "
            f"{getattr(err, 'problem', None) or err}",
            "check indentation and `key: value` syntax on that line",
        ) from None
    if isinstance(raw, dict) and overrides:
        raw = {**raw, **overrides}
    return parse_config(raw, source=str(p))


def scenario_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """List the keys whose values differ between two dumped scenarios (``FedConfig.dump``).

    Parameters
    ----------
    old, new : dict[str, Any]
        The scenarios as kebab-case dicts.
    prefix : str (default: "")
        Dotted path of ``old``/``new`` within the scenario (recursion).

    Returns
    -------
    list[str]
        ``"dotted.key: old → new"`` per changed key, in key order (``(absent)`` for a key only
        one of them has).
    """
    changes = []
    for key in sorted(set(old) | set(new)):
        where = f"{prefix}{key}"
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += scenario_changes(a, b, f"{where}.")
        elif a != b:
            changes.append(f"{where}: {a!r} → {b!r}")
    return changes
