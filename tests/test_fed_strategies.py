"""FedAdam steps trainable weights only; statistics are example-weighted means; state restarts."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message

from common.aggregate import weighted_mean
from common.fedconfig import StrategyConfig
from server import protocol as P
from server.strategies import (
    ServerAdam,
    aggregate,
    load_strategy_state,
    make_strategy,
    reset_strategy_state,
    strategy_state,
)

BETA_1, BETA_2 = 0.9, 0.99


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Every test here builds Flower messages."""


def _reply(arrays: dict[str, np.ndarray], n: int) -> Message:
    return Message(P.reply_content(arrays, n, "s", b"sealed"), dst_node_id=0, message_type="train")


def _fedadam(eta: float = 0.1, tau: float = 1e-3) -> ServerAdam:
    strategy = make_strategy(StrategyConfig.model_validate(
        {"name": "fedadam", "server-lr": eta, "tau": tau}))
    assert isinstance(strategy, ServerAdam)
    return strategy


def _site(rng: np.random.Generator, variance: float) -> dict[str, np.ndarray]:
    """One site's reply: a kernel, BN gamma (trainable), BN moving statistics."""
    return {"t_conv/kernel": rng.normal(size=(3, 3, 2, 2)).astype(np.float32),
            "t_bn/gamma": rng.normal(1.0, 0.1, size=2).astype(np.float32),
            "t_bn/moving_mean": rng.normal(0.5, 0.1, size=2).astype(np.float32),
            "t_bn/moving_variance": np.full(2, variance, np.float32)}


def test_bn_statistics_are_the_weighted_mean_and_variance_stays_positive():
    # Prepare: small site variances far below the current 1.0, and a large eta that, applied
    # to the statistics, would push the variance below zero in one step
    rng = np.random.default_rng(0)
    current = {**_site(rng, 1.0), "t_bn/moving_mean": np.zeros(2, np.float32)}
    strategy = _fedadam(eta=2.0)
    weights = [100, 300]

    for step in range(1, 4):
        sites = [_site(rng, 0.02), _site(rng, 0.05)]

        # Execute
        out = aggregate(strategy, step, [_reply(s, n) for s, n in zip(sites, weights,
                                                                       strict=True)], current)

        # Assert
        expected = weighted_mean(sites, weights)
        for key in ("t_bn/moving_mean", "t_bn/moving_variance"):
            np.testing.assert_allclose(out[key], expected[key], rtol=1e-6, err_msg=key)
            assert out[key].dtype == np.float32
        assert np.all(out["t_bn/moving_variance"] > 0)
        assert set(strategy.m_t) == set(strategy.v_t) == {"t_conv/kernel", "t_bn/gamma"}
        current = out


def test_trainable_weights_move_by_the_fedadam_rule_counted_from_the_last_reset():
    # Prepare: the run is at round 7, but the optimizer was just reset (calibration)
    rng = np.random.default_rng(1)
    eta, tau = 0.05, 1e-3
    strategy = _fedadam(eta, tau)
    current = _site(rng, 1.0)
    weights = [1, 3]
    rounds = [[_site(rng, 0.5), _site(rng, 0.5)] for _ in range(2)]

    # Execute
    outs = []
    for step, sites in zip((7, 8), rounds, strict=True):
        outs.append(aggregate(strategy, step, [_reply(s, n) for s, n in zip(
            sites, weights, strict=True)], current))
        current = outs[-1]

    # Assert: Flower's update, m/v over the trainable keys, bias correction at t = 1, 2
    start = _site(np.random.default_rng(1), 1.0)
    key = "t_conv/kernel"
    x = start[key].astype(np.float64)
    m = v = np.zeros_like(x)
    for t, (sites, out) in enumerate(zip(rounds, outs, strict=True), start=1):
        delta = weighted_mean(sites, weights)[key].astype(np.float64) - x
        m = BETA_1 * m + (1 - BETA_1) * delta
        v = BETA_2 * v + (1 - BETA_2) * delta**2
        eta_t = eta * np.sqrt(1 - BETA_2 ** (t + 1)) / (1 - BETA_1 ** (t + 1))
        x = x + eta_t * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(out[key], x, rtol=1e-5, atol=1e-6)
    assert strategy.steps == 2


def test_server_state_round_trips_and_resets():
    # Prepare
    rng = np.random.default_rng(2)
    strategy = _fedadam()
    current = _site(rng, 1.0)
    aggregate(strategy, 3, [_reply(_site(rng, 0.5), 1)], current)

    # Execute
    saved = strategy_state(strategy)
    restored = _fedadam()
    load_strategy_state(restored, saved)
    reset = _fedadam()
    load_strategy_state(reset, saved)
    reset_strategy_state(reset)

    # Assert
    assert restored.steps == 1 and set(restored.m_t) == {"t_conv/kernel", "t_bn/gamma"}
    np.testing.assert_array_equal(restored.v_t["t_bn/gamma"], strategy.v_t["t_bn/gamma"])
    assert reset.steps == 0 and reset.m_t is None and reset.v_t is None


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_still_average_every_array(name):
    # Prepare
    rng = np.random.default_rng(3)
    sites = [_site(rng, 0.1), _site(rng, 0.3)]
    weights = [5, 15]
    cfg = {"name": name, **({"proximal-mu": 0.01} if name == "fedprox" else {})}
    strategy = make_strategy(StrategyConfig.model_validate(cfg))

    # Execute
    out = aggregate(strategy, 1, [_reply(s, n) for s, n in zip(sites, weights, strict=True)],
                    current=_site(rng, 1.0))

    # Assert
    expected = weighted_mean(sites, weights)
    assert out.keys() == expected.keys()
    for k in expected:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-6, err_msg=k)
    assert strategy_state(strategy) == {}
