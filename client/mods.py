"""ClientApp mods: node config defaults, the site's policy before any task, DP on what it sends.

Flower's own DP mods do not fit this protocol (``deploy/README.md``, "Differential privacy"):
they clip the one ArrayRecord of a reply against the one of the request key by key, while our
replies are packed (:func:`server.protocol.to_record`) and hold a subset of the received
keys; ``fixedclipping_mod`` leaves the noise to a server-side strategy wrapper our driver does
not run; ``LocalDpMod`` sets the noise from a per-round ε and keeps no account. So the mods
here unpack, call :func:`common.dp.privatize` and :func:`common.policy.check_task`, and pack.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from common.fedconfig import FedConfig, parse_config
from common.log import get_logger
from common.policy import PolicyRefusal, SitePolicy, check_task, load_policy, parse_policy
from server import protocol as P

__all__ = ["dp_mod", "make_policy_mod", "node_defaults_mod", "scenario", "site_policy"]

log = get_logger("client.mods")

#: Node config key of a deployed site's policy file (its kit's ``policy.yaml``).
POLICY_KEY = "policy-file"


@lru_cache(maxsize=4)
def scenario(text: str) -> FedConfig:
    """Parse (once per process) the scenario a message's config carries as JSON."""
    return parse_config(json.loads(text), source="scenario from the server")


@lru_cache(maxsize=8)
def _policy_file(path: str, mtime: float) -> SitePolicy:
    return load_policy(path)


def site_policy(node_config: Mapping[str, Any], cfg: FedConfig, site_id: str) -> SitePolicy | None:
    """Return the site's policy: its kit's ``policy.yaml``, else the scenario's, else None.

    A deployed site names its file in node config ``policy-file`` (re-read when it changes). A
    simulated site takes ``site-policies[<site-id>]`` or ``site-policies["default"]`` from the
    scenario; without either it has no policy (every task runs).
    """
    path = node_config.get(POLICY_KEY)
    if path:
        from pathlib import Path

        p = Path(str(path))
        return _policy_file(str(p), p.stat().st_mtime if p.is_file() else -1.0)
    raw = cfg.site_policies.get(site_id, cfg.site_policies.get("default"))
    return None if raw is None else parse_policy(raw, f"site-policies.{site_id}")


def coordinator_key_id(node_config: Mapping[str, Any], cfg: FedConfig) -> str | None:
    """Key id of the coordinator metrics key this site encrypts its reports to (or None)."""
    path = node_config.get("metrics-public-key") or cfg.metrics_key
    if not path:
        return None
    from common.metrics_crypto import key_id, load_metrics_public_key

    return key_id(load_metrics_public_key(str(path)))


def node_defaults_mod(defaults: Mapping[str, Any]):
    """Return a mod that fills the node config's missing keys from ``defaults``.

    The Simulation Engine's Python entry point gives a simulated SuperNode only its
    ``partition-id``: this is how ``qanafed sim`` gives its sites what a deployed site's
    ``--node-config`` holds (the run's ``release-public-key``). A node's own value wins.
    """

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        for key, value in defaults.items():
            context.node_config.setdefault(key, value)
        return call_next(message, context)

    return mod


def make_policy_mod(load: Callable[[Context, FedConfig], Any]):
    """Build the mod that refuses, before any work, a task outside the site's policy.

    Parameters
    ----------
    load : Callable[[Context, FedConfig], Any]
        The ClientApp's data loader (cached per process); gives the site id.

    Returns
    -------
    Callable[[Message, Context, ClientAppCallable], Message]
        A Flower mod. A refused task gets an error reply (``MOD_FAILED_PRECONDITION``) whose
        reason is the refusal, which the coordinator records for the site; the site logs it.
    """

    def policy_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        config = message.content[P.CONFIG]
        cfg = scenario(str(config["scenario"]))
        site_id = load(context, cfg).site_id
        policy = site_policy(context.node_config, cfg, site_id)
        if policy is not None:
            try:
                check_task(policy, cfg, str(config["phase"]), int(config["server-round"]),
                           site_id, coordinator_key_id(context.node_config, cfg))
            except PolicyRefusal as err:
                log.warning("%s (task %s, round %s, run %s)", err.problem,
                            message.metadata.message_type, config["server-round"],
                            config["run-id"])
                return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION,
                                     reason=f"{err.problem}. Fix: {err.fix}"), reply_to=message)
        return call_next(message, context)

    return policy_mod


def dp_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip and noise the weight update of a warm-up or QAT reply under ``dp.enabled``.

    The reply's arrays become ``received + clip(sent - received) + noise``
    (:func:`common.dp.privatize`, noise from the operating system's entropy). Any failure is
    an error reply: nothing un-noised leaves the site.
    """
    reply = call_next(message, context)
    if reply.has_error() or message.metadata.message_type not in (P.WARMUP, P.QAT):
        return reply
    cfg = scenario(str(message.content[P.CONFIG]["scenario"]))
    if not cfg.dp.enabled:
        return reply
    from common.dp import privatize

    received = P.from_record(message.content[P.ARRAYS])
    sent = P.from_record(reply.content[P.ARRAYS])
    reply.content[P.ARRAYS] = P.to_record(
        privatize(received, sent, cfg.dp.clip, cfg.dp.noise_multiplier))
    log.info("dp: update clipped to %g and noised (multiplier %g)", cfg.dp.clip,
             cfg.dp.noise_multiplier)
    return reply
