"""The run ledger: every decrypted site report (and every refused one) in one SQLite file.

The ServerApp opens sealed reports with a :class:`server.driver.Receiver`; in deployment it is
wrapped in :class:`LedgerReceiver`, which writes each accepted report (run, round, site,
phase, metrics JSON, time) and each refusal (with its reason) to the ledger. The schema is
created on first use; ``qanafed coord status`` summarises it. The ServerApp's qanafed log
(rounds, dropped sites, refusals) goes to ``serverapp.log`` beside the ledger.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from common.log import ensure_log_output, get_logger

__all__ = ["Ledger", "LedgerReceiver"]

log = get_logger("deploy.ledger")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    run TEXT NOT NULL,
    round INTEGER NOT NULL,
    site TEXT NOT NULL,
    phase TEXT NOT NULL,
    metrics TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (run, round, site)
);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT NOT NULL,
    round INTEGER NOT NULL,
    site TEXT NOT NULL,
    reason TEXT NOT NULL,
    time REAL NOT NULL
);
"""


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    return str(value)


class Ledger:
    """An SQLite run ledger (created on first use; safe to read while the ServerApp writes).

    Parameters
    ----------
    path : str | Path
        The database file, e.g. ``<coordinator kit>/run/ledger.sqlite``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Decrypted metrics: owner-only (SQLite gives its -wal/-shm files the same mode).
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        if self.path.stat().st_mode & 0o077:
            os.chmod(self.path, 0o600)
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                yield db
        finally:
            db.close()

    def record(
        self, run: str, round: int, site: str, phase: str, metrics: Mapping[str, Any],
        at: float | None = None,
    ) -> None:
        """Store one decrypted report.

        A report re-sent for the same (run, round, site) replaces the earlier one (a round
        redone after a coordinator restart).
        """
        text = json.dumps(dict(metrics), sort_keys=True, default=_jsonable)
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO reports (run, round, site, phase, metrics, time) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (run, int(round), site, phase, text, at if at is not None else time.time()),
            )

    def refuse(self, run: str, round: int, site: str, reason: str) -> None:
        """Store one refused report with the reason."""
        with self._db() as db:
            db.execute(
                "INSERT INTO refusals (run, round, site, reason, time) VALUES (?, ?, ?, ?, ?)",
                (run, int(round), site, reason, time.time()),
            )

    def reports(self, run: str | None = None) -> list[dict[str, Any]]:
        """Return the accepted reports (of one run, or all), oldest first."""
        query = "SELECT run, round, site, phase, metrics, time FROM reports"
        args: tuple[Any, ...] = ()
        if run is not None:
            query, args = query + " WHERE run = ?", (run,)
        with self._db() as db:
            rows = db.execute(query + " ORDER BY time, round, site", args).fetchall()
        return [
            {"run": r[0], "round": r[1], "site": r[2], "phase": r[3],
             "metrics": json.loads(r[4]), "time": r[5]}
            for r in rows
        ]

    def refusals(self, run: str | None = None) -> list[dict[str, Any]]:
        """Return the refused reports (of one run, or all)."""
        query = "SELECT run, round, site, reason, time FROM refusals"
        args: tuple[Any, ...] = ()
        if run is not None:
            query, args = query + " WHERE run = ?", (run,)
        with self._db() as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        return [{"run": r[0], "round": r[1], "site": r[2], "reason": r[3], "time": r[4]}
                for r in rows]

    def summary(self) -> list[dict[str, Any]]:
        """One entry per run: rounds, sites, reports per round, refusals, first/last time."""
        runs: dict[str, dict[str, Any]] = {}
        for rep in self.reports():
            entry = runs.setdefault(rep["run"], {
                "run": rep["run"], "rounds": {}, "sites": set(), "refusals": 0,
                "first": rep["time"], "last": rep["time"],
            })
            rnd = entry["rounds"].setdefault(rep["round"], {"phase": rep["phase"], "sites": []})
            rnd["sites"].append(rep["site"])
            entry["sites"].add(rep["site"])
            entry["first"] = min(entry["first"], rep["time"])
            entry["last"] = max(entry["last"], rep["time"])
        for ref in self.refusals():
            if ref["run"] in runs:
                runs[ref["run"]]["refusals"] += 1
        out = []
        for entry in sorted(runs.values(), key=lambda e: e["first"]):
            rounds = entry["rounds"]
            out.append({
                "run": entry["run"],
                "sites": sorted(entry["sites"]),
                "last-round": max(rounds),
                "rounds": {str(k): {"phase": v["phase"], "sites": sorted(v["sites"])}
                           for k, v in sorted(rounds.items())},
                "refusals": entry["refusals"],
                "first": entry["first"],
                "last": entry["last"],
            })
        return out


class _Receiver(Protocol):
    def restore(self, seen_ids: list[str]) -> None: ...
    def seen_ids(self) -> list[str]: ...
    def open(self, envelope: object, run_id: str, step: int, site: str) -> dict | None: ...


class LedgerReceiver:
    """Wrap a report receiver so that every accepted or refused report lands in a ledger.

    Parameters
    ----------
    inner : Receiver
        The driver's receiver (``restore``, ``seen_ids``, ``open``).
    ledger : Ledger | str | Path
        The ledger, or its file.
    phases : Mapping[int, str]
        Round number → phase name (round 0 is ``hello``).
    """

    def __init__(
        self, inner: _Receiver, ledger: Ledger | str | Path, phases: Mapping[int, str]
    ) -> None:
        self.inner_receiver = inner
        self.ledger = ledger if isinstance(ledger, Ledger) else Ledger(ledger)
        self.phases = {0: "hello", **dict(phases)}
        ensure_log_output(self.ledger.path.with_name("serverapp.log"))

    @property
    def inner(self) -> Any:
        """The wrapped receiver's ``ReportReceiver`` (for code that reaches through)."""
        return getattr(self.inner_receiver, "inner", None)

    def restore(self, seen_ids: list[str]) -> None:
        """Refuse, after a restart, the reports accepted before it."""
        self.inner_receiver.restore(seen_ids)

    def seen_ids(self) -> list[str]:
        """Ids of the reports accepted so far."""
        return self.inner_receiver.seen_ids()

    def open(self, envelope: object, run_id: str, step: int, site: str) -> dict[str, Any] | None:
        """Open a report with the wrapped receiver and write the outcome to the ledger."""
        metrics = self.inner_receiver.open(envelope, run_id, step, site)
        phase = self.phases.get(step, "unknown")
        if metrics is None:
            reason = getattr(self.inner_receiver, "last_refusal", None) or (
                "no sealed report" if not isinstance(envelope, bytes)
                else "sealed report refused (tampered, replayed or misaddressed)")
            log.warning("ledger: round %d report of site %s refused: %s", step, site, reason)
            self.ledger.refuse(run_id, step, site, reason)
        else:
            self.ledger.record(run_id, step, site, phase, metrics)
        return metrics
