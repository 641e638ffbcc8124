"""Flower strategies chosen by config, used for aggregation only, and their checkpoint state."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from common.errors import ConfigError
from common.fedconfig import STRATEGIES, StrategyConfig
from common.weights import BN_STATS, QUANTIZER, TRAINABLE, is_statistic

from .protocol import ARRAYS, CONFIG, NUM_EXAMPLES, from_record, unpack_replies

#: Checkpoint group holding the server optimizer's step count (see :func:`strategy_state`).
STEPS_GROUP = "server-opt"
#: Checkpoint group holding FedAvgM's momentum, by key.
MOMENTUM_GROUP = "momentum"

#: How each strategy combines each variable group a site sends (:mod:`common.weights`), for
#: docs, reports and tests. Trainable weights include PACT's α in the warm-up rounds (an
#: ordinary weight there). Quantizer state never reaches a strategy: sites send it only at
#: calibration, where :func:`common.aggregate.combine_ranges` combines it (per-channel max),
#: and the guard refuses it in training rounds; the baked α is kept by the server after
#: calibration and refused in replies too (:func:`server.driver.expected_keys`).
ROLES: dict[str, dict[str, str]] = {
    **{name: {TRAINABLE: "weighted mean", BN_STATS: "weighted mean"}
       for name in ("fedavg", "fedprox")},
    **{name: {TRAINABLE: f"{name} server step from the weighted mean",
              BN_STATS: "weighted mean"} for name in ("fedadam", "fedyogi", "fedavgm")},
    "fedmedian": {TRAINABLE: "coordinate-wise median", BN_STATS: "coordinate-wise median"},
    "fedtrimmedavg": {TRAINABLE: "coordinate-wise trimmed mean",
                      BN_STATS: "coordinate-wise trimmed mean"},
    "krum": {TRAINABLE: "the Krum-selected reply", BN_STATS: "the Krum-selected reply"},
}
ROLES = {name: {**roles, QUANTIZER: "not aggregated (calibration: per-channel max)"}
         for name, roles in ROLES.items()}


class StatisticsAveraged(FedAvg):
    """A server optimizer that sees only the keys of ``current_arrays``.

    ``aggregate_train`` first takes Flower's example-weighted mean of every replied array
    (FedAvg); the keys absent from ``current_arrays`` (statistics: BatchNormalization moving
    mean/variance) keep that mean, in :attr:`statistics`; only the others go on to the
    optimizer step of the subclass (FedAdam, FedYogi, FedAvgM), which receives them through
    ``super().aggregate_train``. :attr:`steps` counts optimizer steps since the last reset,
    for Adam's bias correction.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.statistics: dict[str, np.ndarray] = {}
        self.steps = 0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted mean of all replied arrays; return the optimized keys, keep the others."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        current = getattr(self, "current_arrays", None)
        if arrays is None or current is None:
            return arrays, metrics
        self.statistics = {k: v.numpy() for k, v in arrays.items() if k not in current}
        return ArrayRecord({k: v for k, v in arrays.items() if k in current}), metrics


class ServerAdam(FedAdam, StatisticsAveraged):
    """Flower's FedAdam stepping trainable weights only; statistics are example-weighted means.

    Method resolution order: ``FedAdam.aggregate_train`` asks ``super()`` for the mean, which
    is :class:`StatisticsAveraged`'s, so Flower's Adam update runs unchanged on the trainable
    keys. Stepping BatchNormalization statistics with Adam is what collapsed FedAdam to one
    class: every statistic moved by at most about ``eta`` per round (sign-like, whatever the
    sites reported), so the moving means stayed near 0 and the variances near 1 while the
    sites measured means of ±0.5 and variances of 0.013–1.5 (and with a larger ``eta`` a small
    variance would be pushed below zero).
    """


class ServerYogi(FedYogi, StatisticsAveraged):
    """Flower's FedYogi (Reddi et al., arXiv 2003.00295) on trainable weights only, as FedAdam.

    Yogi's second moment moves additively, ``v -= (1 - beta_2) delta^2 sign(v - delta^2)``,
    and Flower applies no bias correction: the first step is about ``eta`` per coordinate.
    """


