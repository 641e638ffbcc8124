"""A site's own policy (``policy.yaml``): which tasks it runs and what it never sends.

The site checks every task against its policy before it does any work
(:func:`check_task`); a task outside it is refused with a :class:`PolicyRefusal` whose
message names the rule, the received value and the fix, which the ClientApp logs on the site
and returns to the coordinator as the reply's error. What the site's metrics must not carry is
removed before they are sealed (:func:`redact`).

Rules (kebab-case keys, unknown keys refused):

* ``coordinators``: key ids of the coordinators the site works for — the 16-hex id of the
  coordinator metrics key the site encrypts its reports to
  (:func:`common.metrics_crypto.key_id`); None: any.
* ``variants`` / ``phases``: the model variants and protocol phases it runs.
* ``max-rounds``: the most rounds (messages) of one run it takes part in.
* ``dp``: ``required`` (only runs with ``dp.enabled``), ``max-epsilon`` (the most ε the whole
  run's planned training rounds may spend, from ``dp-accounting``) and ``max-delta``.
* ``saliency-overlays``: whether the site writes saliency overlays of its own images.
* ``never-send``: items of :data:`NEVER_SEND`. A phase whose reply *is* such an item (weight
  updates, calibration ranges) is refused; metric items are removed from every report.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError, QanafedError
from .fedconfig import VARIANTS
from .fedconfig import _describe as describe_errors

if TYPE_CHECKING:
    from .fedconfig import FedConfig

__all__ = [
    "NEVER_SEND",
    "PHASES",
    "POLICY_FILE",
    "PolicyRefusal",
    "SitePolicy",
    "check_task",
    "default_policy",
    "load_policy",
    "parse_policy",
    "planned_phases",
    "redact",
]

#: File name of the policy in a site kit.
POLICY_FILE = "policy.yaml"

#: Protocol phases, in run order (``server.protocol.PHASE_OF``).
PHASES = ("hello", "warmup", "calibrate", "qat", "finalize")

Phase = Literal["hello", "warmup", "calibrate", "qat", "finalize"]
Variant = Literal[VARIANTS]  # type: ignore[valid-type]
Item = Literal["weight-updates", "calibration-ranges", "class-counts", "confusion-matrices",
               "per-class-metrics", "saliency-summary"]

#: What a site can refuse to send: the phases whose reply is that item, and the metric keys
#: (at any depth of a report) that carry it.
NEVER_SEND: dict[str, dict[str, tuple[str, ...]]] = {
    "weight-updates": {"phases": ("warmup", "qat"), "keys": ()},
    "calibration-ranges": {"phases": ("calibrate",), "keys": ()},
    "class-counts": {"phases": (), "keys": ("train_class_counts", "test_class_counts")},
    "confusion-matrices": {"phases": (), "keys": ("confusion_matrix",)},
    "per-class-metrics": {"phases": (), "keys": ("per_class",)},
    "saliency-summary": {"phases": (), "keys": ("saliency",)},
}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=_kebab, populate_by_name=True)


class DpRequirement(_Section):
    """What a site demands of differential privacy.

    Parameters
    ----------
    required : bool (default: False)
        Run only scenarios with ``dp.enabled``.
    max-epsilon : float | None (default: None)
        The most ε the run's planned training rounds may spend (at the scenario's δ); None:
        no limit.
    max-delta : float (default: 1e-5)
        The largest δ accepted when ``max-epsilon`` is set (a large δ makes any ε small).
    """

    required: bool = False
    max_epsilon: float | None = Field(None, gt=0)
    max_delta: float = Field(1e-5, gt=0, lt=1)


class SitePolicy(_Section):
    """A site's policy, see the module docstring.

    Parameters
    ----------
    coordinators : list[str] | None (default: None)
        Allowed coordinator key ids; None: any.
    variants : list[str] (default: all)
        Allowed model variants.
    phases : list[str] (default: all)
        Allowed phases (``hello``, ``warmup``, ``calibrate``, ``qat``, ``finalize``).
    max-rounds : int (default: 100)
        Most rounds of one run.
    dp : DpRequirement
        Differential-privacy demands.
    saliency-overlays : bool (default: True)
        Whether saliency overlays of the site's images may be written (on the site).
    never-send : list[str] (default: [])
        Items of :data:`NEVER_SEND`.
    """

    coordinators: list[str] | None = None
    variants: list[Variant] = Field(default_factory=lambda: list(VARIANTS))
    phases: list[Phase] = Field(default_factory=lambda: list(PHASES))
    max_rounds: int = Field(100, ge=1)
    dp: DpRequirement = DpRequirement()
    saliency_overlays: bool = True
    never_send: list[Item] = []


class PolicyRefusal(QanafedError, PermissionError):
    """A task is outside the site's policy."""


def parse_policy(raw: Any, source: str = POLICY_FILE) -> SitePolicy:
    """Validate a policy given as a dict.

    Raises
    ------
    ConfigError
        Naming ``source``, each bad or unknown field and the allowed fields.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: a site policy must be a mapping of keys, got {raw!r}",
                          "write `max-rounds: 100`, `phases: [...]` etc. as top-level keys")
    try:
        return SitePolicy.model_validate(dict(raw))
    except ValidationError as err:
        raise ConfigError(
            describe_errors(err, source),
            "fix or remove those fields; allowed: "
            + ", ".join(_kebab(k) for k in SitePolicy.model_fields)
            + f" (dp: {', '.join(_kebab(k) for k in DpRequirement.model_fields)}); never-send "
            f"items: {', '.join(NEVER_SEND)}",
        ) from None


def load_policy(path: str | Path) -> SitePolicy:
    """Read and validate a ``policy.yaml``.

    Raises
    ------
    ConfigError
        If the file is missing, not YAML, or invalid (naming the file and the field).
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"site policy {str(p)!r} does not exist",
                          "re-run `qanafed provision` to write a default policy.yaml, or fix "
                          "the node config's policy-file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"site policy {str(p)!r} is not valid YAML: {err}",
                          "check indentation and `key: value` syntax") from None
    return parse_policy(raw, str(p))


