"""Process supervision: pid files, port checks, background start/stop and a restart policy.

A daemon (a site's SuperNode, the coordinator's SuperLink) runs as one *supervisor* process
that starts its children in its own process group, restarts a child that dies with an
exponential backoff, and gives up after too many restarts in a window. The supervisor writes
``<name>.pid`` (its own pid) and ``<name>.state.json`` (children, pids, restarts) in the kit's
``run/`` folder; the children's output goes to ``<name>.log`` there.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from common.errors import ConfigError
from common.log import get_logger

__all__ = [
    "Child",
    "RestartPolicy",
    "Supervisor",
    "descendants",
    "kill_tree",
    "pid_alive",
    "python_argv",
    "port_in_use",
    "read_pid",
    "read_state",
    "require_free_port",
    "require_not_running",
    "spawn_background",
    "stop_pid",
    "wait_for_port",
]

log = get_logger("deploy.process")


# ------------------------------------------------------------------------------------ ports


def port_in_use(host: str, port: int) -> bool:
    """Return True if ``host:port`` cannot be bound (something listens there already)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def require_free_port(host: str, port: int, what: str, source: str | Path) -> None:
    """Refuse to start when ``host:port`` is taken.

    Raises
    ------
    ConfigError
        Naming the port, what needs it, and the file that sets it.
    """
    if port_in_use(host, port):
        raise ConfigError(
            f"port {port} on {host} ({what}, set in {source}) is already in use",
            f"stop what listens there (`ss -ltnp 'sport = :{port}'`), or change the port in "
            f"{source} (re-run qanafed provision with another port)",
        )


def wait_for_port(
    host: str, port: int, timeout: float, alive: Callable[[], bool] | None = None
) -> bool:
    """Wait until something accepts TCP connections on ``host:port``.

    Parameters
    ----------
    host, port
        Where to connect (``0.0.0.0`` is probed on 127.0.0.1).
    timeout : float
        Seconds to wait.
    alive : Callable[[], bool] | None (default: None)
        Stop waiting early (False) when this says the process died.
    """
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((probe, port), timeout=1.0):
                return True
        except OSError:
            pass
        if alive is not None and not alive():
            return False
        time.sleep(0.2)
    return False


# --------------------------------------------------------------------------------- pid files


def pid_alive(pid: int) -> bool:
    """Return True if a process with this pid exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def descendants(pid: int) -> list[int]:
    """Return the pids of every live descendant of ``pid`` (from ``/proc``), children first.

    flwr starts ``flower-superexec`` in a session of its own, so killing a daemon's process
    group does not reach it or its ServerApp/ClientApp processes; these are found by parentage.
    """
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="utf-8")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(parents.get(pid, []))
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo.extend(parents.get(child, []))
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to ``pid``'s descendants (collected first) and to ``pid``; return them all."""
    pids = [*descendants(pid), pid]
    for target in pids:
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass
    return pids