class ServerAvgM(FedAvgM, StatisticsAveraged):
    """Flower's FedAvgM (Hsu et al., arXiv 1909.06335) on trainable weights only.

    Flower's rule (PyTorch SGD convention): pseudo-gradient ``g = x - mean``, momentum
    ``m = beta m + g`` (``m = g`` in the first step), ``x -= server_lr * m``. Flower keeps
    ``m`` as a list in key order; :attr:`momentum` keeps it by key, so a checkpoint restores
    it whatever order the next replies list their keys in.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.momentum: dict[str, np.ndarray] | None = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAvgM step, with the momentum carried by key."""
        keys = list(self.current_arrays.keys()) if self.current_arrays is not None else []
        self.momentum_vector = ([self.momentum[k] for k in keys] if self.momentum else None)
        out = super().aggregate_train(server_round, replies)
        if self.momentum_vector is not None:
            self.momentum = dict(zip(keys, self.momentum_vector, strict=True))
        return out


def make_strategy(cfg: StrategyConfig) -> FedAvg:
    """Build the configured Flower strategy (aggregation weighted by ``num-examples``).

    Sampling/``configure_*`` are never used: our driver picks sites with bounded waits, and
    :func:`aggregate` hands the strategy the global arrays ``configure_train`` would have.
    What each strategy does to which variables: :data:`ROLES`.

    FedAdam is :class:`ServerAdam` with Flower's ``beta_1`` 0.9 and ``beta_2`` 0.99 (Reddi et
    al.), ``eta = cfg.server_lr`` and ``tau = cfg.tau``. Adam's server step is about
    ``eta * m / (sqrt(v) + tau)`` per coordinate: sign-like, about ``eta``, where the sites'
    update ``|delta| >> tau``; damped where ``|delta| <~ tau`` (Flower's bias correction makes
    the first step 0.74 ``eta``). So ``eta`` must be about the size of a FedAvg step. Measured
    on HAM10000's 4 natural sites (qana-akd1000, 48 px, width 0.25, vidir_molemax nv capped at
    200, one local epoch at Adam 3e-3 per round): a site's update is 0.013–0.020 RMS, their
    weighted mean 0.012 (median |delta| ~0: many weights barely move). Global float model
    after 3 rounds, balanced accuracy (weights moved, RMS): FedAvg 0.31 (0.025); eta 0.01 0.16
    (0.007, too slow); **eta 0.03 0.26 (0.021)**; eta 0.05 0.19; eta 0.1 0.15; eta 0.03 with
    tau 1e-4 (more sign-like) 0.15. Hence eta 0.03 and tau 1e-3: ``tau`` keeps the weights the
    sites barely moved from getting full ``eta`` steps. A QAT epoch at 3e-4 moves the weights
    by ~0.006 RMS; a 0.03 sign-like step stays well under a 4-bit quantization bin (~0.1–0.2
    here). Bias correction counts the optimizer's own steps since its last reset (calibration
    restarts it), not the run's round number.

    FedYogi (:class:`ServerYogi`) takes the same ``eta``/``tau`` (its steps are the same size;
    not tuned separately). FedAvgM (:class:`ServerAvgM`) defaults to server-lr 0.1 with
    momentum 0.9: an effective step ``lr / (1 - beta)`` of one FedAvg step, where Hsu et al.
    found FedAvgM best. FedMedian, FedTrimmedAvg (``beta = trim-beta``) and Krum
    (``num_malicious_nodes = num-malicious``) are Flower's classes unchanged: they combine
    every replied array, statistics included (a median or trimmed mean of variances stays
    positive; Krum returns one site's arrays).

    Raises
    ------
    ConfigError
        For an unknown strategy name.
    """
    common = dict(weighted_by_key=NUM_EXAMPLES, arrayrecord_key=ARRAYS, configrecord_key=CONFIG,
                  min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
    lr = cfg.effective_server_lr
    if cfg.name == "fedavg":
        return FedAvg(**common)
    if cfg.name == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.name in ("fedadam", "fedyogi"):
        cls = ServerAdam if cfg.name == "fedadam" else ServerYogi
        return cls(eta=lr, eta_l=cfg.server_lr_local, tau=cfg.tau, beta_1=0.9, beta_2=0.99,
                   **common)
    if cfg.name == "fedavgm":
        return ServerAvgM(server_learning_rate=lr, server_momentum=cfg.server_momentum,
                          **common)
    if cfg.name == "fedmedian":
        return FedMedian(**common)
    if cfg.name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=cfg.trim_beta, **common)
    if cfg.name == "krum":
        return Krum(num_malicious_nodes=cfg.num_malicious, **common)
    raise ConfigError(f"unknown strategy {cfg.name!r}", f"use one of {', '.join(STRATEGIES)}")


