"""Server strategies: FedAdam, FedYogi and FedAvgM step trainable weights only (statistics are
example-weighted means; state restarts and round-trips); FedMedian, FedTrimmedAvg and Krum follow
their rules; each aggregates a hand-computed case; out-of-range parameters are refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message

from common.aggregate import weighted_mean
from common.fedconfig import STRATEGIES, StrategyConfig
from common.weights import BN_STATS, QUANTIZER, TRAINABLE
from server import protocol as P
from server.strategies import (
    ROLES,
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


# ---------------------------------------------- FedAvgM, FedYogi and the robust rules


def _strategy(**cfg):
    return make_strategy(StrategyConfig.model_validate(cfg))


def _replies(*sites: tuple[dict[str, np.ndarray], int]) -> list[Message]:
    return [_reply(arrays, n) for arrays, n in sites]


def _w(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.asarray(values, np.float32)}


def test_fedavgm_is_flowers_server_momentum_rule_on_a_hand_computed_case():
    # Prepare: lr 0.5, momentum 0.9; the sites' weighted mean (1:3) is [1.5, 3.5] each round
    strategy = _strategy(name="fedavgm", **{"server-lr": 0.5, "server-momentum": 0.9})
    sites = ((_w(3.0, 2.0), 1), (_w(1.0, 4.0), 3))

    # Execute
    first = aggregate(strategy, 1, _replies(*sites), _w(1.0, 2.0))
    second = aggregate(strategy, 2, _replies(*sites), first)

    # Assert: g1 = [1, 2] - [1.5, 3.5] = [-.5, -1.5], m1 = g1, x1 = [1, 2] - .5 m1 = [1.25, 2.75]
    np.testing.assert_allclose(first["w"], [1.25, 2.75], rtol=1e-6)
    # g2 = x1 - mean = [-.25, -.75]; m2 = .9 m1 + g2 = [-.7, -2.1]; x2 = x1 - .5 m2 = [1.6, 3.8]
    np.testing.assert_allclose(second["w"], [1.6, 3.8], rtol=1e-6)
    np.testing.assert_allclose(strategy.momentum["w"], [-0.7, -2.1], rtol=1e-6)


def test_fedavgm_defaults_to_one_fedavg_step_of_effective_learning_rate():
    strategy = _strategy(name="fedavgm")
    assert strategy.server_learning_rate == pytest.approx(0.1)
    assert strategy.server_momentum == pytest.approx(0.9)
    assert _strategy(name="fedadam").eta == _strategy(name="fedyogi").eta == pytest.approx(0.03)


def test_fedyogi_is_flowers_rule_on_a_hand_computed_case():
    # Prepare: eta 0.1, tau 0.01 (beta_1 0.9, beta_2 0.99); the sites' mean is 1 each round
    strategy = _strategy(name="fedyogi", **{"server-lr": 0.1, "tau": 0.01})
    sites = ((_w(0.5), 1), (_w(1.5), 1))

    # Execute
    first = aggregate(strategy, 1, _replies(*sites), _w(0.0))
    second = aggregate(strategy, 2, _replies(*sites), first)

    # Assert: delta 1, m = .1, v = 0 + .01 * 1 = .01, x = .1 * .1 / (.1 + .01) = 1/11
    np.testing.assert_allclose(first["w"], [1 / 11], rtol=1e-6)
    # delta 10/11, m = .09 + 1/11, v = .01 + .01 (10/11)^2 (Yogi: v < delta^2 so v grows)
    m, v = 0.09 + 1 / 11, 0.01 + 0.01 * (10 / 11) ** 2
    np.testing.assert_allclose(second["w"], [1 / 11 + 0.1 * m / (np.sqrt(v) + 0.01)], rtol=1e-5)


def test_fedmedian_takes_the_coordinate_wise_median_whatever_the_weights():
    strategy = _strategy(name="fedmedian")
    out = aggregate(strategy, 1, _replies((_w(1, 5), 1), (_w(2, -1), 100), (_w(100, 0), 1)),
                    _w(0, 0))
    np.testing.assert_allclose(out["w"], [2, 0])


def test_fedtrimmedavg_cuts_one_reply_per_tail_out_of_four():
    strategy = _strategy(name="fedtrimmedavg", **{"trim-beta": 0.25})
    out = aggregate(strategy, 1, _replies((_w(1, 40), 1), (_w(2, -8), 1), (_w(3, 0), 1),
                                          (_w(100, 2), 1)), _w(0, 0))
    np.testing.assert_allclose(out["w"], [2.5, 1.0])  # (2 + 3) / 2, (0 + 2) / 2


def test_krum_returns_the_reply_closest_to_its_neighbours():
    # Prepare: squared distances 0-1: .01, 0-2: .09, 1-2: .10; site 3 is far away. With
    # num-malicious 0 each site is scored by its 4 - 0 - 2 = 2 nearest: .10, .11, .19, >> 1
    strategy = _strategy(name="krum")
    sites = ((_w(0, 0), 5), (_w(0.1, 0), 1), (_w(0, 0.3), 1), (_w(10, 10), 1))

    # Execute
    out = aggregate(strategy, 1, _replies(*sites), _w(1, 1))

    # Assert
    np.testing.assert_allclose(out["w"], [0, 0], atol=1e-7)


#: One of each variable a strategy may see: a kernel, a PACT clip (a trainable weight in
#: warm-up), BatchNormalization statistics.
ROLE_KEYS = ("c_conv/kernel", "c_relu/alpha", "c_bn/moving_mean", "c_bn/moving_variance")


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_touches_the_variables_its_roles_say(name):
    # Prepare: three sites; a strategy-specific config that is valid for three replies
    rng = np.random.default_rng(4)
    cfg = {"name": name, **({"proximal-mu": 0.01} if name == "fedprox" else {}),
           **({"trim-beta": 0.34} if name == "fedtrimmedavg" else {})}
    strategy = make_strategy(StrategyConfig.model_validate(cfg))
    site = [{k: rng.uniform(0.5, 1.5, size=3).astype(np.float32) for k in ROLE_KEYS}
            for _ in range(3)]
    weights = [1, 2, 5]
    current = {k: np.ones(3, np.float32) for k in ROLE_KEYS}

    # Execute
    out = aggregate(strategy, 1, [_reply(s, n) for s, n in zip(site, weights, strict=True)],
                    current)

    # Assert
    roles = ROLES[name]
    assert set(roles) == {TRAINABLE, BN_STATS, QUANTIZER}
    assert roles[QUANTIZER].startswith("not aggregated")
    stack = {k: np.stack([s[k] for s in site]) for k in ROLE_KEYS}
    expected = {"weighted mean": weighted_mean(site, weights),
                "coordinate-wise median": {k: np.median(v, 0) for k, v in stack.items()},
                "coordinate-wise trimmed mean": {k: np.sort(v, 0)[1] for k, v in stack.items()}}
    for key in ROLE_KEYS:
        role = roles[BN_STATS if "moving" in key else TRAINABLE]
        if role in expected:
            np.testing.assert_allclose(out[key], expected[role][key], rtol=1e-6, err_msg=key)
        elif role == "the Krum-selected reply":
            assert any(np.allclose(out[key], s[key]) for s in site), key
        else:  # a server optimizer step from the current model, on trainable weights only
            assert "server step" in role and not np.allclose(out[key], expected[
                "weighted mean"][key]), key
    state = strategy_state(strategy)
    stepped = set(state.get("m_t") or state.get("momentum") or {})
    assert stepped == ({"c_conv/kernel", "c_relu/alpha"} if "server step" in roles[TRAINABLE]
                       else set())


def test_fedavgm_momentum_round_trips_by_key_and_resets():
    # Prepare
    strategy = _strategy(name="fedavgm")
    current = {"a/kernel": np.ones(2, np.float32), "b/kernel": np.zeros(3, np.float32),
               "b/moving_mean": np.zeros(3, np.float32)}
    site = {k: v + 1 for k, v in current.items()}
    aggregate(strategy, 1, [_reply(site, 1)], current)

    # Execute: restore into a fresh strategy; the next reply lists its keys in another order
    restored = _strategy(name="fedavgm")
    load_strategy_state(restored, strategy_state(strategy))
    reordered = {k: site[k] for k in reversed(list(site))}
    a = aggregate(strategy, 2, [_reply(site, 1)], current)
    b = aggregate(restored, 2, [_reply(reordered, 1)], current)
    reset_strategy_state(restored)

    # Assert
    for k in current:
        np.testing.assert_array_equal(a[k], b[k])
    assert restored.momentum is None and restored.steps == 0


@pytest.mark.parametrize(("strategy", "problem"), [
    ({"name": "fedavgm", "server-momentum": 1.0},
     "strategy.server-momentum: Input should be less than 1 (received 1.0); expected a "
     "momentum in [0, 1)"),
    ({"name": "fedtrimmedavg", "trim-beta": 0.5},
     "strategy.trim-beta: Input should be less than 0.5 (received 0.5); expected a fraction"),
    ({"name": "fedyogi", "server-lr": -0.1},
     "strategy.server-lr: Input should be greater than 0 (received -0.1); expected a learning"),
    ({"name": "fedtrimmedavg", "trim-beta": 0.2},
     "trim-beta=0.2 trims nothing when 3 sites reply (it cuts int(trim-beta x replies) per "
     "tail); set trim-beta >= 0.333"),
    ({"name": "krum", "num-malicious": 1},
     "krum with num-malicious=1 leaves no honest neighbour to score against when 3 sites "
     "reply; set num-malicious <= 0"),
])
def test_a_strategy_parameter_out_of_range_is_refused_echoing_value_and_fix(strategy, problem):
    from common.errors import ConfigError
    from common.fedconfig import parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "data": "d", "strategy": strategy,
                      "partition": {"sites": 3}, "quorum": {"min-sites": 3, "min-replies": 3}})
    assert problem in err.value.problem
