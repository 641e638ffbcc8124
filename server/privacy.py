"""Privacy spent per site: the (ε, δ) of the weight updates each site released in a run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Phases whose replies are weight updates (noised under ``dp.enabled``).
TRAINING_PHASES = ("warmup", "qat")


def released_updates(rounds: list[Mapping[str, Any]]) -> dict[str, int]:
    """Count, per site, the training rounds in which it may have released an update.

    A site counts when it replied (``replied``, or its opened report in ``sites`` for rounds
    recorded before that key existed) or when it did not reply in time: a late reply still
    left the site. A site that answered with an error (a refusal, a crash) sent no update.
    """
    counts: dict[str, int] = {}
    for r in rounds:
        if r.get("phase") not in TRAINING_PHASES:
            continue
        sites = set(r.get("replied", r.get("sites") or {}))
        sites |= {s for s, why in (r.get("dropped") or {}).items()
                  if str(why).startswith("no reply")}
        for site in sites:
            counts[site] = counts.get(site, 0) + 1
    return counts


def privacy_summary(state: Mapping[str, Any]) -> dict[str, Any]:
    """Return the report's ``privacy`` block from the driver's state.

    Returns
    -------
    dict[str, Any]
        ``enabled``, ``clip``, ``noise_multiplier``, ``delta``, ``accountant``,
        ``sampling_rate`` and ``sites``: site id → ``{"rounds", "epsilon", "delta"}``
        (``epsilon`` None without DP: the updates were sent as trained, ε is unbounded).
    """
    from importlib.metadata import version

    from common.dp import ACCOUNTANT, epsilon_spent

    dp = (state.get("scenario") or {}).get("dp") or {}
    enabled = bool(dp.get("enabled"))
    counts = released_updates(list(state.get("rounds") or []))
    sites = sorted(set(state.get("sites") or {}) | set(counts))
    z, delta = float(dp.get("noise-multiplier", 0.0)), float(dp.get("delta", 0.0))
    out: dict[str, Any] = {
        "enabled": enabled,
        "clip": dp.get("clip"),
        "noise_multiplier": dp.get("noise-multiplier"),
        "delta": dp.get("delta"),
        "accountant": f"{ACCOUNTANT} (dp-accounting {version('dp-accounting')})",
        "sampling_rate": 1.0,
        "sites": {},
    }
    for site in sites:
        n = counts.get(site, 0)
        eps = epsilon_spent(z, n, delta) if enabled else (0.0 if n == 0 else None)
        out["sites"][site] = {"rounds": n, "epsilon": eps, "delta": delta if enabled else None}
    return out


def ledger_rows(report: Mapping[str, Any], round: int) -> list[dict[str, Any]]:
    """Return one ledger row per site with its privacy spent (``Ledger.record`` arguments).

    The rows use phase ``privacy`` and ``round`` = one past the run's last planned round, so
    they never replace a site's round report and are updated (replaced) when a resumed run
    ends.
    """
    privacy = report.get("privacy") or {}
    common = {k: privacy.get(k) for k in ("enabled", "clip", "noise_multiplier", "accountant",
                                          "sampling_rate")}
    return [{"run": str(report.get("run_id")), "round": int(round), "site": site,
             "phase": "privacy", "metrics": {**common, **spent}}
            for site, spent in sorted((privacy.get("sites") or {}).items())]


def privacy_markdown(privacy: Mapping[str, Any]) -> list[str]:
    """Render the report's "Differential privacy" section."""
    if not privacy:
        return []
    lines = ["", "## Differential privacy", ""]
    if not privacy.get("enabled"):
        return lines + ["Off (`dp.enabled: false`): the sites' weight updates were sent as "
                        "trained; no privacy guarantee (ε unbounded)."]
    lines += [f"Each site clipped its weight update to L2 norm {privacy.get('clip')} and added "
              f"Gaussian noise of std {privacy.get('noise_multiplier')} × clip before sending. "
              f"ε from {privacy.get('accountant')}, δ = {privacy.get('delta')}, every site in "
              "every training round (sampling rate 1). Unit: one site's update per round "
              "(add/remove); not covered: calibration ranges, example counts, sealed metrics.",
              "", "| site | training rounds | ε | δ |", "|---|---|---|---|"]
    for site, s in sorted((privacy.get("sites") or {}).items()):
        eps = s.get("epsilon")
        lines.append(f"| {site} | {s.get('rounds')} | "
                     f"{'–' if eps is None else f'{eps:.3g}'} | {s.get('delta')} |")
    return lines
