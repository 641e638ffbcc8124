"""End-to-end on 127.0.0.1: provisioned kits, a TLS + authenticated SuperLink, 2 sites, faults.

One test, because every step needs the processes of the previous one: an unregistered
(revoked) site is refused; site b's SuperNode is killed mid-round, once it has received the
round's work (the round finishes with the quorum, the supervisor restarts b with the same key
and b rejoins); the coordinator is killed mid-run and restarted (the run resumes from its last
complete round); the ledger holds every decrypted report. Every process is started here and
killed by its process-group id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from deploy.loopback import (
    Daemons,
    events,
    free_ports,
    has_event,
    qanafed,
    wait_for,
    write_project,
    write_site_data,
)
from server.protocol import WARMUP

pytestmark = pytest.mark.slow

SCENARIO = """\
name: e2e
data: "synthetic:n=120,size=48,sites=2,seed=0"
partition: {scheme: natural, sites: 2, seed: 0}
model: {variant: qana-akd1000, size: 48, width: 0.25, depth: 1}
rounds: {warmup: 3, qat: 1}
local-epochs: 1
batch-size: 32
lr: 0.01
calibration-samples: 16
quorum: {min-sites: 2, min-replies: 1}
timeouts: {connect: 120, round: 90}
edge: {shots: 1, neurons-per-class: 1}
dp: {enabled: true, clip: 100.0, noise-multiplier: 0.05, delta: 1.0e-5}
seed: 0
"""


def _received(log: Path, message_type: str) -> bool:
    """Whether a SuperNode's log says it received its first ``message_type`` message."""
    text = log.read_text(errors="replace")
    at = text.find(f"Receiving: {message_type} message")
    return at >= 0 and "Received successfully" in text[at:]


