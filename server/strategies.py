"""Flower strategies chosen by config, used for aggregation only, and their checkpoint state."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.serverapp.strategy.fedopt import FedOpt

from common.errors import ConfigError
from common.fedconfig import StrategyConfig

from .protocol import ARRAYS, CONFIG, NUM_EXAMPLES, from_record


def make_strategy(cfg: StrategyConfig) -> FedAvg:
    """Build the configured Flower strategy (aggregation weighted by ``num-examples``).

    Sampling/``configure_*`` are never used: our driver picks sites with bounded waits.

    Raises
    ------
    ConfigError
        For an unknown strategy name.
    """
    common = dict(weighted_by_key=NUM_EXAMPLES, arrayrecord_key=ARRAYS, configrecord_key=CONFIG,
                  min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
    if cfg.name == "fedavg":
        return FedAvg(**common)
    if cfg.name == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.name == "fedadam":
        return FedAdam(eta=cfg.server_lr, eta_l=cfg.server_lr_local, tau=cfg.tau, **common)
    raise ConfigError(f"unknown strategy {cfg.name!r}", "use fedavg, fedprox or fedadam")


def aggregate(
    strategy: FedAvg,
    step: int,
    replies: Iterable[Message],
    current: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Aggregate the replies' arrays with the strategy's ``aggregate_train``.

    Parameters
    ----------
    strategy : FedAvg
        A Flower message-based strategy (FedAvg, FedProx, FedAdam ...).
    step : int
        Server round number passed to the strategy.
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
    keys = list(replies[0].content[ARRAYS].keys())
    if isinstance(strategy, FedOpt):
        strategy.current_arrays = {k: np.asarray(current[k]) for k in keys}
    arrays, _ = strategy.aggregate_train(step, replies)
    if arrays is None:
        raise ConfigError(f"round {step}: the strategy aggregated nothing", "check site replies")
    out = from_record(arrays)
    for k, v in out.items():  # FedAdam returns float64 arithmetic: keep the model's dtypes
        out[k] = v.astype(np.asarray(current[k]).dtype, copy=False) if k in current else v
    return out


def strategy_state(strategy: FedAvg) -> dict[str, dict[str, np.ndarray]]:
    """Return the strategy's server state worth checkpointing (FedAdam's ``m_t`` and ``v_t``)."""
    if not isinstance(strategy, FedOpt):
        return {}
    return {name: dict(getattr(strategy, name) or {}) for name in ("m_t", "v_t")}


def load_strategy_state(strategy: FedAvg, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Restore what :func:`strategy_state` saved (an empty set means "not started")."""
    if not isinstance(strategy, FedOpt):
        return
    for name in ("m_t", "v_t"):
        values = state.get(name) or {}
        setattr(strategy, name, {k: np.asarray(v) for k, v in values.items()} or None)


def reset_strategy_state(strategy: FedAvg) -> None:
    """Forget server optimizer state (the exchanged variables change at calibration)."""
    if isinstance(strategy, FedOpt):
        strategy.m_t = None
        strategy.v_t = None
        strategy.current_arrays = None
