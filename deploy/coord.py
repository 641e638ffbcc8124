"""The coordinator: a supervised ``flower-superlink``, site registration, and federated runs.

``start_coordinator`` checks the kit (``deploy.kit.validate_coordinator_kit``) and the port,
then runs ``flower-superlink`` with TLS (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``),
``--enable-supernode-auth`` and a persistent ``--database``, under a supervisor; each time the
SuperLink (re)starts, every admitted site key is registered (``flwr supernode register``) and
every revoked one unregistered. ``launch_run`` submits the federated run with ``flwr run`` to
the SuperLink connection written in the kit's ``FLWR_HOME``; decrypted reports go to the run
ledger (``run/ledger.sqlite``). Everything lives in ``<kit>/run/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError, QanafedError, SecurityError
from common.keyfiles import owner_only_umask
from common.log import get_logger
from deploy.kit import COORDINATOR_YAML, CoordinatorKit, ssh_fingerprint, validate_coordinator_kit
from deploy.process import (
    Child,
    RestartPolicy,
    Supervisor,
    python_argv,
    read_pid,
    read_state,
    require_free_port,
    require_not_running,
    spawn_background,
    stop_pid,
    wait_for_port,
)
from deploy.site import child_env

__all__ = [
    "APP_NAME",
    "CoordPaths",
    "coord_paths",
    "coord_status",
    "dashboard_argv",
    "launch_run",
    "private_run_dir",
    "register_sites",
    "start_coordinator",
    "stop_coordinator",
    "superlink_argv",
    "wait_run",
    "write_app",
    "write_flwr_config",
]

log = get_logger("deploy.coord")

#: Where ``qanafed coord start --dashboard`` serves the dashboard (this machine only).
DASHBOARD_HOST, DASHBOARD_PORT = "127.0.0.1", 8800

#: Name of the Flower app bundle the coordinator submits (code is installed on every site).
APP_NAME = "qanafed-federation"
_CLI_TIMEOUT = 60.0


@dataclass(frozen=True)
class CoordPaths:
    """Run files of a coordinator kit (``<kit>/run/``)."""

    run_dir: Path

    pid_file = property(lambda self: self.run_dir / "coordinator.pid")
    state_file = property(lambda self: self.run_dir / "coordinator.state.json")
    log_file = property(lambda self: self.run_dir / "coordinator.log")
    flwr_home = property(lambda self: self.run_dir / "flwr-home")
    database = property(lambda self: self.run_dir / "state.db")
    ledger = property(lambda self: self.run_dir / "ledger.sqlite")
    app_dir = property(lambda self: self.run_dir / "app")
    runs_dir = property(lambda self: self.run_dir / "runs")
    insecure_flag = property(lambda self: self.run_dir / "INSECURE")


def coord_paths(kit_dir: str | Path) -> CoordPaths:
    """Return the run files of the coordinator kit in ``kit_dir``."""
    return CoordPaths(Path(kit_dir).expanduser().resolve() / "run")


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else name


def _local_host(kit: CoordinatorKit) -> str:
    """Where the flwr CLI on the coordinator reaches the SuperLink."""
    host = kit.config.bind_host
    return "127.0.0.1" if host in ("0.0.0.0", "::", "127.0.0.1", "localhost") else host


def connection_name(kit: CoordinatorKit) -> str:
    """Return the flwr SuperLink connection name (the project name)."""
    return kit.config.project


def superlink_argv(kit: CoordinatorKit, paths: CoordPaths, insecure: bool = False) -> list[str]:
    """Return the ``flower-superlink`` command of a validated coordinator kit."""
    argv = [
        _bin("flower-superlink"),
        "--host", kit.config.bind_host,
        "--port", str(kit.config.port),
        "--database", str(paths.database),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        return [*argv, "--insecure"]
    return [*argv, "--ssl-ca-certfile", str(kit.ca_cert), "--ssl-certfile",
            str(kit.server_cert), "--ssl-keyfile", str(kit.server_key)]


def write_flwr_config(kit: CoordinatorKit, paths: CoordPaths, insecure: bool = False) -> str:
    """Write ``FLWR_HOME/config.toml`` with this SuperLink as the default connection.

    Returns
    -------
    str
        The connection name.
    """
    import tomli_w

    name = connection_name(kit)
    conn: dict[str, Any] = {"address": f"{_local_host(kit)}:{kit.config.port}"}
    if insecure:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(kit.ca_cert)
    paths.flwr_home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": name, name: conn}}
    (paths.flwr_home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
    return name


def _flwr(paths: CoordPaths, *args: str, timeout: float = _CLI_TIMEOUT) -> tuple[int, str]:
    """Run the ``flwr`` CLI against the kit's FLWR_HOME; return (exit code, output)."""
    env = {**os.environ, **child_env(paths.flwr_home)}
    proc = subprocess.run(  # noqa: S603
        [_bin("flwr"), *args], capture_output=True, text=True, env=env, timeout=timeout,
        cwd=paths.run_dir,
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _json_of(text: str) -> Any:
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.loads(text[start:])
    except ValueError:
        return None


def _nodes_file(paths: CoordPaths) -> Path:
    return paths.run_dir / "nodes.json"


def registered_nodes(paths: CoordPaths) -> dict[str, dict[str, str]]:
    """Key fingerprint → ``{"site", "node-id"}`` of the keys this coordinator registered.

    ``flwr supernode list`` shows no keys, so the node id ``register`` returns is kept here
    (``run/nodes.json``) to unregister a site's node when its key is revoked.
    """
    try:
        return json.loads(_nodes_file(paths).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def register_sites(kit: CoordinatorKit, paths: CoordPaths, conn: str) -> dict[str, str]:
    """Register every admitted site key and unregister every revoked one (idempotent).

    Returns
    -------
    dict[str, str]
        Site → ``registered`` / ``already registered`` / ``unregistered (revoked)``.

    Raises
    ------
    SecurityError
        If ``flwr supernode register`` refuses a key for another reason than "already in use".
    """
    from common.keyfiles import read_public

    nodes = registered_nodes(paths)
    outcome: dict[str, str] = {}
    for site, key in sorted(kit.site_keys.items()):
        code, out = _flwr(paths, "supernode", "register", str(key), conn, "--name", site,
                          "--format", "json")
        data = _json_of(out) or {}
        if code == 0 and data.get("success", False):
            outcome[site] = "registered"
            nodes[ssh_fingerprint(read_public(key))] = {"site": site,
                                                        "node-id": str(data.get("node-id"))}
        elif "already" in out.lower():
            outcome[site] = "already registered"
        else:
            raise SecurityError(f"flwr supernode register {key} failed: {out[-400:]}",
                                f"check {paths.log_file} and the key file")
    for revoked in kit.revoked:
        node = nodes.get(revoked.fingerprint)
        if node is None:
            outcome[revoked.site] = "revoked (never registered here)"
            continue
        code, out = _flwr(paths, "supernode", "unregister", node["node-id"], conn)
        if code == 0 or "not found" in out.lower():
            outcome[revoked.site] = "unregistered (revoked)"
            nodes.pop(revoked.fingerprint)
        else:
            outcome[revoked.site] = f"unregister failed: {out[-200:]}"
    _nodes_file(paths).write_text(json.dumps(nodes, indent=2), encoding="utf-8")
    for site, what in outcome.items():
        log.info("site %s: %s", site, what)
    return outcome


def _after_start(kit: CoordinatorKit, paths: CoordPaths, conn: str) -> Any:
    def hook(child: Child) -> None:
        if not wait_for_port(kit.config.bind_host, kit.config.port, 60.0, child.alive):
            log.error("SuperLink did not open port %d; see %s", kit.config.port, paths.log_file)
            return
        try:
            register_sites(kit, paths, conn)
        except QanafedError as err:
            log.error("registering site keys failed: %s", err.problem)
        (paths.run_dir / "registered").write_text(f"{time.time()}\n", encoding="utf-8")

    return hook


def start_coordinator(
    kit_dir: str | Path,
    foreground: bool = False,
    insecure: bool = False,
    policy: RestartPolicy | None = None,
    dashboard: bool = False,
    dashboard_port: int = DASHBOARD_PORT,
) -> dict[str, Any]:
    """Check the kit and port, then run the SuperLink under a supervisor and register sites.

    Parameters
    ----------
    kit_dir : str | Path
        The coordinator kit.
    foreground : bool (default: False)
        Run the supervisor in this process; otherwise start it detached and wait until the
        sites are registered.
    insecure : bool (default: False)
        Plain HTTP without TLS (only with this explicit flag; SuperNode authentication stays on).
    policy : RestartPolicy | None (default: None)
        Restart policy.
    dashboard : bool (default: False)
        Also run the dashboard (:mod:`deploy.dashboard`) on 127.0.0.1 under the same
        supervisor, showing ``run/runs`` and the ledger; its token is the kit's
        ``dashboard.token`` (made when missing).
    dashboard_port : int (default: 8800)
        The dashboard's port.

    Raises
    ------
    ConfigError, SecurityError
        A bad kit or a port in use, naming the file and the fix.
    """
    kit = validate_coordinator_kit(kit_dir)
    paths = coord_paths(kit.dir)
    require_not_running(paths.pid_file, "the coordinator",
                        f"qanafed coord stop --kit {kit.dir}")
    require_free_port(kit.config.bind_host, kit.config.port, "SuperLink port",
                      kit.dir / COORDINATOR_YAML)
    if dashboard:
        require_free_port(DASHBOARD_HOST, dashboard_port, "dashboard port", "--dashboard-port")
    private_run_dir(paths)
    with owner_only_umask():  # the daemon, its SuperLink and ServerApps inherit it
        return _start(kit, paths, foreground, insecure, policy,
                      dashboard_port if dashboard else None)


def dashboard_argv(kit: CoordinatorKit, paths: CoordPaths, port: int = DASHBOARD_PORT) -> list[str]:
    """Return the ``qanafed dashboard`` command beside the SuperLink (makes its token, folder)."""
    from deploy.dashboard.access import TOKEN_FILE, make_token_file

    token = kit.dir / TOKEN_FILE
    if make_token_file(token):
        log.info("dashboard token written to %s", token)
    paths.runs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return python_argv("dashboard", "--runs", str(paths.runs_dir), "--ledger",
                       str(paths.ledger), "--token-file", str(token), "--host", DASHBOARD_HOST,
                       "--port", str(port))


def private_run_dir(paths: CoordPaths) -> Path:
    """Make ``<kit>/run/`` owner-only: the folder 0700, nothing in it open to group or others.

    It holds the ledger of decrypted metrics, logs and run folders, so it is private whether
    or not systemd (``UMask=0077``) started the coordinator.
    """
    from common.keyfiles import private_dir, restrict_tree

    private_dir(paths.run_dir)
    restrict_tree(paths.run_dir)
    return paths.run_dir


def _start(
    kit: CoordinatorKit, paths: CoordPaths, foreground: bool, insecure: bool,
    policy: RestartPolicy | None, dashboard: int | None = None,
) -> dict[str, Any]:
    """Start the checked coordinator (see :func:`start_coordinator`)."""
    conn = write_flwr_config(kit, paths, insecure)
    info: dict[str, Any] = {
        "project": kit.config.project, "address": kit.superlink_address,
        "insecure": insecure, "log": str(paths.log_file), "sites": sorted(kit.site_keys),
        "revoked": sorted(r.site for r in kit.revoked),
    }
    if dashboard is not None:  # its port
        from deploy.dashboard.access import TOKEN_FILE

        info["dashboard"] = f"http://{DASHBOARD_HOST}:{dashboard}/"
        info["dashboard-token"] = str(kit.dir / TOKEN_FILE)
    if not foreground:
        (paths.run_dir / "registered").unlink(missing_ok=True)
        argv = python_argv("coord", "start", "--kit", str(kit.dir), "--foreground",
                           *(["--insecure"] if insecure else []),
                           *(["--dashboard", "--dashboard-port", str(dashboard)]
                             if dashboard is not None else []))
        info["pid"] = spawn_background(argv, paths.log_file, paths.pid_file)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (paths.run_dir / "registered").exists():
            if read_pid(paths.pid_file) is None:
                raise ConfigError("the coordinator stopped while starting",
                                  f"read {paths.log_file} for the reason")
            time.sleep(0.3)
        return info
    if insecure:
        log.warning("coordinator %s runs WITHOUT TLS (--insecure)", kit.config.project)
    env = child_env(paths.flwr_home)
    children = [Child("superlink", superlink_argv(kit, paths, insecure), env,
                      after_start=_after_start(kit, paths, conn))]
    if dashboard is not None:
        release_pub = kit.dir / "release.pub"  # the kit's release key, when provisioned
        children.append(Child("dashboard", dashboard_argv(kit, paths, dashboard),
                              {"QANAFED_RELEASE_KEY": str(release_pub)}
                              if release_pub.is_file() else None))
    supervisor = Supervisor(f"coordinator {kit.config.project}", children, paths.run_dir,
                            "coordinator", policy)
    info["pid"] = os.getpid()
    info["exit-code"] = supervisor.run()
    return info


def stop_coordinator(kit_dir: str | Path, timeout: float = 30.0) -> int | None:
    """Stop the coordinator daemon of ``kit_dir``; return its pid, or None."""
    return stop_pid(coord_paths(kit_dir).pid_file, timeout)


# ------------------------------------------------------------------------------------- runs


def write_app(paths: CoordPaths) -> Path:
    """Write the app bundle folder ``flwr run`` builds the FAB from (just its pyproject.toml).

    The code is installed on every site and on the coordinator; the bundle names the
    components and declares the run config keys the ServerApp reads (including ``ledger``).
    A separate folder also keeps ``flwr run`` from migrating the repository's pyproject.toml.
    """
    import tomli_w

    from qanafed import __version__

    app = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": APP_NAME, "version": __version__, "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "qanafed",
            "components": {"serverapp": "server.server_app:app",
                           "clientapp": "client.client_app:app"},
            "config": {"scenario": "", "data": "", "out-dir": "", "metrics-private-key": "",
                       "resume": False, "stop-after": 0, "ledger": "", "site-nodes": "",
                       "release-private-key": ""},
        }}},
    }
    paths.app_dir.mkdir(parents=True, exist_ok=True)
    (paths.app_dir / "pyproject.toml").write_text(tomli_w.dumps(app), encoding="utf-8")
    return paths.app_dir


