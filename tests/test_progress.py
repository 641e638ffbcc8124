"""The run's progress log: appended events are read once each, a half-written line waits."""

from __future__ import annotations

import json
from pathlib import Path

from common.progress import append_event, read_events


def test_events_are_read_incrementally_and_a_partial_line_waits(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    assert read_events(path) == ([], 0)  # not written yet
    first = append_event(path, event="start", total=3, done=0)
    append_event(path, event="round-end", step=1, phase="warmup")
    events, offset = read_events(path)
    assert [e["event"] for e in events] == ["start", "round-end"]
    assert events[0] == first and isinstance(first["time"], float)
    # A writer caught mid-line: the fragment is not parsed, and is read once complete
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"event": "done"})[:7])
    assert read_events(path, offset) == ([], offset)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"event": "done"})[7:] + "\n")
    events, end = read_events(path, offset)
    assert [e["event"] for e in events] == ["done"]
    assert end == path.stat().st_size
    assert read_events(path, end) == ([], end)
