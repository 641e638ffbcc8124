"""The round-protocol driver on a real Flower Simulation with a tiny numpy 'model' per site.

The site work here is a deterministic toy (seeded noise steps) so that the driver itself —
phases, aggregation through Flower strategies, sealed reports, checkpoints, quorum and
timeouts — is what is tested, in seconds rather than minutes.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle

from client.client_app import SitePhases, make_client_app
from common.checkpoint import load_latest
from common.errors import SecurityError
from common.fedconfig import FedConfig, parse_config
from common.metrics_crypto import save_metrics_keypair
from common.progress import append_event, read_events
from common.site import site_seed
from server.rounds import QuorumError
from server.server_app import make_server_app
from server.simulation import simulate

pytestmark = pytest.mark.slow

# Ray workers cannot import this test module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: A stalled site holds its reply until the driver closed the round, or at most this long.
STALL_DEADLINE = 120.0


@dataclass(frozen=True)
class ToySite:
    site_id: str
    pid: int
    class_names: tuple[str, ...] = ("a", "b")


def _load(context, cfg):
    pid = int(context.node_config["partition-id"])
    if cfg.name == "poser" and pid == 2:  # a site whose kit says it is site-0
        return ToySite("site-0", pid)
    return ToySite(f"site-{pid}", pid)


def _hello(cfg, data, arrays, config):
    return None, 10 * (data.pid + 1), {"class_names": list(data.class_names)}


def _stall(out: Path, step: int) -> None:
    """Hold the reply until ``out/progress.jsonl`` says round ``step`` ended; log what freed it."""
    end = time.monotonic() + STALL_DEADLINE
    by = "deadline"
    while time.monotonic() < end:
        events, _ = read_events(out / "progress.jsonl")
        if any(e["event"] == "round-end" and e["step"] == step for e in events):
            by = "round-end"
            break
        time.sleep(0.2)
    append_event(out / "stall.jsonl", event="released", step=step, by=by)


def _train(cfg, data, arrays, config):
    step = int(config["server-round"])
    if cfg.name == "stall" and data.pid == 2 and config["phase"] == "warmup":
        _stall(Path(config["sim-sites-dir"]).parent, step)
    rng = np.random.default_rng(site_seed(cfg.seed, step, data.site_id))
    out = {k: (v + float(config["lr"]) * rng.normal(size=v.shape)).astype(v.dtype)
           for k, v in arrays.items() if not k.startswith("act/")}
    score = float(rng.uniform())
    return out, 10 * (data.pid + 1), {
        "train_loss": 1.0 - score, "train_examples": 10 * (data.pid + 1),
        "test": {"balanced_accuracy": score, "macro_f1": score, "num_examples": 5},
    }


def _calibrate(cfg, data, arrays, config):
    ranges = {"act/output_quantizer/range_max": np.full(2, data.pid + 1.0, np.float32),
              "act/output_quantizer/rescaling_rate": np.ones(2, np.float32)}
    return ranges, 5, {"calibration_examples": 5}


def _finalize(cfg, data, arrays, config):
    digest = hashlib.sha256(b"".join(np.asarray(arrays[k]).tobytes() for k in sorted(arrays)))
    return None, 5, {"akida_hash": digest.hexdigest()}


TOY_PHASES = SitePhases(_load, _hello, _train, _calibrate, _train, _finalize)


class ToyModel:
    def __init__(self, cfg: FedConfig, class_names: list[str]) -> None:
        self.cfg = cfg

    def initial_arrays(self):
        return {"w": np.zeros(3, np.float32), "bn/moving_mean": np.ones(2, np.float32)}

    def quantize(self, float_arrays, ranges):
        return {**float_arrays, **ranges}

    def finalize(self, arrays, out_dir):
        digest = hashlib.sha256(b"".join(np.asarray(arrays[k]).tobytes() for k in sorted(arrays)))
        return digest.hexdigest()


def _scenario(tmp_path: Path, **changes) -> FedConfig:
    pub = tmp_path / "keys" / "metrics.pub"
    save_metrics_keypair(tmp_path / "keys" / "metrics.key", pub, overwrite=True)
    raw = {
        "name": "toy", "data": "toy", "partition": {"scheme": "iid", "sites": 3},
        "rounds": {"warmup": 2, "qat": 2}, "lr": 0.1,
        "strategy": {"name": "fedadam", "server-lr": 0.05},
        "quorum": {"min-sites": 3, "min-replies": 3},
        "timeouts": {"connect": 20, "round": 60}, "metrics-key": str(pub), "seed": 7,
    }
    for key, value in changes.items():
        raw[key] = value
    return parse_config(raw)


def _run(cfg: FedConfig, out: Path, keys: Path, sites: int = 3, parallel: int = 1,
         **settings) -> None:
    """One toy simulation; one site process suffices unless a site must stall beside others."""
    server = make_server_app(
        {"scenario-config": cfg, "out-dir": str(out),
         "metrics-private-key": str(keys / "metrics.key"), **settings},
        model_factory=ToyModel,
    )
    simulate(server, make_client_app(TOY_PHASES), num_sites=sites, parallel=parallel)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    # Prepare
    cfg = _scenario(tmp_path)
    keys = tmp_path / "keys"

    # Execute: one full run; one stopped after 3 rounds (mid-warm-up... calibration) then resumed
    _run(cfg, tmp_path / "full", keys)
    _run(cfg, tmp_path / "split", keys, **{"stop-after": 3})
    stopped = load_latest(tmp_path / "split" / "checkpoints")
    _run(cfg, tmp_path / "split", keys, resume=True)

    # Assert
    full = load_latest(tmp_path / "full" / "checkpoints")
    split = load_latest(tmp_path / "split" / "checkpoints")
    assert stopped.step == 3
    assert full.step == split.step == 6  # 2 warm-up + calibration + 2 QAT + finalize
    assert full.arrays.keys() == split.arrays.keys()
    for key in full.arrays:
        np.testing.assert_array_equal(full.arrays[key], split.arrays[key])
    assert not np.allclose(full.arrays["w"], 0)  # training moved the weights
    # combined calibration rule: per-channel max over the sites' ranges (1, 2, 3)
    np.testing.assert_array_equal(full.arrays["act/output_quantizer/range_max"], [3.0, 3.0])
    # FedAdam server state was checkpointed and restored
    assert {"m_t", "v_t"} <= set(full.groups) and set(full.groups) == set(split.groups)
    for group in full.groups:
        for key in full.groups[group]:
            np.testing.assert_array_equal(full.groups[group][key], split.groups[group][key])
    # decrypted metrics reached the report; the finalize hashes matched the server's
    final = full.state["rounds"][-1]
    assert final["phase"] == "finalize"
    assert sorted(final["sites"]) == ["site-0", "site-1", "site-2"]
    assert all(rep["hash_matches"] for rep in final["sites"].values())
    warm = full.state["rounds"][0]
    assert set(warm["sites"]) == {"site-0", "site-1", "site-2"}
    assert 0.0 <= warm["global"]["test.balanced_accuracy"] <= 1.0
    assert (tmp_path / "full" / "report.json").is_file()


def test_a_site_that_never_answers_is_dropped_within_the_round_timeout(tmp_path):
    # Prepare: site 2 holds its warm-up reply until the driver has closed the round
    cfg = _scenario(tmp_path, name="stall", rounds={"warmup": 1, "qat": 0},
                    strategy={"name": "fedavg"}, quorum={"min-sites": 3, "min-replies": 2},
                    timeouts={"connect": 90, "round": 3})
    out = tmp_path / "out"

    # Execute
    _run(cfg, out, tmp_path / "keys", parallel=3)

    # Assert: the round timed out and went on with the quorum while site 2 was still working
    state = load_latest(out / "checkpoints").state
    warm = state["rounds"][0]
    assert warm["phase"] == "warmup"
    assert set(warm["sites"]) == {"site-0", "site-1"}
    assert "site-2" in warm["dropped"] and "no reply within 3 s" in warm["dropped"]["site-2"]
    assert warm["seconds"] >= 3  # it waited out the timeout ...
    released, _ = read_events(out / "stall.jsonl")
    assert [(e["step"], e["by"]) for e in released] == [(1, "round-end")]  # ... not site 2


def test_too_few_sites_stops_with_a_clear_message(tmp_path):
    # Prepare: the scenario needs 4 sites, only 3 SuperNodes run
    cfg = _scenario(tmp_path, partition={"scheme": "iid", "sites": 4},
                    quorum={"min-sites": 4, "min-replies": 2},
                    timeouts={"connect": 2, "round": 10})

    # Execute / Assert: it gave up at the connect deadline, before saying hello to anyone
    with pytest.raises(QuorumError, match=r"only 3 site\(s\) connected after 2 s"):
        _run(cfg, tmp_path / "out", tmp_path / "keys")
    events, _ = read_events(tmp_path / "out" / "progress.jsonl")
    assert [e["event"] for e in events] == ["start"]


def test_two_nodes_claiming_one_site_id_are_both_refused_naming_both(tmp_path):
    # Prepare: partition 2 claims site-0, which partition 0 is; the quorum needs all 3
    cfg = _scenario(tmp_path, name="poser")

    # Execute / Assert: refused at hello, before any round, with both node ids named
    with pytest.raises(SecurityError, match=r"1 site\(s\) left after refusing node (\d+) claims "
                       r"site 'site-0', as does node (\d+); node \2 claims site 'site-0', as "
                       r"does node \1"):
        _run(cfg, tmp_path / "out", tmp_path / "keys")
    assert load_latest(tmp_path / "out" / "checkpoints") is None