def aggregate(
    strategy: FedAvg,
    step: int,
    replies: Iterable[Message],
    current: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Aggregate the replies' arrays with the strategy's ``aggregate_train``.

    FedAvg and FedProx return the example-weighted mean of every array. A
    :class:`StatisticsAveraged` optimizer (FedAdam, FedYogi, FedAvgM) steps the trainable
    weights from ``current`` and returns the example-weighted mean for statistics
    (:func:`common.weights.is_statistic`). FedMedian, FedTrimmedAvg and Krum combine every
    array by their rule (:data:`ROLES`).

    Parameters
    ----------
    strategy : FedAvg
        A strategy from :func:`make_strategy`.
    step : int
        Server round number passed to the strategy; a :class:`StatisticsAveraged` optimizer
        is given its own step count instead (bias correction restarts with its state).
    replies : Iterable[Message]
        Good replies, each with one ArrayRecord and a ``num-examples`` MetricRecord.
    current : Mapping[str, np.ndarray]
        The global arrays the sites started from (FedAdam's ``current_arrays``); only the keys
        the sites returned are used.

    Returns
    -------
    dict[str, np.ndarray]
        New values of the returned keys.
    """
    replies = list(replies)
    unpack_replies(replies)
    keys = list(replies[0].content[ARRAYS].keys())
    server_round = step
    if isinstance(strategy, StatisticsAveraged):
        stepped = {k: np.asarray(current[k]) for k in keys if not is_statistic(k)}
        strategy.current_arrays = (stepped if isinstance(strategy, FedOpt) else
                                   ArrayRecord({k: Array(v) for k, v in stepped.items()}))
        strategy.steps += 1
        server_round = strategy.steps
    arrays, _ = strategy.aggregate_train(server_round, replies)
    if arrays is None:
        raise ConfigError(f"round {step}: the strategy aggregated nothing", "check site replies")
    out = from_record(arrays)
    if isinstance(strategy, StatisticsAveraged):
        out.update(strategy.statistics)
    for k, v in out.items():  # FedAdam returns float64 arithmetic: keep the model's dtypes
        out[k] = v.astype(np.asarray(current[k]).dtype, copy=False) if k in current else v
    return out


def strategy_state(strategy: FedAvg) -> dict[str, dict[str, np.ndarray]]:
    """Return the server state worth checkpointing.

    FedAdam/FedYogi: ``m_t``, ``v_t``; FedAvgM: the momentum; both: the step count. The other
    strategies keep no state between rounds.
    """
    if not isinstance(strategy, StatisticsAveraged):
        return {}
    state: dict[str, dict[str, np.ndarray]] = {
        STEPS_GROUP: {"steps": np.asarray(strategy.steps, dtype=np.int64)}}
    if isinstance(strategy, FedOpt):
        state.update({name: dict(getattr(strategy, name) or {}) for name in ("m_t", "v_t")})
    if isinstance(strategy, ServerAvgM):
        state[MOMENTUM_GROUP] = dict(strategy.momentum or {})
    return state


def load_strategy_state(strategy: FedAvg, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Restore what :func:`strategy_state` saved (an empty set means "not started")."""
    if not isinstance(strategy, StatisticsAveraged):
        return
    if isinstance(strategy, FedOpt):
        for name in ("m_t", "v_t"):
            values = state.get(name) or {}
            setattr(strategy, name, {k: np.asarray(v) for k, v in values.items()} or None)
    if isinstance(strategy, ServerAvgM):
        values = state.get(MOMENTUM_GROUP) or {}
        strategy.momentum = {k: np.asarray(v) for k, v in values.items()} or None
    steps = (state.get(STEPS_GROUP) or {}).get("steps")
    strategy.steps = int(steps) if steps is not None else 0


def reset_strategy_state(strategy: FedAvg) -> None:
    """Forget server optimizer state (the exchanged variables change at calibration)."""
    if not isinstance(strategy, StatisticsAveraged):
        return
    if isinstance(strategy, FedOpt):
        strategy.m_t = None
        strategy.v_t = None
    if isinstance(strategy, ServerAvgM):
        strategy.momentum = None
        strategy.momentum_vector = None
    strategy.current_arrays = None
    strategy.steps = 0
    strategy.statistics = {}