def default_policy(coordinators: list[str] | None = None) -> dict[str, Any]:
    """Return the policy provisioning writes: every variant and phase, the given coordinators."""
    return SitePolicy(coordinators=coordinators).model_dump(by_alias=True, mode="json")


def planned_phases(cfg: FedConfig) -> list[str]:
    """Phases of a scenario's rounds in order (the plan of :func:`server.driver.plan`)."""
    quantized = cfg.model.variant != "qana-float"
    return (["warmup"] * cfg.rounds.warmup
            + (["calibrate"] + ["qat"] * cfg.rounds.qat if quantized else []) + ["finalize"])


def _refuse(site: str, problem: str, fix: str) -> PolicyRefusal:
    return PolicyRefusal(f"site {site} refuses by its policy: {problem}", fix)


def check_task(
    policy: SitePolicy, cfg: FedConfig, phase: str, server_round: int, site: str,
    coordinator: str | None,
) -> None:
    """Refuse a task outside ``policy``; return None if it may run.

    The whole scenario is checked on every task (a run's later rounds can only be refused
    later, not undone), so a site that refuses anything refuses at ``hello``.

    Parameters
    ----------
    policy : SitePolicy
        The site's policy.
    cfg : FedConfig
        The scenario the coordinator sent.
    phase : str
        The task's phase.
    server_round : int
        The task's round (0 for hello).
    site : str
        The site id, for messages.
    coordinator : str | None
        Key id of the coordinator the site reports to.

    Raises
    ------
    PolicyRefusal
        Naming the rule, the received value and the fix.
    """
    if policy.coordinators is not None and coordinator not in policy.coordinators:
        raise _refuse(site, f"coordinator key {coordinator} is not an allowed coordinator "
                      f"({', '.join(policy.coordinators) or 'none'})",
                      "report to an allowed coordinator, or add its key id to coordinators "
                      "in the site's policy.yaml")
    if cfg.model.variant not in policy.variants:
        raise _refuse(site, f"variant {cfg.model.variant} is not allowed "
                      f"({', '.join(policy.variants)})",
                      "use an allowed model.variant, or add it to variants in policy.yaml")
    plan = planned_phases(cfg)
    for needed in dict.fromkeys(["hello", phase, *plan]):
        if needed not in policy.phases:
            raise _refuse(site, f"phase {needed} is not allowed ({', '.join(policy.phases)})",
                          f"plan a run without {needed}, or add it to phases in policy.yaml")
    for item in policy.never_send:
        sending = [p for p in NEVER_SEND[item]["phases"] if p in (phase, *plan)]
        if sending:
            raise _refuse(site, f"phase {sending[0]} would send {item}, which it never sends",
                          f"plan a run without {sending[0]}, or remove {item} from never-send")
    rounds = max(len(plan), int(server_round))
    if rounds > policy.max_rounds:
        raise _refuse(site, f"the run has {rounds} rounds, more than max-rounds "
                      f"{policy.max_rounds}", "plan fewer rounds, or raise max-rounds")
    if cfg.explain_images > 0 and not policy.saliency_overlays:
        raise _refuse(site, f"explain-images is {cfg.explain_images} but it writes no saliency "
                      "overlays", "set explain-images: 0, or saliency-overlays: true")
    _check_dp(policy, cfg, plan, site)


def _check_dp(policy: SitePolicy, cfg: FedConfig, plan: list[str], site: str) -> None:
    want = policy.dp
    if not cfg.dp.enabled:
        if want.required or want.max_epsilon is not None:
            raise _refuse(site, "differential privacy is required but dp.enabled is false",
                          "set dp.enabled: true in the scenario")
        return
    if want.max_epsilon is None:
        return
    if cfg.dp.delta > want.max_delta:
        raise _refuse(site, f"dp.delta {cfg.dp.delta:g} exceeds max-delta {want.max_delta:g}",
                      "lower dp.delta, or raise dp.max-delta in policy.yaml")
    from .dp import epsilon_spent

    trained = sum(p in ("warmup", "qat") for p in plan)
    eps = epsilon_spent(cfg.dp.noise_multiplier, trained, cfg.dp.delta)
    if eps > want.max_epsilon:
        raise _refuse(site, f"the run's {trained} training rounds at noise multiplier "
                      f"{cfg.dp.noise_multiplier:g} spend ε={eps:.3g} (δ={cfg.dp.delta:g}), "
                      f"more than max-epsilon {want.max_epsilon:g}",
                      "raise dp.noise-multiplier or plan fewer rounds, or raise max-epsilon")


def redact(metrics: Mapping[str, Any], policy: SitePolicy | None) -> dict[str, Any]:
    """Return ``metrics`` without the keys of the policy's never-send items (at any depth).

    A ``redacted`` list names the items removed, so the coordinator knows why they are absent.
    """
    keys = {k for item in (policy.never_send if policy else ()) for k in NEVER_SEND[item]["keys"]}
    if not keys:
        return dict(metrics)
    removed: set[str] = set()

    def strip(value: Any) -> Any:
        if isinstance(value, Mapping):
            out = {}
            for k, v in value.items():
                if k in keys:
                    removed.add(k)
                else:
                    out[k] = strip(v)
            return out
        return value

    out = strip(metrics)
    if removed:
        out["redacted"] = sorted(item for item in policy.never_send
                                 if set(NEVER_SEND[item]["keys"]) & removed)
    return out
