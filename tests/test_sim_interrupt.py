"""Ctrl-C during ``qanafed sim``: the first stops within seconds keeping the last checkpoint and
printing the ``--resume`` command; a second one quits at once. Both without a traceback."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.checkpoint import load_latest
from common.progress import read_events

pytestmark = pytest.mark.slow

SCENARIO = """\
name: interrupt
data: "synthetic:n=60,size=48,sites=2,seed=0"
partition: {scheme: natural, sites: 2, seed: 0}
model: {variant: qana-akd1000, size: 48, width: 0.25, depth: 1}
rounds: {warmup: 3, qat: 0}
local-epochs: 1
batch-size: 16
calibration-samples: 16
quorum: {min-sites: 2, min-replies: 2}
timeouts: {connect: 300, round: 600}
seed: 0
"""

#: Generous bounds for a loaded 2-core machine: each is a deadline, never a wait.
START_DEADLINE = 420.0
STOP_DEADLINE = 30.0


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """Start ``qanafed`` in its own session (so a signal can go to its whole group, like Ctrl-C)."""
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "COLUMNS": "400"}
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "qanafed", *args], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _ctrl_c(proc: subprocess.Popen) -> None:
    """Send SIGINT to the process group, as a terminal's Ctrl-C does."""
    os.killpg(proc.pid, signal.SIGINT)


def _wait_for(condition, proc: subprocess.Popen, log: Path, deadline: float, what: str):
    """Poll ``condition()`` until it returns something truthy; fail if the process ends first."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"qanafed ended ({proc.returncode}) before {what}:\n{log.read_text()}")
        time.sleep(0.2)
    pytest.fail(f"no {what} within {deadline:g} s:\n{log.read_text()}")


def _round_started(progress: Path, offset: int, after: int):
    """Return a condition: a ``round-start`` event past ``offset`` for a step above ``after``."""

    def condition():
        events, _ = read_events(progress, offset)
        return any(e["event"] == "round-start" and e["step"] > after for e in events)

    return condition


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def sessions():
    """Process groups started by the test; whatever is left of them is killed at the end."""
    started: list[int] = []
    yield started
    for pgid in started:
        if not _group_gone(pgid):
            os.killpg(pgid, signal.SIGKILL)


def test_ctrl_c_keeps_the_checkpoint_and_prints_resume_then_twice_quits_at_once(
    tmp_path: Path, sessions: list[int]
):
    # Prepare: a tiny scenario; wait until round 1 is checkpointed and round 2 has started
    config = tmp_path / "scenario.yaml"
    config.write_text(SCENARIO)
    out, log = tmp_path / "run", tmp_path / "sim.log"
    progress = out / "progress.jsonl"
    proc = _start(["sim", "--config", str(config), "--out", str(out), "--parallel", "2"], log)
    sessions.append(proc.pid)
    _wait_for(_round_started(progress, 0, after=1), proc, log, START_DEADLINE,
              "round 2 started")

    # Execute: one Ctrl-C
    _ctrl_c(proc)
    try:
        code = proc.wait(timeout=STOP_DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_DEADLINE:g} s after Ctrl-C:\n{log.read_text()}")
    output = log.read_text()

    # Assert: stopped with the status of a Ctrl-C, said how to resume, kept round 1
    assert code == 130, output
    assert "Traceback" not in output, output
    assert "Ctrl-C: stopping" in output, output
    lines = output.splitlines()
    resume = lines[next(i for i, line in enumerate(lines) if "Continue with:" in line) + 1]
    args = shlex.split(resume)
    assert args[:2] == ["qanafed", "sim"] and args[-1] == "--resume", resume
    assert args[args.index("--out") + 1] == str(out)
    assert load_latest(out / "checkpoints").step == 1
    events, _ = read_events(progress)
    assert events[-1]["event"] == "interrupted" and events[-1]["done"] == 1

    # Execute: the printed command resumes; once it runs a round, Ctrl-C twice in a row
    offset = progress.stat().st_size
    proc = _start(args[1:], log)
    sessions.append(proc.pid)
    _wait_for(_round_started(progress, offset, after=1), proc, log, START_DEADLINE,
              "a round started after --resume")
    said = len(log.read_text())
    _ctrl_c(proc)
    _wait_for(lambda: "Ctrl-C: stopping" in log.read_text()[said:], proc, log, STOP_DEADLINE,
              "the first Ctrl-C acknowledged")
    _ctrl_c(proc)
    try:
        code = proc.wait(timeout=STOP_DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after two Ctrl-C:\n{log.read_text()}")
    output = log.read_text()[said:]

    # Assert: quit at once, without a traceback, the checkpoint still loadable
    assert code == 130, output
    assert "Traceback" not in output, output
    assert "Ctrl-C again: quitting now" in output and resume in output, output
    assert load_latest(out / "checkpoints").step >= 1
