"""A run's progress log (``OUT/progress.jsonl``): one JSON event per line, from the driver."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = ["append_event", "read_events"]


def append_event(path: str | Path, **event: Any) -> dict[str, Any]:
    """Append ``event`` (stamped with ``time``) as one line; return it."""
    event["time"] = time.time()
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(event) + "\n")
    return event


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Return the complete events after byte ``offset`` and the offset to read from next.

    A line still being written (no newline yet) is left for the next call.
    """
    path = Path(path)
    if not path.exists():
        return [], offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n") + 1  # 0: no complete line yet
    lines = data[:end].decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()], offset + end
