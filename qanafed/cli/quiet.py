"""Keep native TensorFlow/CUDA/absl start-up lines off the console of a CLI command."""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
from collections.abc import Callable

#: Lines written by native libraries straight to file descriptor 2: absl/glog records
#: (``W0000 00:00:1796… 25853 cuda_dnn.cc:8579] …``), TensorFlow's own records
#: (``2026-12-08 01:03:05.100562: E external/…/cuda_platform.cc:51] …``), absl's pre-init
#: banner and TensorFlow's CPU-feature notice. Ray prefixes a worker's lines with ``(Actor pid=N)``.
NATIVE_NOISE = re.compile(
    r"^(?:(?:\x1b\[[\d;]*m)?\((?:\S+ )?pid=\d+\)(?:\x1b\[[\d;]*m)?\s*)?(?:"
    r"[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w./-]+:\d+\]"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] [\w./-]+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r")"
)

_state: dict[str, object] = {}


def is_native_noise(line: str) -> bool:
    """Tell whether a console line was written by a native library at start-up."""
    return NATIVE_NOISE.match(line) is not None


def filter_native_stderr(sink: Callable[[str], None] | None = None) -> None:
    """Route file descriptor 2 through a filter that drops native noise lines.

    Python's own ``sys.stderr`` (rich progress, logging, tracebacks) is moved to a copy of the
    original descriptor, so it keeps its terminal (colours, live tables) and is never delayed.
    What native code and child processes write to descriptor 2 passes through a pipe: lines
    matching :data:`NATIVE_NOISE` go to ``sink`` (e.g. a run log) or nowhere, every other line
    reaches the console unchanged. Idempotent; a no-op where descriptor 2 is not available or
    ``sys.stderr`` is already redirected (a test runner capturing output, Typer's CliRunner).

    Parameters
    ----------
    sink : Callable[[str], None] | None (default: None)
        Receives each dropped line (without its newline).
    """
    if _state or sys.stderr is not sys.__stderr__:
        return
    try:
        sys.stderr.flush()
        console_fd = os.dup(2)
    except (OSError, ValueError):
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = os.fdopen(
        console_fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
    )

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for raw in pipe:
                line = raw.decode("utf-8", "backslashreplace").rstrip("\n")
                if is_native_noise(line):
                    if sink is not None:
                        sink(line)
                else:
                    os.write(console_fd, raw)

    thread = threading.Thread(target=pump, name="qanafed-stderr-filter", daemon=True)
    thread.start()
    _state.update(console_fd=console_fd, thread=thread)
    atexit.register(_drain)


def _drain() -> None:
    """At exit, close our end of the pipe and let the filter forward what is left."""
    thread = _state.get("thread")
    if not isinstance(thread, threading.Thread):
        return
    try:
        os.dup2(int(_state["console_fd"]), 2)  # type: ignore[arg-type]
    except OSError:
        return
    thread.join(timeout=0.5)
