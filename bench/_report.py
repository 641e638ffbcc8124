"""Shared bench helpers: machine facts and replacing one section of bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict[str, object]:
    """CPU count, model, RAM and load at the time of the run."""
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    facts: dict[str, object] = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "ram_gb": round(mem_kb / 1024**2, 1),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    facts["summary"] = (
        f"{facts['cpu_model']}, {facts['nproc']} cores, {facts['ram_gb']} GB RAM, "
        f"load {facts['load_avg_1min']} at start, Python {facts['python']}"
    )
    return facts


def update_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the ``## {title}`` section of a markdown file with ``body``."""
    heading = f"## {title}"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = current.splitlines()
    new = [heading, "", *body.rstrip("\n").splitlines(), ""]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        lines[start:end] = new
    else:
        lines += ["", *new]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
