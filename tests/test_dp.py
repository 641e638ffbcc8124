"""Differential privacy of the sites' updates: clipping, noise, accounting, and the run report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.dp import clip_update, epsilon_spent, privatize, update_norm
from common.errors import ConfigError
from common.fedconfig import parse_config


def _arrays(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {"conv/kernel": (scale * rng.normal(size=(3, 3, 4, 8))).astype(np.float32),
            "bn/moving_variance": np.abs(scale * rng.normal(size=8)).astype(np.float32)}


def test_clipping_bounds_the_update_norm_and_leaves_short_updates_alone():
    # Prepare
    rng = np.random.default_rng(0)
    long_update, short_update = _arrays(rng, 1.0), _arrays(rng, 1e-3)

    # Execute
    clipped = clip_update(long_update, 0.5)
    kept = clip_update(short_update, 0.5)

    # Assert
    assert update_norm(long_update) > 0.5
    assert update_norm(clipped) == pytest.approx(0.5, rel=1e-9)
    ratio = clipped["conv/kernel"] / long_update["conv/kernel"]  # scaled, not truncated
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
    for k in short_update:
        np.testing.assert_allclose(kept[k], short_update[k], rtol=1e-7)


def test_privatized_update_is_clipped_then_noised_with_std_multiplier_times_clip():
    # Prepare: a site that did not move (zero update): what it sends is the noise alone
    rng = np.random.default_rng(1)
    received = {"w": np.zeros(200_000, np.float32)}
    clip, z = 0.2, 1.5

    # Execute
    sent = privatize(received, {"w": received["w"].copy()}, clip, z, rng=rng)
    moved = privatize(received, {"w": np.full(200_000, 10.0, np.float32)}, clip, 1e-9,
                      rng=np.random.default_rng(2))

    # Assert: std z*C within 1 % (200k samples: the standard error is ~0.16 %), mean ~0
    noise = sent["w"].astype(np.float64)
    assert sent["w"].dtype == np.float32
    assert np.std(noise) == pytest.approx(z * clip, rel=0.01)
    assert abs(np.mean(noise)) < 5 * z * clip / np.sqrt(noise.size)
    # a long update reaches the coordinator clipped to norm C (noise negligible here)
    assert update_norm({"w": moved["w"] - received["w"]}) == pytest.approx(clip, rel=1e-4)


def test_noise_keeps_variances_non_negative_and_refuses_unknown_keys():
    received = {"bn/moving_variance": np.full(1000, 1e-3, np.float32)}
    sent = privatize(received, dict(received), 1.0, 1.0, rng=np.random.default_rng(3))
    assert float(sent["bn/moving_variance"].min()) >= 0.0
    with pytest.raises(Exception, match="did not receive"):
        privatize(received, {"other": np.zeros(2, np.float32)}, 1.0, 1.0)


def test_epsilon_matches_dp_accounting_and_falls_with_more_noise():
    # Prepare
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    # Execute
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.1), 5)
    direct = accountant.get_epsilon(1e-5)
    ours = epsilon_spent(1.1, 5, 1e-5)
    by_noise = [epsilon_spent(z, 5, 1e-5) for z in (0.5, 1.0, 2.0, 4.0)]

    # Assert
    assert ours == pytest.approx(direct, rel=1e-12)
    assert by_noise == sorted(by_noise, reverse=True) and by_noise[-1] < by_noise[0]
    assert epsilon_spent(1.0, 10, 1e-5) > epsilon_spent(1.0, 5, 1e-5)
    assert epsilon_spent(1.0, 0, 1e-5) == 0.0
    assert epsilon_spent(1.0, 5, 1e-5, sampling_rate=0.1) < epsilon_spent(1.0, 5, 1e-5)


@pytest.mark.parametrize(("dp", "named"), [
    ({"enabled": True, "noise-multiplier": 0}, "dp.noise-multiplier must be > 0, got 0"),
    ({"noise-multiplier": -1.5}, "dp.noise-multiplier must be > 0, got -1.5"),
    ({"clip": 0}, "dp.clip must be > 0, got 0"),
    ({"delta": 1.0}, "dp.delta must be in (0, 1), got 1.0"),
    ({"delta": 0}, "dp.delta must be in (0, 1), got 0"),
    ({"epsilon": 3}, "dp.epsilon: Extra inputs are not permitted"),
])
def test_bad_dp_settings_are_refused_naming_the_value_and_the_fix(dp, named):
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "data": "synthetic", "dp": dp}, source="scen.yaml")
    assert named in str(err.value) and "scen.yaml" in str(err.value)
    assert "set e.g." in str(err.value) or "Extra inputs" in named


@pytest.mark.slow
def test_a_tiny_dp_simulation_reports_epsilon_per_site_and_sends_clipped_updates(tmp_path):
    # Prepare: the driver tests' toy sites (numpy 'model', real Flower simulation), DP on
    from test_fed_driver import _run, _scenario

    from common.checkpoint import load_latest

    clip, z = 1e-3, 1.0
    cfg = _scenario(tmp_path, strategy={"name": "fedavg"}, rounds={"warmup": 2, "qat": 1},
                    dp={"enabled": True, "clip": clip, "noise-multiplier": z, "delta": 1e-4})
    out = tmp_path / "out"

    ledger = tmp_path / "ledger.sqlite"

    # Execute
    _run(cfg, out, tmp_path / "keys", ledger=str(ledger))

    # Assert: ε per site from dp-accounting for the 3 training rounds each took part in
    report = json.loads((out / "report.json").read_text())
    privacy = report["privacy"]
    assert privacy["enabled"] and privacy["accountant"].startswith("rdp (dp-accounting 0.6")
    expected = epsilon_spent(z, 3, 1e-4)
    assert set(privacy["sites"]) == {"site-0", "site-1", "site-2"}
    for spent in privacy["sites"].values():
        assert spent == {"rounds": 3, "epsilon": pytest.approx(expected), "delta": 1e-4}
    from deploy.ledger import Ledger

    rows = [r for r in Ledger(ledger).reports(report["run_id"]) if r["phase"] == "privacy"]
    assert [(r["site"], r["round"]) for r in rows] == [(f"site-{i}", 6) for i in range(3)]
    assert rows[0]["metrics"]["epsilon"] == pytest.approx(expected)
    assert rows[0]["metrics"]["rounds"] == 3 and rows[0]["metrics"]["delta"] == 1e-4
    md = (out / "report.md").read_text()
    assert "## Differential privacy" in md and f"| site-1 | 3 | {expected:.3g} | 0.0001 |" in md
    # The toy sites move each weight by ~0.1 per round; clipped to 1e-3 (+ noise of std 1e-3)
    # the global weights stay within a few thousandths of their start.
    w = load_latest(out / "checkpoints").arrays["w"]
    assert 0 < float(np.max(np.abs(w))) < 0.02, w


def test_a_site_is_charged_for_rounds_it_replied_or_timed_out_in_not_for_refusals():
    # Prepare
    from server.privacy import privacy_summary

    dropped = {"site-1": "no reply within 60 s", "site-2": "error reply: site site-2 refuses"}
    state = {"scenario": {"dp": {"enabled": True, "clip": 1.0, "noise-multiplier": 2.0,
                                 "delta": 1e-5}},
             "sites": {"site-0": {}, "site-1": {}, "site-2": {}},
             "rounds": [{"phase": "warmup", "replied": ["site-0", "site-1", "site-2"],
                         "dropped": {}},
                        {"phase": "warmup", "replied": ["site-0"], "dropped": dropped},
                        {"phase": "calibrate", "replied": ["site-0"], "dropped": {}},
                        {"phase": "finalize", "replied": ["site-0"], "dropped": {}}]}

    # Execute
    sites = privacy_summary(state)["sites"]

    # Assert: a late reply may still have left the site; an error reply sent no update
    assert {s: v["rounds"] for s, v in sites.items()} == {"site-0": 2, "site-1": 2, "site-2": 1}
    assert sites["site-2"]["epsilon"] == pytest.approx(epsilon_spent(2.0, 1, 1e-5))
    assert sites["site-0"]["epsilon"] > sites["site-2"]["epsilon"]