def test_deployment_on_loopback(tmp_path: Path) -> None:
    from deploy.coord import coord_paths, launch_run, wait_run
    from deploy.ledger import Ledger, audit_ledger
    from deploy.process import kill_tree
    from deploy.provision import provision
    from deploy.site import site_paths

    # Prepare: data, kits for a, b, c, then c removed (its key revoked, never registered)
    data = write_site_data(tmp_path / "data", "synthetic:n=120,size=48,sites=2,seed=0", "ab")
    (tmp_path / "data" / "c").mkdir()
    data["c"] = Path(shutil.copy(data["b"], tmp_path / "data" / "c"))
    ports = free_ports(4)
    kits = tmp_path / "kits"
    provision(write_project(tmp_path / "p3.yaml", data, ports, "e2e"), kits)
    provision(write_project(tmp_path / "p2.yaml", {s: data[s] for s in "ab"}, ports, "e2e"),
              kits)
    coord, site = kits / "coordinator", {s: kits / "sites" / s for s in "abc"}
    scenario = tmp_path / "e2e.yaml"
    scenario.write_text(SCENARIO)
    cpaths = coord_paths(coord)
    timings: dict[str, float] = {}
    with Daemons() as daemons:
        # Execute 1: coordinator (TLS, auth, state DB, keys registered), sites a and b
        t0 = time.monotonic()
        coord_pid = daemons.start("coord", coord)
        timings["coordinator start + 2 registrations (s)"] = time.monotonic() - t0
        for s in "ab":
            daemons.start("site", site[s])

        # Execute 2: the revoked, unregistered site c is refused by the SuperLink
        daemons.start("site", site["c"])
        wait_for("site c refused", lambda: "Failed to activate SuperNode"
                 in site_paths(site["c"]).log_file.read_text(errors="replace"), 90)
        assert "No SuperNode found with the given public key" in cpaths.log_file.read_text(
            errors="replace")
        assert qanafed("site", "stop", "--kit", str(site["c"])).returncode == 0

        # Execute 3: the run (3 rounds after hello); kill b's SuperNode mid-round 1
        run = launch_run(coord, scenario, stop_after=3)
        out = Path(run["out-dir"])
        progress = out / "progress.jsonl"
        wait_for("round 1 start", lambda: has_event(progress, event="round-start", step=1), 240)
        wait_for("site b holds round 1's work", lambda: _received(
            site_paths(site["b"]).log_file, WARMUP), 120)
        b_state = json.loads(site_paths(site["b"]).state_file.read_text())
        b_node = b_state["children"]["supernode"]["pid"]
        os.kill(b_node, signal.SIGKILL)
        t_kill_site = time.monotonic()
        wait_for("round 1 end", lambda: has_event(progress, event="round-end", step=1), 200)

        # Execute 4: kill the whole coordinator as soon as round 2 runs (b is still down, so
        # the run cannot race ahead while we wait), restart it, wait for b, resume the run
        wait_for("round 2 start", lambda: has_event(progress, event="round-start", step=2), 120)
        kill_tree(coord_pid)  # the whole coordinator machine "crashes"
        t_kill = time.monotonic()
        done_before_kill = max(ev["step"] for ev in events(progress)
                               if ev["event"] == "round-end")
        wait_for("coordinator gone", lambda: not cpaths.pid_file.exists()
                 or not Path(f"/proc/{coord_pid}").exists(), 20)
        daemons.start("coord", coord)
        wait_for("b back online", lambda: site_paths(site["b"]).log_file.read_text(
            errors="replace").count("SuperNode ID:") >= 2, 240)
        timings["site kill → re-activated at the SuperLink (s)"] = (
            time.monotonic() - t_kill_site)
        resumed = launch_run(coord, scenario, resume=True, stop_after=3)
        status = wait_run(coord, resumed["run-id"], timeout=400)
        timings["coordinator kill → resumed run done (s)"] = time.monotonic() - t_kill
        status_json = json.loads(qanafed("coord", "status", "--kit", str(coord),
                                         "--json").stdout)

    # Assert: site b was restarted by its supervisor, with the same key
    assert json.loads(site_paths(site["b"]).state_file.read_text())["children"]["supernode"][
        "restarts"] >= 1
    # the coordinator died mid-run, and the resumed run continued the same federated run from
    # its last complete round
    assert 1 <= done_before_kill < 3
    assert status == "finished:completed"
    starts = [ev for ev in events(progress) if ev["event"] == "start"]
    assert [ev["done"] for ev in starts] == [0, done_before_kill]
    assert starts[0]["run_id"] == starts[1]["run_id"]
    # the ledger: both sites said hello; round 1 finished without b; b rejoined by round 3
    ledger = Ledger(cpaths.ledger)
    rounds: dict[int, set[str]] = {}
    privacy = {}
    for rep in ledger.reports(starts[0]["run_id"]):
        if rep["phase"] == "privacy":  # each site's (ε, δ) row, written when the run ends
            privacy[rep["site"]] = rep["metrics"]
            continue
        rounds.setdefault(rep["round"], set()).add(rep["site"])
        assert rep["phase"] in ("hello", "warmup") and isinstance(rep["metrics"], dict)
    assert rounds[0] == {"a", "b"}
    assert rounds[1] == {"a"}
    assert "a" in rounds[2] <= {"a", "b"}  # b is back only if round 2 ran again after resume
    assert rounds[3] == {"a", "b"}
    assert status_json["runs"][-1]["last-round"] == 3
    # DP was on: each site's clipped, noised updates are accounted, ε finite and positive
    assert set(privacy) == {"a", "b"}
    for spent in privacy.values():
        assert spent["enabled"] is True and spent["noise_multiplier"] == 0.05
        assert spent["rounds"] >= 1 and 0 < spent["epsilon"] < float("inf")
    # the ledger's hash chain holds across the coordinator crash, the resume and the redone round
    audit = audit_ledger(cpaths.ledger, coord / "metrics.key")
    assert audit.ok and audit.entries >= len(ledger.reports()), audit.reason
    assert status_json["revoked"] == ["c"]
    print("deployment e2e timings:", {k: round(v, 1) for k, v in timings.items()})
