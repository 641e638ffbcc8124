"""The driver's checks: resuming under another scenario, sites whose Akida model differs."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle

from client.client_app import SitePhases, make_client_app
from common.checkpoint import Checkpoint, load_latest, save_checkpoint
from common.errors import ConfigError
from common.fedconfig import FedConfig, parse_config
from common.metrics_crypto import load_metrics_private_key, save_metrics_keypair

# Ray workers cannot import this test module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _scenario(tmp_path: Path, **changes) -> FedConfig:
    pub = tmp_path / "keys" / "metrics.pub"
    if not pub.exists():
        save_metrics_keypair(tmp_path / "keys" / "metrics.key", pub)
    raw = {
        "name": "toy", "data": "toy", "partition": {"scheme": "iid", "sites": 2},
        "rounds": {"warmup": 1, "qat": 1}, "lr": 0.1, "strategy": {"name": "fedavg"},
        "quorum": {"min-sites": 2, "min-replies": 2},
        "timeouts": {"connect": 60, "round": 120}, "metrics-key": str(pub), "seed": 7,
    }
    return parse_config({**raw, **changes})


def test_resume_under_a_changed_scenario_is_refused_naming_the_changed_keys(
    tmp_path: Path,
) -> None:
    from server.driver import FederatedRun, Receiver

    # Prepare: the checkpoint of round 2 of a run, then the scenario edited in three places
    before = _scenario(tmp_path)
    out = tmp_path / "out"
    save_checkpoint(out / "checkpoints", Checkpoint(
        step=2, arrays={"w": np.zeros(3, np.float32)},
        state={"run-id": "r1", "scenario": before.dump(), "step": 2, "rounds": [],
               "seen-ids": []}))
    after = _scenario(tmp_path, lr=0.2, rounds={"warmup": 1, "qat": 3},
                      strategy={"name": "fedprox", "proximal-mu": 0.01})
    receiver = Receiver(load_metrics_private_key(tmp_path / "keys" / "metrics.key"))
    run = FederatedRun(None, after, model_factory=None, receiver=receiver, out_dir=out,
                       resume=True)

    # Execute
    with pytest.raises(ConfigError) as err:
        run.run()

    # Assert: every changed key with both values; nothing unchanged named; checkpoint kept
    problem = err.value.problem
    assert "was made with a different scenario" in problem
    assert "lr: 0.1 → 0.2" in problem
    assert "rounds.qat: 1 → 3" in problem
    assert "strategy.name: 'fedavg' → 'fedprox'" in problem
    assert "strategy.proximal-mu: " in problem
    assert "rounds.warmup" not in problem and "seed" not in problem and "qat-lr" not in problem
    assert "--out" in err.value.fix
    assert load_latest(out / "checkpoints").step == 2


# ------------------------------------------------------------------ finalize hash mismatch


@dataclass(frozen=True)
class ToySite:
    site_id: str
    pid: int
    class_names: tuple[str, ...] = ("a", "b")


def _digest(arrays) -> str:
    return hashlib.sha256(b"".join(np.asarray(arrays[k]).tobytes()
                                   for k in sorted(arrays))).hexdigest()


def _load(context, cfg):
    pid = int(context.node_config["partition-id"])
    return ToySite(f"site-{pid}", pid)


def _hello(cfg, data, arrays, config):
    return None, 10, {"class_names": list(data.class_names)}


def _train(cfg, data, arrays, config):
    out = {k: v + np.float32(0.1) for k, v in arrays.items() if not k.startswith("act/")}
    return out, 10, {"train_loss": 0.5, "train_examples": 10,
                     "test": {"balanced_accuracy": 0.5, "macro_f1": 0.5, "num_examples": 5}}


def _calibrate(cfg, data, arrays, config):
    return {"act/range_max": np.full(2, 1.0, np.float32)}, 5, {"calibration_examples": 5}


def _finalize(cfg, data, arrays, config):
    # site-1 converts something else than it was sent (another converter, a corrupted model)
    digest = _digest(arrays) if data.pid == 0 else _digest({**arrays, "extra": np.ones(1)})
    return None, 5, {"akida_hash": digest, "akida": {"balanced_accuracy": 0.5}}


class ToyModel:
    def __init__(self, cfg: FedConfig, class_names: list[str]) -> None:
        self.cfg = cfg

    def initial_arrays(self):
        return {"w": np.zeros(3, np.float32)}

    def quantize(self, float_arrays, ranges):
        return {**float_arrays, **ranges}

    def finalize(self, arrays, out_dir):
        return _digest(arrays)


@pytest.mark.slow
def test_a_site_whose_akida_model_differs_from_the_servers_is_reported_as_such(
    tmp_path: Path,
) -> None:
    from server.server_app import make_server_app
    from server.simulation import simulate

    # Prepare: two toy sites; site-1's finalize hash is not the server's
    cfg = _scenario(tmp_path)
    out = tmp_path / "out"
    server = make_server_app({"scenario-config": cfg, "out-dir": str(out),
                              "metrics-private-key": str(tmp_path / "keys" / "metrics.key")},
                             model_factory=ToyModel)
    phases = SitePhases(_load, _hello, _train, _calibrate, _train, _finalize)

    # Execute
    simulate(server, make_client_app(phases), num_sites=2, parallel=1)

    # Assert: the finalize round flags site-1 only, in the checkpoint and in both reports
    final = load_latest(out / "checkpoints").state["rounds"][-1]
    assert final["phase"] == "finalize" and final["server_hash"]
    assert final["sites"]["site-0"]["hash_matches"] is True
    assert final["sites"]["site-1"]["hash_matches"] is False
    assert final["sites"]["site-1"]["akida_hash"] != final["server_hash"]
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["sites"]["site-1"]["hash_matches"] is False
    markdown = (out / "report.md").read_text()
    assert "| site-0 | True |" in markdown and "| site-1 | False |" in markdown