def launch_run(
    kit_dir: str | Path,
    scenario: str | Path,
    resume: bool = False,
    stop_after: int = 0,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Submit the scenario as a run on the Deployment Engine (``flwr run``).

    Parameters
    ----------
    kit_dir : str | Path
        The coordinator kit (its SuperLink must be running).
    scenario : str | Path
        Scenario YAML (``simulations/NAME.yaml``).
    resume : bool (default: False)
        Continue from the last complete round in the run folder's checkpoints.
    stop_after : int (default: 0)
        Stop after this many complete rounds (0: run every round).
    out_dir : str | Path | None (default: None)
        Run folder; default ``<kit>/run/runs/<scenario name>``.

    Returns
    -------
    dict[str, Any]
        ``run-id`` (Flower's), ``out-dir``, ``ledger``, ``scenario``.
    """
    from common.fedconfig import load_config

    kit = validate_coordinator_kit(kit_dir)
    paths = coord_paths(kit.dir)
    if read_pid(paths.pid_file) is None:
        raise ConfigError(f"the coordinator of {kit.dir} is not running",
                          f"start it: qanafed coord start --kit {kit.dir}")
    scenario_path = Path(scenario).expanduser().resolve()
    cfg = load_config(scenario_path)
    out = Path(out_dir).expanduser().resolve() if out_dir else paths.runs_dir / cfg.name
    private_run_dir(paths)
    with owner_only_umask():
        return _launch(kit, paths, scenario_path, out, resume, stop_after)


def _launch(
    kit: CoordinatorKit, paths: CoordPaths, scenario_path: Path, out: Path, resume: bool,
    stop_after: int,
) -> dict[str, Any]:
    """Submit the checked run (see :func:`launch_run`)."""
    import tomli_w

    out.mkdir(parents=True, exist_ok=True)
    app = write_app(paths)
    overrides = {
        "scenario": str(scenario_path), "out-dir": str(out),
        "metrics-private-key": str(kit.metrics_private_key), "resume": bool(resume),
        "stop-after": int(stop_after), "ledger": str(paths.ledger),
        "site-nodes": str(_nodes_file(paths)),
        # The global model is published with a manifest signed by this key (sites verify it).
        "release-private-key": str(kit.dir / "release.key")
        if (kit.dir / "release.key").is_file() else "",
    }
    run_config = paths.run_dir / "run-config.toml"
    run_config.write_text(tomli_w.dumps(overrides), encoding="utf-8")
    conn = connection_name(kit)
    code, text = _flwr(paths, "run", str(app), conn, "--run-config", str(run_config),
                       "--format", "json", timeout=120.0)
    data = _json_of(text) or {}
    if code != 0 or not data.get("success", False) or "run-id" not in data:
        raise ConfigError(f"flwr run failed: {text[-600:]}",
                          f"check the coordinator (qanafed coord status --kit {kit.dir}) and "
                          f"{paths.log_file}")
    info = {"run-id": int(data["run-id"]), "out-dir": str(out), "ledger": str(paths.ledger),
            "scenario": str(scenario_path), "resume": resume}
    log.info("run %s submitted (%s → %s)", info["run-id"], scenario_path.name, out)
    return info


def run_status(kit_dir: str | Path, run_id: int) -> str:
    """Flower's status of a run (``running``, ``finished:completed``, ``finished:failed``...)."""
    paths = coord_paths(kit_dir)
    kit = validate_coordinator_kit(kit_dir)
    code, text = _flwr(paths, "ls", connection_name(kit), "--run-id", str(run_id),
                       "--format", "json")
    data = _json_of(text) or {}
    runs = data.get("runs") or []
    if code != 0 or not runs:
        raise ConfigError(f"flwr ls --run-id {run_id} failed: {text[-400:]}",
                          "check that the coordinator is running")
    return str(runs[0].get("status", "unknown"))


def wait_run(kit_dir: str | Path, run_id: int, timeout: float | None = None,
             poll: float = 2.0) -> str:
    """Wait until Flower reports the run finished; return its final status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = run_status(kit_dir, run_id)
        if status.startswith("finished"):
            return status
        if deadline is not None and time.monotonic() > deadline:
            return status
        time.sleep(poll)


def coord_status(kit_dir: str | Path) -> dict[str, Any]:
    """Describe the coordinator: daemon, registered nodes (when running) and the ledger."""
    from deploy.ledger import Ledger

    kit = validate_coordinator_kit(kit_dir)
    paths = coord_paths(kit.dir)
    pid = read_pid(paths.pid_file)
    out: dict[str, Any] = {
        "project": kit.config.project,
        "address": kit.superlink_address,
        "running": pid is not None,
        "pid": pid,
        "children": read_state(paths.state_file).get("children", {}) if pid else {},
        "sites": sorted(kit.site_keys),
        "revoked": sorted(r.site for r in kit.revoked),
        "log": str(paths.log_file),
        "ledger": str(paths.ledger),
        "runs": Ledger(paths.ledger).summary() if paths.ledger.is_file() else [],
    }
    return out
