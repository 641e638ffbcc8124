"""Differential privacy of a site's weight update: L2 clipping, Gaussian noise, accounting.

A site that trains in a warm-up or QAT round sends ``w_global + Δ``. Under ``dp.enabled`` it
sends ``w_global + clip(Δ, C) + N(0, (z·C)² I)`` instead (:func:`privatize`): the update ``Δ``
(every exchanged array, trainable weights and BatchNormalization statistics alike — both are
computed from the site's images) is scaled down to L2 norm ``C`` if it is longer, and Gaussian
noise of standard deviation ``z·C`` (``z`` = noise multiplier) is added to every coordinate,
on the site, before anything is sent. This is the Gaussian mechanism of DP-FedAvg (McMahan et
al., 2018) with the noise added by each site instead of the server, so the coordinator itself
is not trusted with an un-noised update.

Privacy unit and accounting. One round is a Gaussian mechanism of L2 sensitivity ``C`` for
adding or removing one site's whole contribution (client-level add/remove adjacency, as in
DP-FedAvg and TensorFlow Federated); ``T`` rounds compose. The spent ``(ε, δ)`` is computed by
Google's ``dp-accounting`` (RDP accountant, :func:`epsilon_spent`), never by a formula of
ours. A site whose data changes rather than disappears (replace-one adjacency) moves its
clipped update by up to ``2C``: read its ε at half the noise multiplier.

What the ε does not cover: the calibration round's activation ranges, the example count
(the FedAvg weight, sent in the clear) and the sealed metrics are not noised.

The noise is drawn from the operating system's entropy (:func:`secure_rng`), never from the
run seed: the coordinator knows the run seed and could regenerate and subtract seeded noise.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

import numpy as np

from .errors import ConfigError, ModelError

__all__ = [
    "ACCOUNTANT",
    "clip_update",
    "epsilon_spent",
    "privatize",
    "secure_rng",
    "update_norm",
]

#: The accountant :func:`epsilon_spent` uses (reported beside every ε).
ACCOUNTANT = "rdp"

#: Array leaves that must stay non-negative after noise (a variance cannot be negative).
_NON_NEGATIVE = ("moving_variance",)


def secure_rng() -> np.random.Generator:
    """Return a generator seeded with 128 bits of operating-system entropy (not the run seed)."""
    return np.random.default_rng(np.random.SeedSequence(secrets.randbits(128)))


def _update(
    received: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Return ``sent - received`` per key, in float64; refuse keys or dtypes DP cannot cover."""
    missing = sorted(set(sent) - set(received))
    if missing:
        raise ModelError(
            f"differential privacy: the site sends arrays it did not receive: {missing[:5]}",
            "DP clips the change of each received array; send only received arrays",
        )
    out = {}
    for k, v in sent.items():
        a = np.asarray(v)
        if not np.issubdtype(a.dtype, np.floating):
            raise ModelError(
                f"differential privacy: array {k!r} has dtype {a.dtype}, which cannot be noised",
                "exchange floating-point arrays only under dp.enabled",
            )
        out[k] = a.astype(np.float64) - np.asarray(received[k], dtype=np.float64)
    return out


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all arrays of an update taken as one vector."""
    return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64))))
                             for v in update.values())))


def clip_update(update: Mapping[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    """Scale an update down to L2 norm ``clip`` if it is longer (a shorter one is unchanged).

    Parameters
    ----------
    update : Mapping[str, np.ndarray]
        Named arrays, taken together as one vector.
    clip : float
        The largest L2 norm let through (> 0).
    """
    if not clip > 0:
        raise ConfigError(f"dp clip must be > 0, got {clip!r}", "set dp.clip to e.g. 1.0")
    norm = update_norm(update)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, np.float64) * scale for k, v in update.items()}


def privatize(
    received: Mapping[str, np.ndarray],
    sent: Mapping[str, np.ndarray],
    clip: float,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Return what a site may send under DP: ``received + clip(sent - received) + noise``.

    Parameters
    ----------
    received : Mapping[str, np.ndarray]
        The global arrays the site started the round from.
    sent : Mapping[str, np.ndarray]
        The arrays it would send without DP (a subset of the received keys, floating point).
    clip : float
        L2 bound ``C`` of the whole update.
    noise_multiplier : float
        ``z``: the noise standard deviation is ``z * C`` per coordinate (> 0).
    rng : np.random.Generator | None (default: None)
        Source of noise; None draws from :func:`secure_rng` (tests pass a seeded one).

    Returns
    -------
    dict[str, np.ndarray]
        The keys of ``sent``, in their dtypes; BatchNormalization moving variances are kept
        non-negative (post-processing, which costs no privacy).

    Raises
    ------
    ConfigError
        If ``clip`` or ``noise_multiplier`` is not positive.
    ModelError
        If ``sent`` holds a key not received, or a non-floating array.
    """
    if not noise_multiplier > 0:
        raise ConfigError(f"dp noise-multiplier must be > 0, got {noise_multiplier!r}",
                          "set dp.noise-multiplier to e.g. 1.0")
    rng = secure_rng() if rng is None else rng
    clipped = clip_update(_update(received, sent), clip)
    std = float(noise_multiplier) * float(clip)
    out = {}
    for k, delta in clipped.items():
        value = np.asarray(received[k], np.float64) + delta + rng.normal(0.0, std, delta.shape)
        if k.rsplit("/", 1)[-1] in _NON_NEGATIVE:
            value = np.maximum(value, 0.0)
        out[k] = value.astype(np.asarray(sent[k]).dtype)
    return out


def epsilon_spent(
    noise_multiplier: float, rounds: int, delta: float, sampling_rate: float = 1.0
) -> float:
    """Return the ε spent by ``rounds`` Gaussian releases, from ``dp-accounting``'s RDP accountant.

    Parameters
    ----------
    noise_multiplier : float
        Noise standard deviation over the L2 sensitivity (``z``).
    rounds : int
        Rounds the site released an update in (0 gives 0).
    delta : float
        Target δ, in (0, 1).
    sampling_rate : float (default: 1.0)
        Probability that a site takes part in a round (Poisson sampling); 1 = every round.
    """
    if rounds <= 0:
        return 0.0
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(float(noise_multiplier))
    if sampling_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(float(sampling_rate), event)
    accountant = RdpAccountant()
    accountant.compose(event, int(rounds))
    return float(accountant.get_epsilon(float(delta)))
