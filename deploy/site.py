"""The site daemon: a supervised ``flower-supernode`` started from a checked site kit.

``start_site`` checks the kit (``deploy.kit.validate_site_kit``), the data (readable, with
images: the loader ``qanafed data inspect`` uses, no image decoded) and the SuperNode's runtime
port before anything connects, then runs ``flower-supernode`` with TLS
(``--root-certificates``), SuperNode authentication (``--auth-supernode-private-key``), the
node config (``site-id``, ``data-path``, ``metrics-public-key``, ``device``) and its runtime
``--port``, under a :class:`deploy.process.Supervisor` (restart on crash, bounded backoff).
Files live in ``<kit>/run/``: ``site.pid``, ``site.state.json``, ``site.log`` and ``flwr-home/``
(where flwr installs the run's app bundle). A detached start returns only once the SuperNode
is connected (``SuperNode ID`` in its log, see :mod:`deploy.site_health`); a TLS failure or no
connection within the timeout stops it again and raises.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.errors import ConfigError, DataError, SecurityError
from common.log import get_logger
from deploy.kit import SITE_YAML, SiteKit, validate_site_kit
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
)
from deploy.site_health import Connection, connection_of, read_log

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_ISOLATION",
    "ISOLATIONS",
    "SitePaths",
    "check_site_data",
    "site_paths",
    "site_status",
    "start_site",
    "stop_site",
    "supernode_argv",
]

log = get_logger("deploy.site")

#: How a site runs its ClientApp (see deploy/README.md for the measurements behind the default):
#: ``warm`` (default): ``flower-supernode --isolation process`` plus one long-lived qanafed
#: executor that imported TensorFlow once and runs every message in-process, keeping the site's
#: data and compiled models cached between messages. ``warm-fork``: the same executor, but it
#: forks itself per message (imports shared, data and model rebuilt). ``subprocess``: flwr's
#: default, a fresh ``flwr-clientapp`` process (and TensorFlow import) per message.
ISOLATIONS = ("warm", "warm-fork", "subprocess")
Isolation = Literal["warm", "warm-fork", "subprocess"]
DEFAULT_ISOLATION: Isolation = "warm"
_EXECUTOR_MODE = {"warm": "inprocess", "warm-fork": "fork"}
RUNTIME_HOST = "127.0.0.1"
#: Seconds a detached start waits for the SuperNode's first successful connection.
DEFAULT_CONNECT_TIMEOUT = 60.0


@dataclass(frozen=True)
class SitePaths:
    """Run files of a site kit (``<kit>/run/``)."""

    run_dir: Path

    @property
    def pid_file(self) -> Path:
        """The supervisor's pid file."""
        return self.run_dir / "site.pid"

    @property
    def state_file(self) -> Path:
        """The supervisor's state (children, pids, restarts)."""
        return self.run_dir / "site.state.json"

    @property
    def log_file(self) -> Path:
        """The SuperNode's log."""
        return self.run_dir / "site.log"

    @property
    def flwr_home(self) -> Path:
        """``FLWR_HOME`` of the SuperNode (installed app bundles)."""
        return self.run_dir / "flwr-home"


def site_paths(kit_dir: str | Path) -> SitePaths:
    """Return the run files of the kit in ``kit_dir``."""
    return SitePaths(Path(kit_dir).expanduser().resolve() / "run")


def _bin(name: str) -> str:
    """Return an executable of this environment (the venv's, even off PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else name


def child_env(flwr_home: Path) -> dict[str, str]:
    """Environment of flwr children: this venv first on PATH, the kit's FLWR_HOME, 1 TF thread."""
    path = os.environ.get("PATH", "")
    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{path}",
        "FLWR_HOME": str(flwr_home),
        "TF_NUM_INTRAOP_THREADS": os.environ.get("TF_NUM_INTRAOP_THREADS", "1"),
        "TF_NUM_INTEROP_THREADS": os.environ.get("TF_NUM_INTEROP_THREADS", "1"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        "PYTHONUNBUFFERED": "1",
    }


def _node_config(kit: SiteKit) -> str:
    items = []
    for key, value in kit.node_config().items():
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        items.append(f'{key}="{text}"')
    return " ".join(items)


