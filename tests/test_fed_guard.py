"""The guard: replies with NaN/Inf, wrong keys or shapes, outsized updates are refused with a
reason; in a real Flower simulation a site sending garbage every round leaves the global model
exactly as the honest sites alone make it, and every round completes with the quorum."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle

from common.aggregate import screen, update_norm
from common.fedconfig import FedConfig, parse_config
from common.metrics_crypto import save_metrics_keypair
from common.site import site_seed
from server.driver import expected_keys

# Ray workers cannot import this test module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _site(x: float) -> dict[str, np.ndarray]:
    return {"c/kernel": np.full((2, 2), x, np.float32), "c/moving_mean": np.zeros(2, np.float32)}


CURRENT = _site(0.0)


def test_well_formed_replies_pass():
    assert screen({"a": _site(1.0), "b": _site(1.2), "c": _site(0.9)}, CURRENT, set(CURRENT),
                  max_norm_ratio=5, weights={"a": 1, "b": 2, "c": 3}) == {}


@pytest.mark.parametrize(("bad", "reason"), [
    ({**_site(1.0), "c/kernel": np.array([[1, np.nan], [1, 1]], np.float32)},
     "array 'c/kernel' holds 1 NaN/Inf value(s)"),
    ({**_site(1.0), "c/moving_mean": np.array([np.inf, 0], np.float32)},
     "array 'c/moving_mean' holds 1 NaN/Inf value(s)"),
    ({**_site(1.0), "c/kernel": np.ones((2, 3), np.float32)},
     "array 'c/kernel' has shape (2, 3), expected (2, 2)"),
    ({"c/kernel": np.ones((2, 2), np.float32)},
     "keys differ from the expected ones: missing c/moving_mean"),
    ({**_site(1.0), "c/range_max": np.ones(2, np.float32)},
     "keys differ from the expected ones: unexpected c/range_max"),
])
def test_malformed_replies_are_refused_naming_the_array(bad, reason):
    refused = screen({"a": _site(1.0), "bad": bad, "c": _site(0.9)}, CURRENT, set(CURRENT),
                     max_norm_ratio=5)
    assert refused == {"bad": reason}


def test_a_non_positive_example_count_is_refused():
    refused = screen({"a": _site(1.0), "b": _site(1.0)}, CURRENT, set(CURRENT),
                     weights={"a": 10, "b": -5})
    assert refused == {"b": "example count -5 is not a positive number"}


@pytest.mark.parametrize("honest", [1, 2, 3])
def test_an_outsized_update_is_refused_against_the_median_of_the_others(honest):
    # Prepare: norms 2 * x (2x2 kernel of x; statistics do not count)
    replies = {f"s{i}": _site(1.0 + 0.1 * i) for i in range(honest)}
    replies["huge"] = _site(1e4)

    # Execute
    refused = screen(replies, CURRENT, set(CURRENT), max_norm_ratio=5)

    # Assert: refused with the numbers in its reason, even beside a single honest site
    assert list(refused) == ["huge"]
    assert "update norm 2e+04 is" in refused["huge"]
    assert "guard.max-norm-ratio is 5" in refused["huge"]
    assert update_norm(replies["huge"], CURRENT) == pytest.approx(2e4)


def test_the_norm_bound_is_relative_and_can_be_turned_off():
    replies = {"a": _site(1.0), "b": _site(4.0)}  # 4x the other's update: within 5
    assert screen(replies, CURRENT, set(CURRENT), max_norm_ratio=5) == {}
    assert list(screen(replies, CURRENT, set(CURRENT), max_norm_ratio=3)) == ["b"]
    assert screen({**replies, "c": _site(1e6)}, CURRENT, set(CURRENT), None) == {}


def test_calibration_replies_are_checked_against_the_shapes_most_sites_send():
    ranges = {"q/range_max": np.ones(4, np.float32)}
    refused = screen({"a": ranges, "b": ranges, "c": {"q/range_max": np.ones(3, np.float32)}},
                     current={}, expected=None)
    assert refused == {"c": "array 'q/range_max' has shape (3,), expected (4,)"}


def test_training_replies_may_not_carry_quantizer_state_or_the_baked_pact_clips():
    arrays = {"c/kernel": 1, "c/moving_variance": 1, "c/range_max": 1, "c/rescaling_rate": 1,
              "r/alpha": 1}
    assert expected_keys("warmup", arrays) == {"c/kernel", "c/moving_variance", "r/alpha"}
    assert expected_keys("qat", arrays) == {"c/kernel", "c/moving_variance"}
    assert expected_keys("calibrate", arrays) is None


# ------------------------------------------------------------ a garbage site in a simulation

#: What the garbage site (partition 3) sends, by round: NaN, huge, wrong shapes, a stray key.
GARBAGE = {1: "nan", 2: "huge", 3: "shapes", 4: "stray"}


@dataclass(frozen=True)
class ToySite:
    site_id: str
    pid: int
    class_names: tuple[str, ...] = ("a", "b")


def _load(context, cfg):
    pid = int(context.node_config["partition-id"])
    return ToySite(f"site-{pid}", pid)


def _hello(cfg, data, arrays, config):
    return None, 10 * (data.pid + 1), {"class_names": list(data.class_names)}


def _spoil(arrays: dict, kind: str) -> dict:
    if kind == "nan":
        return {k: np.full_like(v, np.nan) for k, v in arrays.items()}
    if kind == "huge":
        return {k: np.full_like(v, 1e6) for k, v in arrays.items()}
    if kind == "shapes":
        return {k: np.ones(v.size + 1, v.dtype) for k, v in arrays.items()}
    return {**arrays, "act/output_quantizer/range_max": np.full(2, 1e6, np.float32)}


def _train(cfg, data, arrays, config):
    step = int(config["server-round"])
    rng = np.random.default_rng(site_seed(cfg.seed, step, data.site_id))
    out = {k: (v + 0.1 * rng.normal(size=v.shape)).astype(v.dtype)
           for k, v in arrays.items() if not k.startswith("act/")}
    if data.pid == 3:
        out = _spoil(out, GARBAGE[step])
    return out, 10 * (data.pid + 1), {"train_loss": 0.5, "train_examples": 10}


def _calibrate(cfg, data, arrays, config):
    ranges = {"act/output_quantizer/range_max": np.full(2, data.pid + 1.0, np.float32),
              "act/output_quantizer/rescaling_rate": np.ones(2, np.float32)}
    if data.pid == 3:
        ranges = _spoil(ranges, GARBAGE[int(config["server-round"])])
    return ranges, 5, {"calibration_examples": 5}


def _digest(arrays) -> str:
    return hashlib.sha256(b"".join(np.asarray(arrays[k]).tobytes()
                                   for k in sorted(arrays))).hexdigest()


def _finalize(cfg, data, arrays, config):
    return None, 5, {"akida_hash": _digest(arrays)}


class ToyModel:
    def __init__(self, cfg: FedConfig, class_names: list[str]) -> None:
        self.cfg = cfg

    def initial_arrays(self):
        return {"w": np.zeros((2, 3), np.float32), "bn/moving_mean": np.ones(2, np.float32)}

    def quantize(self, float_arrays, ranges):
        return {**float_arrays, **ranges}

    def finalize(self, arrays, out_dir):
        return _digest(arrays)


def _run(tmp_path: Path, out: Path, sites: int) -> dict:
    from client.client_app import SitePhases, make_client_app
    from server.server_app import make_server_app
    from server.simulation import simulate

    keys = tmp_path / "keys"
    if not (keys / "metrics.key").exists():
        save_metrics_keypair(keys / "metrics.key", keys / "metrics.pub")
    cfg = parse_config({
        "name": "guard", "data": "toy", "partition": {"scheme": "iid", "sites": sites},
        "rounds": {"warmup": 2, "qat": 1}, "strategy": {"name": "fedavg"},
        "guard": {"max-norm-ratio": 5}, "quorum": {"min-sites": sites, "min-replies": 3},
        "timeouts": {"connect": 60, "round": 120}, "metrics-key": str(keys / "metrics.pub"),
        "seed": 11,
    })
    server = make_server_app({"scenario-config": cfg, "out-dir": str(out),
                              "metrics-private-key": str(keys / "metrics.key")},
                             model_factory=ToyModel)
    phases = SitePhases(_load, _hello, _train, _calibrate, _train, _finalize)
    simulate(server, make_client_app(phases), num_sites=sites, parallel=1)
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_a_site_sending_garbage_leaves_the_global_model_as_the_honest_sites_make_it(tmp_path):
    from common.checkpoint import load_latest

    # Execute: three honest sites with a fourth sending garbage in every round; the same
    # three sites alone
    report = _run(tmp_path, tmp_path / "garbage", sites=4)
    _run(tmp_path, tmp_path / "honest", sites=3)

    # Assert: every round completed with the three honest replies; site-3 refused, with why
    assert report["complete"]
    rounds = {r["step"]: r for r in report["rounds"]}
    assert [rounds[s]["phase"] for s in sorted(rounds)] == [
        "warmup", "warmup", "calibrate", "qat", "finalize"]
    reasons = {1: "holds 6 NaN/Inf value(s)", 2: "x the median of the other sites'",
               3: "has shape (3,), expected (2,)", 4: "unexpected act/output_quantizer"}
    for step, why in reasons.items():
        assert list(rounds[step]["refused"]) == ["site-3"], step
        assert why in rounds[step]["refused"]["site-3"], (step, rounds[step]["refused"])
        assert rounds[step]["dropped"]["site-3"].startswith("refused by the guard: ")
    md = (tmp_path / "garbage" / "report.md").read_text()
    assert "site-3 | dropped: refused by the guard: array 'w' holds 6 NaN/Inf" in md
    # ... and the global model is bit for bit what the honest sites make without it
    garbage = load_latest(tmp_path / "garbage" / "checkpoints").arrays
    honest = load_latest(tmp_path / "honest" / "checkpoints").arrays
    assert garbage.keys() == honest.keys()
    for key in honest:
        np.testing.assert_array_equal(garbage[key], honest[key], err_msg=key)
    assert np.all(np.isfinite(garbage["w"])) and not np.allclose(garbage["w"], 0)
    np.testing.assert_array_equal(garbage["act/output_quantizer/range_max"], [3.0, 3.0])
