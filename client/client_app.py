"""The ClientApp: turns each phase's message into a call of common.site, and seals the metrics."""

from __future__ import annotations

import os

# One TensorFlow thread pool of one thread per client process (must precede TF's import).
for _var in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from collections.abc import Callable, Mapping  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import lru_cache  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from client.mods import dp_mod, make_policy_mod, node_defaults_mod, site_policy  # noqa: E402
from client.mods import scenario as _scenario  # noqa: E402
from common import site  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from common.fedconfig import FedConfig  # noqa: E402
from common.log import get_logger  # noqa: E402
from common.policy import redact  # noqa: E402
from server import protocol as P  # noqa: E402

log = get_logger("client")


@lru_cache(maxsize=4)
def _public_key(path: str):
    from common.metrics_crypto import load_metrics_public_key

    return load_metrics_public_key(path)


def _site(context: Context, cfg: FedConfig) -> site.SiteData:
    """Return this node's data: its folder (``data-path``) or its partition of the data."""
    node = context.node_config
    data_path = node.get("data-path")
    site_id = node.get("site-id")
    if data_path:
        cfg = cfg.model_copy(update={"data": str(data_path)})
        return site.data_of(cfg, None, str(site_id) if site_id else None)
    if "partition-id" not in node:
        raise ConfigError(
            f"node config {dict(node)} has neither data-path nor partition-id",
            "start the SuperNode with --node-config \"site-id='...' data-path='...'\"",
        )
    return site.data_of(cfg, int(node["partition-id"]), str(site_id) if site_id else None)


def site_out_dir(node: Any, config: Any, site_id: str) -> Path | None:
    """Return the site's own output folder (saliency overlays, the kept float model), or None.

    Node config ``out-dir`` (a deployed site kit) wins; a simulated node (node config
    ``partition-id``) writes to ``<sim-sites-dir>/<site-id>`` (the simulation's ``OUT/sites``,
    sent by the coordinator); a deployed node without ``out-dir`` has none.
    """
    if node.get("out-dir"):
        return Path(str(node["out-dir"]))
    if "partition-id" in node and config.get("sim-sites-dir"):
        return Path(str(config["sim-sites-dir"])) / site_id
    return None


Phase = Callable[[FedConfig, Any, Any, Any], tuple]


def _handle(
    message: Message, context: Context, load: Callable[[Context, FedConfig], Any], work: Phase
) -> Message:
    """Wrap every phase: parse config, load data, run ``work``, seal metrics."""
    config = message.content[P.CONFIG]
    cfg = _scenario(str(config["scenario"]))
    data = load(context, cfg)
    key_path = context.node_config.get("metrics-public-key") or cfg.metrics_key
    if not key_path:
        raise ConfigError("no coordinator metrics key for this site",
                          "set metrics-key in the scenario or metrics-public-key in node config")
    arrays = P.from_record(message.content[P.ARRAYS]) if P.ARRAYS in message.content else None
    out_dir = site_out_dir(context.node_config, config, data.site_id)
    # Site-side settings last: a message cannot set them (the trusted release key above all).
    out_arrays, num_examples, metrics = work(cfg, data, arrays, {
        **dict(config), "site-out-dir": out_dir,
        "site-release-key": context.node_config.get("release-public-key") or None})
    from common.metrics_crypto import encrypt_report

    policy = site_policy(context.node_config, cfg, data.site_id)
    metrics = redact(metrics, policy)
    if policy is not None and config["phase"] == "hello":  # the coordinator learns the rules
        metrics["policy"] = policy.model_dump(by_alias=True, mode="json")
    envelope = encrypt_report(
        metrics, _public_key(str(key_path)), run_id=str(config["run-id"]),
        round=int(config["server-round"]), site_id=data.site_id,
    )
    log.info("site %s: %s round %s done", data.site_id, config["phase"], config["server-round"])
    return P.reply_of(message, P.reply_content(out_arrays, num_examples, data.site_id, envelope))


def _hello(cfg: FedConfig, data: site.SiteData, arrays: Any, config: Any) -> tuple:
    n, metrics = site.hello(data, cfg)
    return None, n, metrics


def _warmup(cfg: FedConfig, data: site.SiteData, arrays: Any, config: Any) -> tuple:
    return site.warmup(cfg, data, arrays, int(config["server-round"]), lr=float(config["lr"]),
                       epochs=int(config["local-epochs"]), proximal_mu=float(config["proximal-mu"]))


def _calibrate(cfg: FedConfig, data: site.SiteData, arrays: Any, config: Any) -> tuple:
    return site.calibrate(cfg, data, arrays, int(config["server-round"]),
                          out_dir=config.get("site-out-dir"))


def _qat(cfg: FedConfig, data: site.SiteData, arrays: Any, config: Any) -> tuple:
    return site.qat(cfg, data, arrays, int(config["server-round"]), lr=float(config["lr"]),
                    epochs=int(config["local-epochs"]), proximal_mu=float(config["proximal-mu"]))


def _finalize(cfg: FedConfig, data: site.SiteData, arrays: Any, config: Any) -> tuple:
    n, metrics = site.finalize(cfg, data, arrays, int(config["server-round"]),
                               str(config.get("server-hash", "")),
                               out_dir=config.get("site-out-dir"),
                               release=config.get("release") or None,
                               release_key=config.get("site-release-key"),
                               run_id=str(config["run-id"]))
    return None, n, metrics


@dataclass(frozen=True)
class SitePhases:
    """The site-side work of each phase: ``(cfg, data, arrays, config) -> (arrays, n, metrics)``.

    Parameters
    ----------
    load : Callable[[Context, FedConfig], Any]
        Returns the site's data (any object with ``site_id``), cached per process.
    hello, warmup, calibrate, qat, finalize : Phase
        One function per message type.
    """

    load: Callable[[Context, FedConfig], Any]
    hello: Phase
    warmup: Phase
    calibrate: Phase
    qat: Phase
    finalize: Phase


QANA_PHASES = SitePhases(_site, _hello, _warmup, _calibrate, _qat, _finalize)


def make_client_app(
    phases: SitePhases = QANA_PHASES, node_defaults: Mapping[str, Any] | None = None
) -> ClientApp:
    """Build the ClientApp: one handler per message type, each a thin call into ``phases``.

    Mods: missing node config filled from ``node_defaults``, the site's policy checked before
    any task, and under ``dp.enabled`` the weight update clipped and noised before it is sent
    (:mod:`client.mods`).

    Parameters
    ----------
    phases : SitePhases (default: QANA_PHASES)
        The site-side work of each phase.
    node_defaults : Mapping[str, Any] | None (default: None)
        Node config of every node that does not set it itself (:func:`node_defaults_mod`).
    """
    client_app = ClientApp(mods=[*([node_defaults_mod(node_defaults)] if node_defaults else []),
                                 make_policy_mod(phases.load), dp_mod])

    @client_app.query("hello")
    def hello(message: Message, context: Context) -> Message:
        return _handle(message, context, phases.load, phases.hello)

    @client_app.train("warmup")
    def warmup(message: Message, context: Context) -> Message:
        return _handle(message, context, phases.load, phases.warmup)

    @client_app.query("calibrate")
    def calibrate(message: Message, context: Context) -> Message:
        return _handle(message, context, phases.load, phases.calibrate)

    @client_app.train("qat")
    def qat(message: Message, context: Context) -> Message:
        return _handle(message, context, phases.load, phases.qat)

    @client_app.evaluate("finalize")
    def finalize(message: Message, context: Context) -> Message:
        return _handle(message, context, phases.load, phases.finalize)

    return client_app


app = make_client_app()
