"""Peak memory of a process tree: summed PSS from /proc/<pid>/smaps_rollup, sampled in a thread.

PSS (proportional set size) charges shared pages (TensorFlow's libraries in every Ray worker)
once in total rather than once per process, so the sum over the tree is what the machine pays.

Run a command under the sampler: ``python -m bench._procmem -- qanafed sim ...``; it prints
``{"peak_pss_gb", "peak_rss_gb", "seconds"}`` as JSON on the last line of stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants."""
    tree, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def tree_memory(root: int) -> tuple[float, float]:
    """Summed (PSS, RSS) of the tree in bytes."""
    pss = rss = 0
    for pid in tree_pids(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    return float(pss), float(rss)


class PeakMemory:
    """Sample a process tree's memory every ``interval`` s in a daemon thread; keep the peaks.

    Use as a context manager around the work (``root`` defaults to this process).
    """

    def __init__(self, root: int | None = None, interval: float = 1.0) -> None:
        self.root = root or os.getpid()
        self.interval = interval
        self.peak_pss = self.peak_rss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        """Take one sample now."""
        pss, rss = tree_memory(self.root)
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def as_dict(self) -> dict[str, float]:
        """Peaks in GB."""
        return {"peak_pss_gb": round(self.peak_pss / 1024**3, 2),
                "peak_rss_gb": round(self.peak_rss / 1024**3, 2)}


def main(argv: list[str]) -> int:
    cmd = argv[1:] if argv and argv[0] == "--" else argv
    start = time.monotonic()
    proc = subprocess.Popen(cmd)
    with PeakMemory(proc.pid) as peak:
        code = proc.wait()
    print(json.dumps({**peak.as_dict(), "seconds": round(time.monotonic() - start, 1),
                      "returncode": code}), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
