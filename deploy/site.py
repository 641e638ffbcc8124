"""The site daemon: a supervised ``flower-supernode`` started from a checked site kit.

``start_site`` checks the kit and the data (``deploy.kit.validate_site_kit``) and the
SuperNode's runtime port before anything connects, then runs ``flower-supernode`` with TLS
(``--root-certificates``), SuperNode authentication (``--auth-supernode-private-key``), the
node config (``site-id``, ``data-path``, ``metrics-public-key``, ``device``) and its runtime
``--port``, under a :class:`deploy.process.Supervisor` (restart on crash, bounded backoff).
Files live in ``<kit>/run/``: ``site.pid``, ``site.state.json``, ``site.log`` and ``flwr-home/``
(where flwr installs the run's app bundle).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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

__all__ = [
    "DEFAULT_ISOLATION",
    "ISOLATIONS",
    "SitePaths",
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


def start_site(
    kit_dir: str | Path,
    foreground: bool = False,
    isolation: Isolation = DEFAULT_ISOLATION,
    policy: RestartPolicy | None = None,
) -> dict[str, Any]:
    """Check the kit, data and port, then run the site's SuperNode under a supervisor.

    Parameters
    ----------
    kit_dir : str | Path
        The site kit.
    foreground : bool (default: False)
        Run the supervisor in this process until SIGTERM (systemd, ``start.sh``); otherwise
        start it detached and return.
    isolation : str (default: "warm")
        See :data:`ISOLATIONS`; ``warm`` saves the TensorFlow import, the data loading and the
        model build per message, ``warm-fork`` only the import (deploy/README.md, section 5).
    policy : RestartPolicy | None (default: None)
        Restart policy (default :class:`RestartPolicy`).

    Returns
    -------
    dict[str, Any]
        ``site``, ``pid``, ``log``, ``superlink``, ``fingerprint`` (foreground: after it stopped,
        with ``exit-code``).

    Raises
    ------
    ConfigError, SecurityError, DataError
        A bad kit, data path, or a runtime port in use — naming the file and the fix.
    """
    kit = validate_site_kit(kit_dir, check_data=True)
    paths = site_paths(kit.dir)
    require_not_running(paths.pid_file, f"site {kit.site_id}",
                        f"qanafed site stop --kit {kit.dir}")
    require_free_port(RUNTIME_HOST, kit.config.runtime_port, "SuperNode runtime-port",
                      kit.dir / SITE_YAML)
    info = {"site": kit.site_id, "superlink": kit.superlink, "fingerprint": kit.fingerprint,
            "log": str(paths.log_file), "isolation": isolation}
    if not foreground:
        argv = python_argv("site", "start", "--kit", str(kit.dir), "--foreground",
                           "--isolation", isolation)
        info["pid"] = spawn_background(argv, paths.log_file, paths.pid_file)
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


def stop_site(kit_dir: str | Path, timeout: float = 30.0) -> int | None:
    """Stop the site daemon of ``kit_dir``; return its pid, or None if none was running."""
    return stop_pid(site_paths(kit_dir).pid_file, timeout)


def site_status(kit_dir: str | Path, log_lines: int = 5) -> dict[str, Any]:
    """Describe the site daemon of ``kit_dir``: running or not, pids, restarts, last log lines.

    The kit is validated without the data check (status must work even when data moved).
    """
    kit = validate_site_kit(kit_dir, check_data=False)
    paths = site_paths(kit.dir)
    pid = read_pid(paths.pid_file)
    state = read_state(paths.state_file)
    tail: list[str] = []
    if paths.log_file.is_file():
        with open(paths.log_file, "rb") as fh:
            fh.seek(max(0, paths.log_file.stat().st_size - 8192))
            tail = fh.read().decode("utf-8", "replace").splitlines()[-log_lines:]
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
        "log": str(paths.log_file),
        "log-tail": tail,
    }
