"""The ServerApp: reads its settings, then hands the grid to the round-protocol driver."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.errors import ConfigError
from common.fedconfig import FedConfig, load_config
from common.log import get_logger

from .driver import FederatedRun, Receiver
from .global_model import GlobalModel, QanaGlobalModel
from .reports import build_report, write_report

log = get_logger("server.app")

ModelFactory = Callable[[FedConfig, list[str]], GlobalModel]


def _qana_factory(cfg: FedConfig, class_names: list[str]) -> GlobalModel:
    return QanaGlobalModel(cfg, len(class_names), list(class_names))


def _setting(settings: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = settings.get(key, default)
    return default if value == "" else value


def run_server(
    grid: Grid,
    settings: Mapping[str, Any],
    model_factory: ModelFactory = _qana_factory,
) -> dict[str, Any]:
    """Run the federation described by ``settings`` (run config keys, kebab-case).

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    settings : Mapping[str, Any]
        ``scenario`` (YAML path) or ``scenario-config`` (a :class:`FedConfig`), ``data``
        (override), ``out-dir``, ``metrics-private-key`` (PEM path), ``resume`` (bool),
        ``stop-after`` (int, 0 = run to the end), ``ledger`` (SQLite run ledger path; empty:
        none), ``site-nodes`` (deployment: the coordinator's ``nodes.json``, node id ↔ site of
        each registered SuperNode key; empty in simulation), ``release-private-key`` (the
        coordinator's Ed25519 ``release.key``: the global model is published with a signed
        ``global_model.fbz.release.json``; empty: unsigned), ``stop-event`` (a
        ``threading.Event`` that interrupts the run, see :class:`FederatedRun`).
    model_factory : ModelFactory (default: QANA)
        Builds the server-side model operations.

    Returns
    -------
    dict[str, Any]
        The report (also written to ``out-dir/report.json`` and ``report.md``).
    """
    from common.metrics_crypto import load_metrics_private_key

    cfg = settings.get("scenario-config")
    if cfg is None:
        path = _setting(settings, "scenario")
        if not path:
            raise ConfigError("the run config has no 'scenario' (YAML path)",
                              "set scenario = \"simulations/demo.yaml\" in the run config")
        data = _setting(settings, "data")
        cfg = load_config(path, {"data": data} if data else None)
    out_dir = Path(_setting(settings, "out-dir", "runs/latest"))
    key_path = _setting(settings, "metrics-private-key") or str(out_dir / "keys" / "metrics.key")
    receiver = Receiver(load_metrics_private_key(key_path))
    ledger = _setting(settings, "ledger")  # deployment: every opened/refused report → SQLite
    if ledger:
        from deploy.ledger import LedgerReceiver

        from .driver import plan

        receiver = LedgerReceiver(receiver, ledger, {s.number: s.phase for s in plan(cfg)})
    nodes_file = _setting(settings, "site-nodes")
    registered = None
    if nodes_file:
        from .binding import registered_sites

        registered = registered_sites(nodes_file)
    release_key = _setting(settings, "release-private-key")  # signs what the sites receive
    start = time.monotonic()
    run = FederatedRun(
        grid, cfg, model_factory, receiver, out_dir,
        resume=bool(_setting(settings, "resume", False)),
        stop_after=int(_setting(settings, "stop-after", 0)) or None,
        registered=registered,
        stop=settings.get("stop-event"),
        release_key=Path(release_key) if release_key else None,
    )
    state = run.run()
    report = build_report(state, wall_seconds=round(time.monotonic() - start, 1))
    write_report(out_dir, report)
    if ledger:
        from .driver import plan
        from .privacy import ledger_rows

        for row in ledger_rows(report, len(plan(cfg)) + 1):
            receiver.ledger.record(**row)
    log.info("report written to %s", out_dir / "report.json")
    if release_key:
        _sign_global_model(out_dir / "global_model.fbz", Path(release_key), cfg, report)
    return report


def _sign_global_model(model: Path, key: Path, cfg: FedConfig, report: dict[str, Any]) -> None:
    """Publish the global model: its signed manifest ``<model>.release.json`` beside it."""
    from common.release import sign_release

    final = report.get("final")
    if final is None or not model.is_file():
        return  # an unfinished run, or a float variant: no model to release
    sent = {"weights_sha256": final["weights_sha256"]} if final.get("weights_sha256") else {}
    sign_release(model, key, run_id=report["run_id"], round=final["step"], scenario=cfg.name,
                 variant=cfg.model.variant, sites=sorted(final.get("sites") or {}),
                 metrics=final.get("global") or {}, **sent)  # akida_hash: from meta.json


def make_server_app(
    overrides: Mapping[str, Any] | None = None, model_factory: ModelFactory = _qana_factory
) -> ServerApp:
    """Build a ServerApp whose settings are the run config updated with ``overrides``.

    The Simulation Engine's Python entry point gives the ServerApp an empty run config, so
    ``qanafed sim`` passes its settings here.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = {**dict(context.run_config), **dict(overrides or {})}
        run_server(grid, settings, model_factory)

    return server_app


app = make_server_app()