def read_pid(pid_file: str | Path) -> int | None:
    """Return the live pid in ``pid_file``, or None (a stale pid file is removed)."""
    path = Path(pid_file)
    try:
        pid = int(path.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
    if pid_alive(pid):
        return pid
    path.unlink(missing_ok=True)
    return None


def require_not_running(pid_file: str | Path, what: str, stop_command: str) -> None:
    """Refuse to start ``what`` twice: raise ConfigError if ``pid_file`` names a live process.

    Parameters
    ----------
    pid_file : str | Path
        The daemon's pid file.
    what : str
        What is starting, for the message (e.g. ``"site a"``).
    stop_command : str
        The command that stops the running one, for the fix.
    """
    running = read_pid(pid_file)
    if running is not None:
        raise ConfigError(f"{what} is already running (pid {running}, {pid_file})",
                          f"stop it first: {stop_command}")


def read_state(state_file: str | Path) -> dict[str, Any]:
    """Return the supervisor's state file (children, pids, restarts), or ``{}``."""
    try:
        return json.loads(Path(state_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def stop_pid(pid_file: str | Path, timeout: float = 30.0) -> int | None:
    """Stop the supervisor in ``pid_file``: SIGTERM, wait, then SIGKILL its process group.

    Returns
    -------
    int | None
        The pid that was stopped, or None if nothing was running.
    """
    pid = read_pid(pid_file)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.2)
    if pid_alive(pid):
        log.warning("pid %d did not stop within %g s; killing its process group", pid, timeout)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    Path(pid_file).unlink(missing_ok=True)
    return pid


def spawn_background(
    argv: Sequence[str], log_file: str | Path, pid_file: str | Path, wait: float = 5.0
) -> int:
    """Start ``argv`` (a ``--foreground`` supervisor) detached, in its own session.

    Waits up to ``wait`` seconds for it to write ``pid_file``.

    Raises
    ------
    ConfigError
        If it exits at once (its log says why).
    """
    log_path = Path(log_file)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(  # noqa: S603
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(
                f"{' '.join(argv[-5:])} exited at once with code {proc.returncode}",
                f"read {log_path} for the reason",
            )
        if read_pid(pid_file) == proc.pid:
            break
        time.sleep(0.1)
    return proc.pid


# -------------------------------------------------------------------------------- supervisor


@dataclass(frozen=True)
class RestartPolicy:
    """When a crashed child is restarted.

    Parameters
    ----------
    max_restarts : int (default: 8)
        Restarts allowed within ``window`` seconds; one more and the supervisor gives up.
        Enough to outlast the ~60 s a SuperLink keeps a killed SuperNode's identity
        "online" (it refuses to re-activate it until then).
    window : float (default: 600.0)
        Seconds over which restarts are counted.
    backoff : float (default: 1.0)
        Delay before the first restart; doubled after each consecutive one.
    max_backoff : float (default: 30.0)
        Longest delay.
    """

    max_restarts: int = 8
    window: float = 600.0
    backoff: float = 1.0
    max_backoff: float = 30.0


@dataclass
class Child:
    """One supervised command.

    Parameters
    ----------
    name : str
        Short name (``supernode``, ``superlink``, ``clientapp-server``).
    argv : list[str]
        The command.
    env : dict[str, str] | None (default: None)
        Extra environment variables.
    after_start : Callable[[Child], None] | None (default: None)
        Called after every (re)start, e.g. to register keys once the port is open.
    """

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    after_start: Callable[[Child], None] | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    restarts: list[float] = field(default_factory=list, repr=False)
    started_at: float = 0.0

    def alive(self) -> bool:
        """Return True while the child runs."""
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    """Run children, restart any that dies (bounded, with backoff), stop all on SIGTERM.

    Parameters
    ----------
    name : str
        Daemon name (``site-<id>``, ``coordinator``), for logs.
    children : list[Child]
        What to run, started in order.
    run_dir : Path
        Where ``<stem>.pid``, ``<stem>.state.json`` and ``<stem>.log`` go.
    stem : str
        File name stem (``site``, ``coordinator``).
    policy : RestartPolicy (default: RestartPolicy())
        Restart policy.
    """

    def __init__(
        self,
        name: str,
        children: list[Child],
        run_dir: Path,
        stem: str,
        policy: RestartPolicy | None = None,
    ) -> None:
        self.name = name
        self.children = children
        self.run_dir = Path(run_dir)
        self.pid_file = self.run_dir / f"{stem}.pid"
        self.state_file = self.run_dir / f"{stem}.state.json"
        self.log_file = self.run_dir / f"{stem}.log"
        self.policy = policy or RestartPolicy()
        self._stopping = False
        self._log_fh: IO[bytes] | None = None

    # -- bookkeeping --------------------------------------------------------------------------
    def _write_state(self, status: str) -> None:
        state = {
            "name": self.name,
            "status": status,
            "supervisor-pid": os.getpid(),
            "children": {
                c.name: {
                    "pid": c.proc.pid if c.alive() else None,
                    "started": c.started_at,
                    "restarts": len(c.restarts),
                    "argv": c.argv,
                }
                for c in self.children
            },
            "time": time.time(),
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        tmp.replace(self.state_file)

    def _start(self, child: Child) -> None:
        env = {**os.environ, **(child.env or {})}
        child.proc = subprocess.Popen(  # noqa: S603
            child.argv, stdin=subprocess.DEVNULL, stdout=self._log_fh, stderr=subprocess.STDOUT,
            env=env,
        )
        child.started_at = time.time()
        log.info("%s: started %s (pid %d)", self.name, child.name, child.proc.pid)
        self._write_state("running")
        if child.after_start is not None:
            child.after_start(child)

    def _terminate_all(self, timeout: float = 15.0) -> None:
        strays: list[int] = []
        for child in reversed(self.children):
            if child.alive():
                strays += descendants(child.proc.pid)
                child.proc.terminate()
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s: %s did not stop; killing it", self.name, child.name)
                child.proc.kill()
                child.proc.wait()
        for pid in strays:  # flwr's SuperExec and its app processes live in their own session
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stopping = True

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(0.1)

    def _may_restart(self, child: Child) -> float | None:
        """Delay before restarting ``child``, or None if the policy says give up."""
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < self.policy.window]
        if len(child.restarts) >= self.policy.max_restarts:
            return None
        delay = min(self.policy.max_backoff, self.policy.backoff * 2 ** len(child.restarts))
        child.restarts.append(now)
        return delay

    # -- main loop ----------------------------------------------------------------------------
    def run(self, poll: float = 0.5) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or a child exhausts its restarts (exit 1)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.pid_file.write_text(f"{os.getpid()}\n", encoding="utf-8")
        code = 0
        with open(self.log_file, "ab", buffering=0) as self._log_fh:
            try:
                for child in self.children:
                    if not self._stopping:
                        self._start(child)
                while not self._stopping:
                    for child in self.children:
                        if self._stopping or child.alive():
                            continue
                        rc = child.proc.returncode if child.proc is not None else None
                        delay = self._may_restart(child)
                        if delay is None:
                            log.error(
                                "%s: %s exited (code %s) %d times within %g s; giving up "
                                "(see %s)", self.name, child.name, rc, self.policy.max_restarts,
                                self.policy.window, self.log_file,
                            )
                            self._stopping, code = True, 1
                            break
                        log.warning("%s: %s exited (code %s); restart %d in %.1f s",
                                    self.name, child.name, rc, len(child.restarts), delay)
                        self._write_state("restarting")
                        self._sleep(delay)
                        if not self._stopping:
                            self._start(child)
                    time.sleep(poll)
            finally:
                self._terminate_all()
                self._write_state("stopped" if code == 0 else "failed")
                self.pid_file.unlink(missing_ok=True)
                log.info("%s: stopped", self.name)
        return code


def python_argv(*args: str) -> list[str]:
    """Return the command running ``qanafed ARGS`` with this interpreter."""
    return [sys.executable, "-m", "qanafed", *args]
