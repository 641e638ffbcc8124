"""The ledger and sites pages: the run ledger read-only, and what each site did across runs.

The dashboard never writes: the ledger is opened with SQLite's read-only mode, so a missing
file stays missing and a corrupted one gives a "could not be read" panel, not a traceback.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deploy.dashboard import trust

__all__ = ["ledger_view", "read_ledger", "sites_view"]


def read_ledger(path: Path | None) -> dict[str, Any]:
    """Read the accepted and refused reports of the ledger at ``path`` (read-only).

    Returns
    -------
    dict[str, Any]
        ``path``, ``problem`` (None when read), ``reports`` (run, round, site, phase, time, and
        ``policy`` when the site reported one) and ``refusals`` (run, round, site, reason, time).
    """
    out: dict[str, Any] = {"path": str(path) if path else None, "problem": None,
                           "reports": [], "refusals": []}
    if path is None:
        out["problem"] = "no ledger given (--ledger)"
        return out
    if not path.is_file():
        out["problem"] = f"ledger {path.name} does not exist (yet)"
        return out
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            reports = db.execute("SELECT run, round, site, phase, metrics, time FROM reports "
                                 "ORDER BY time, round, site").fetchall()
            refusals = db.execute("SELECT run, round, site, reason, time FROM refusals "
                                  "ORDER BY time").fetchall()
        finally:
            db.close()
    except sqlite3.Error as err:
        out["problem"] = f"ledger {path.name} could not be read ({err})"
        return out
    for run, rnd, site, phase, metrics, at in reports:
        try:
            policy = json.loads(metrics).get("policy")
        except (TypeError, ValueError, AttributeError):
            policy = None
        out["reports"].append({"run": run, "round": rnd, "site": site, "phase": phase,
                               "time": at, "policy": policy if isinstance(policy, Mapping)
                               else None})
    out["refusals"] = [{"run": r[0], "round": r[1], "site": r[2], "reason": r[3], "time": r[4]}
                       for r in refusals]
    return out


def ledger_runs(ledger: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One entry per ledger run: rounds, sites, refusals, first and last report time."""
    runs: dict[str, dict[str, Any]] = {}
    for rep in ledger["reports"]:
        e = runs.setdefault(rep["run"], {"run": rep["run"], "rounds": set(), "sites": set(),
                                         "refusals": 0, "first": rep["time"],
                                         "last": rep["time"]})
        if rep["phase"] != "privacy":  # the per-site (ε, δ) row the run ends with
            e["rounds"].add(rep["round"])
        e["sites"].add(rep["site"])
        e["first"], e["last"] = min(e["first"], rep["time"]), max(e["last"], rep["time"])
    for ref in ledger["refusals"]:
        e = runs.setdefault(ref["run"], {"run": ref["run"], "rounds": set(), "sites": set(),
                                         "refusals": 0, "first": ref["time"],
                                         "last": ref["time"]})
        e["refusals"] += 1
    return [{**e, "rounds": len(e["rounds"]), "last_round": max(e["rounds"], default=None),
             "sites": sorted(e["sites"])}
            for e in sorted(runs.values(), key=lambda e: e["first"])]


def ledger_view(path: Path | None, folders: Mapping[str, str]) -> dict[str, Any]:
    """Gather the ledger page: runs (linked to their folder by run id), refusals, audit.

    Parameters
    ----------
    path : Path | None
        The ledger file (``--ledger``).
    folders : Mapping[str, str]
        Run id → run folder name, for the runs the runs folder holds.
    """
    ledger = read_ledger(path)
    runs = [{**r, "folder": folders.get(r["run"])} for r in ledger_runs(ledger)]
    audit = trust.ledger_audit(path) if path is not None and ledger["problem"] is None else None
    return {"path": ledger["path"], "problem": ledger["problem"], "runs": runs,
            "refusals": ledger["refusals"], "audit": audit}


def sites_view(ledger: Mapping[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gather one entry per site: runs, last seen, refusals, dropped rounds, policy.

    A site's policy shows when it reports one; a refusal that names the policy (at hello, in a
    round, or in the ledger) is shown as ``policy_refusal``.

    Parameters
    ----------
    ledger : Mapping[str, Any]
        :func:`read_ledger`'s output.
    runs : list[dict[str, Any]]
        :func:`deploy.dashboard.runs.run_view` of each federated run folder.
    """
    sites: dict[str, dict[str, Any]] = {}

    def entry(site: str) -> dict[str, Any]:
        return sites.setdefault(site, {"site": site, "runs": set(), "last_seen": None,
                                       "reports": 0, "refusals": 0, "last_refusal": None,
                                       "dropped": 0, "policy": None, "policy_refusal": None})

    def seen(e: dict[str, Any], at: float | None) -> None:
        if at is not None and (e["last_seen"] is None or at > e["last_seen"]):
            e["last_seen"] = at

    for view in runs:
        for site in view.get("sites") or []:
            e = entry(site)
            e["runs"].add(view["name"])
            seen(e, view.get("updated"))
            e["policy"] = e["policy"] or (view.get("site_info") or {}).get(site, {}).get("policy")
        for r in view.get("rounds") or []:
            for site, why in (r.get("dropped") or {}).items():
                entry(site)["dropped"] += 1
                if "policy" in str(why).lower():
                    entry(site)["policy_refusal"] = str(why)
        for site, why in (view.get("hello_dropped") or {}).items():  # refused the run's tasks
            e = entry(site)
            e["refusals"] += 1
            e["last_refusal"] = why
            if "policy" in why.lower():
                e["policy_refusal"] = why
    folders = {str(v.get("run_id")): v["name"] for v in runs if v.get("run_id")}
    for rep in ledger.get("reports") or []:
        e = entry(rep["site"])
        e["runs"].add(folders.get(rep["run"], rep["run"][:12]))
        e["reports"] += 1
        seen(e, rep["time"])
        e["policy"] = rep.get("policy") or e["policy"]
    for ref in ledger.get("refusals") or []:
        e = entry(ref["site"])
        e["refusals"] += 1
        e["last_refusal"] = ref["reason"]
        if "policy" in str(ref["reason"]).lower():
            e["policy_refusal"] = ref["reason"]
    return [{**e, "runs": sorted(e["runs"])} for _, e in sorted(sites.items())]