def supernode_argv(kit: SiteKit, isolation: Isolation = "subprocess") -> list[str]:
    """Return the ``flower-supernode`` command of a validated site kit.

    Parameters
    ----------
    kit : SiteKit
        The validated kit.
    isolation : str (default: "subprocess")
        ``subprocess`` (flwr starts a ClientApp process per message), or ``warm`` /
        ``warm-fork`` (an external long-lived executor, see :mod:`deploy.warm_exec`).
    """
    return [
        _bin("flower-supernode"),
        "--superlink", kit.superlink,
        "--root-certificates", str(kit.ca_cert),
        "--auth-supernode-private-key", str(kit.private_key),
        "--node-config", _node_config(kit),
        "--host", RUNTIME_HOST,
        "--port", str(kit.config.runtime_port),
        "--isolation", "subprocess" if isolation == "subprocess" else "process",
    ]


def _children(kit: SiteKit, isolation: Isolation, paths: SitePaths) -> list[Child]:
    env = child_env(paths.flwr_home)
    children = [Child("supernode", supernode_argv(kit, isolation), env)]
    if isolation in _EXECUTOR_MODE:
        runtime = f"{RUNTIME_HOST}:{kit.config.runtime_port}"
        children.append(Child(
            "clientapp-executor",
            [sys.executable, "-m", "deploy.warm_exec", "--runtime-api-address", runtime,
             "--mode", _EXECUTOR_MODE[isolation]],
            env,
        ))
    return children


def check_site_data(kit: SiteKit) -> dict[str, Any]:
    """Check that the site's data loads as its ClientApp will load it and holds images.

    Uses the loader behind ``qanafed data inspect`` (format detection and index; no image is
    decoded), so a wrong or empty folder is refused here instead of in every round.

    Returns
    -------
    dict[str, Any]
        ``format`` and ``images``.

    Raises
    ------
    DataError
        Naming the data path, ``site.yaml`` and what the loader expected.
    """
    from common.loaders import load_dataset

    where = f"data path {str(kit.data)!r} of site {kit.site_id!r} (from {kit.dir / SITE_YAML})"
    inspect = f"check it with `qanafed data inspect {kit.data}`"
    try:
        ds = load_dataset(kit.data)
    except DataError as err:
        raise DataError(f"{where}: {err.problem}", f"{err.fix}; {inspect}") from None
    if len(ds) == 0:
        raise DataError(f"{where} holds no images ({ds.format} format)",
                        f"put the site's images there; {inspect}")
    return {"format": ds.format, "images": len(ds)}


