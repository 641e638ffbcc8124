"""A whole federation on 127.0.0.1 for drills, tests and benchmarks: ports, data, kits, waits.

The deployment end-to-end test and ``bench/deployment.py`` both provision real kits into a
temporary folder, start the coordinator and the sites with the ``qanafed`` CLI (detached,
supervised daemons) and follow the run through its ``progress.jsonl``; these are the pieces
they share. Nothing here is needed on a real site.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from common.progress import read_events
from deploy.process import kill_tree

__all__ = [
    "Daemons",
    "events",
    "free_ports",
    "has_event",
    "qanafed",
    "wait_for",
    "write_project",
    "write_site_data",
]

T = TypeVar("T")


def free_ports(n: int) -> list[int]:
    """Return ``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks = []
    for _ in range(n):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
    ports = [s.getsockname()[1] for s in socks]
    for sock in socks:
        sock.close()
    return ports


def write_site_data(root: Path, spec: str, sites: Sequence[str], seed: int = 0) -> dict[str, Path]:
    """Split a synthetic data set evenly into one MedMNIST-style npz per site.

    Parameters
    ----------
    root : Path
        Where ``<site>/dermamnist.npz`` go.
    spec : str
        Synthetic spec, e.g. ``"synthetic:n=120,size=48,sites=2,seed=0"``.
    sites : Sequence[str]
        Site names, in split order.
    seed : int (default: 0)
        Shuffles the images before the split.

    Returns
    -------
    dict[str, Path]
        Site → its npz file.
    """
    from common.loaders import load_synthetic

    ds = load_synthetic(spec)
    order = np.random.default_rng(seed).permutation(len(ds.labels))
    out = {}
    for site, idx in zip(sites, np.array_split(order, len(sites)), strict=True):
        (root / site).mkdir(parents=True, exist_ok=True)
        out[site] = root / site / "dermamnist.npz"
        np.savez(out[site], train_images=ds.images[idx], train_labels=ds.labels[idx])
    return out


def write_project(
    path: Path, data: dict[str, Path], ports: Sequence[int], name: str = "loopback"
) -> Path:
    """Write a PROJECT.yaml: a coordinator on 127.0.0.1:``ports[0]``, site i on ``ports[1+i]``.

    Parameters
    ----------
    path : Path
        The file to write.
    data : dict[str, Path]
        Site → its data path, in port order.
    ports : Sequence[int]
        SuperLink port, then one runtime port per site.
    name : str (default: "loopback")
        Project name.
    """
    lines = [f"name: {name}", "coordinator:", "  address: 127.0.0.1", f"  port: {ports[0]}",
             "  bind-host: 127.0.0.1", "sites:"]
    for i, (site, where) in enumerate(data.items()):
        lines += [f"  - name: {site}", f"    data: {where}", "    device: cpu",
                  f"    runtime-port: {ports[1 + i]}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def qanafed(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``python -m qanafed ARGS`` with this interpreter; capture its output."""
    return subprocess.run([sys.executable, "-m", "qanafed", *args],  # noqa: S603
                          capture_output=True, text=True, timeout=timeout)


def wait_for(what: str, check: Callable[[], T], timeout: float, poll: float = 0.5) -> T:
    """Poll ``check()`` until it returns something truthy; return it.

    Raises
    ------
    TimeoutError
        After ``timeout`` seconds, naming ``what``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def events(progress: Path) -> list[dict[str, Any]]:
    """Return the events a run wrote to its ``progress.jsonl`` so far."""
    return read_events(progress)[0]


def has_event(progress: Path, **match: Any) -> bool:
    """Whether ``progress.jsonl`` holds an event with every ``key=value`` of ``match``."""
    return any(all(ev.get(k) == v for k, v in match.items()) for ev in events(progress))


class Daemons:
    """Start coordinator and site daemons with the CLI; kill every one of them at the end.

    Use as a context manager: on exit each daemon's whole process tree is killed (flwr puts
    its SuperExec and app processes in sessions of their own, so by parentage, then by group).
    """

    def __init__(self) -> None:
        self.groups: list[int] = []

    def start(self, group: str, kit: Path, *options: str) -> int:
        """``qanafed GROUP start --kit KIT OPTIONS``; return the supervisor's pid.

        Raises
        ------
        RuntimeError
            If the CLI fails (its stderr attached).
        """
        from deploy.coord import coord_paths
        from deploy.site import site_paths

        res = qanafed(group, "start", "--kit", str(kit), *options)
        if res.returncode != 0:
            raise RuntimeError(f"qanafed {group} start --kit {kit} failed: {res.stderr}")
        paths = coord_paths(kit) if group == "coord" else site_paths(kit)
        pid = int(paths.pid_file.read_text(encoding="utf-8").strip())
        self.groups.append(pid)
        return pid

    def kill_all(self) -> None:
        """SIGKILL every daemon started here, with its descendants."""
        for pgid in self.groups:
            kill_tree(pgid)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> Daemons:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()