def start_site(
    kit_dir: str | Path,
    foreground: bool = False,
    isolation: Isolation = DEFAULT_ISOLATION,
    policy: RestartPolicy | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> dict[str, Any]:
    """Check the kit, data and port, then run the site's SuperNode under a supervisor.

    Parameters
    ----------
    kit_dir : str | Path
        The site kit.
    foreground : bool (default: False)
        Run the supervisor in this process until SIGTERM (systemd, ``start.sh``); otherwise
        start it detached and return once it is connected.
    isolation : str (default: "warm")
        See :data:`ISOLATIONS`; ``warm`` saves the TensorFlow import, the data loading and the
        model build per message, ``warm-fork`` only the import (deploy/README.md, section 5).
    policy : RestartPolicy | None (default: None)
        Restart policy (default :class:`RestartPolicy`).
    connect_timeout : float (default: 60.0)
        Detached start: seconds to wait for the first successful connection to the SuperLink
        (0: do not wait).

    Returns
    -------
    dict[str, Any]
        ``site``, ``pid``, ``log``, ``superlink``, ``fingerprint``, ``data``; detached:
        ``connection`` (:class:`deploy.site_health.Connection` as a dict: ``connected``, or
        ``failing`` when the SuperLink refused the key, which the coordinator can fix while the
        supervisor retries); foreground: after it stopped, ``exit-code``.

    Raises
    ------
    ConfigError, SecurityError, DataError
        A bad kit, data path, or a runtime port in use — naming the file and the fix;
        detached: a TLS failure (SecurityError) or no connection within ``connect_timeout``
        (ConfigError), after stopping what was started.
    """
    kit = validate_site_kit(kit_dir, check_data=True)
    paths = site_paths(kit.dir)
    require_not_running(paths.pid_file, f"site {kit.site_id}",
                        f"qanafed site stop --kit {kit.dir}")
    require_free_port(RUNTIME_HOST, kit.config.runtime_port, "SuperNode runtime-port",
                      kit.dir / SITE_YAML)
    data = check_site_data(kit)
    info = {"site": kit.site_id, "superlink": kit.superlink, "fingerprint": kit.fingerprint,
            "log": str(paths.log_file), "isolation": isolation, "data": data}
    if not foreground:
        argv = python_argv("site", "start", "--kit", str(kit.dir), "--foreground",
                           "--isolation", isolation)
        offset = paths.log_file.stat().st_size if paths.log_file.is_file() else 0
        info["pid"] = spawn_background(argv, paths.log_file, paths.pid_file)
        if connect_timeout > 0:
            info["connection"] = _await_connection(kit, paths, offset, connect_timeout).to_dict()
        return info
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    paths.flwr_home.mkdir(exist_ok=True)
    supervisor = Supervisor(f"site {kit.site_id}", _children(kit, isolation, paths),
                            paths.run_dir, "site", policy)
    info["pid"] = os.getpid()
    log.info("site %s: SuperNode → %s (key %s), log %s", kit.site_id, kit.superlink,
             kit.fingerprint, paths.log_file)
    info["exit-code"] = supervisor.run()
    return info


def _await_connection(kit: SiteKit, paths: SitePaths, offset: int, timeout: float) -> Connection:
    """Wait for the detached SuperNode's first connection; stop it and raise if none comes.

    Returns ``connected``, or ``failing`` when the SuperLink refused to activate the key (the
    coordinator can fix that by registering it; the supervisor retries meanwhile).
    """
    deadline = time.monotonic() + timeout
    state = Connection("starting")
    while time.monotonic() < deadline:
        state = connection_of(read_log(paths.log_file, offset), kit.superlink,
                              kit.fingerprint, kit.dir)
        if state.status == "connected" or state.cause == "unregistered":
            return state
        if state.cause == "tls":
            stop_site(kit.dir)
            raise SecurityError(f"site {kit.site_id} did not start: {state.reason}", state.fix)
        if read_pid(paths.pid_file) is None:
            why = state.reason or "its supervisor exited"
            raise ConfigError(f"site {kit.site_id} stopped while connecting: {why}",
                              state.fix or f"read {paths.log_file} for the reason")
        time.sleep(0.3)
    stop_site(kit.dir)
    why = state.reason or f"no SuperNode connection logged in {paths.log_file}"
    raise ConfigError(
        f"site {kit.site_id} was not connected to {kit.superlink} within {timeout:g} s ({why}); "
        "it was stopped again",
        (state.fix + "; " if state.fix else "")
        + "or give it longer with `qanafed site start --connect-timeout SECONDS`",
    )


def stop_site(kit_dir: str | Path, timeout: float = 30.0) -> int | None:
    """Stop the site daemon of ``kit_dir``; return its pid, or None if none was running."""
    return stop_pid(site_paths(kit_dir).pid_file, timeout)


def site_status(kit_dir: str | Path, log_lines: int = 5) -> dict[str, Any]:
    """Describe the site daemon of ``kit_dir``: running or not, pids, restarts, last log lines.

    ``connection`` is the state its log shows (:func:`deploy.site_health.connection_of`): for a
    stopped site, that of its last SuperNode. The kit is validated without the data check
    (status must work even when data moved).
    """
    kit = validate_site_kit(kit_dir, check_data=False)
    paths = site_paths(kit.dir)
    pid = read_pid(paths.pid_file)
    state = read_state(paths.state_file)
    text = read_log(paths.log_file)
    tail = text.splitlines()[-log_lines:]
    connection = connection_of(text, kit.superlink, kit.fingerprint, kit.dir)
    return {
        "site": kit.site_id,
        "running": pid is not None,
        "pid": pid,
        "superlink": kit.superlink,
        "fingerprint": kit.fingerprint,
        "data": str(kit.data),
        "data-exists": kit.data.exists(),
        "runtime-port": kit.config.runtime_port,
        "children": state.get("children", {}) if pid is not None else {},
        "connection": connection.to_dict(),
        "log": str(paths.log_file),
        "log-tail": tail,
    }
