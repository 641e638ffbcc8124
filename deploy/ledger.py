"""The run ledger: every decrypted site report (and every refused one) in one SQLite file.

The ServerApp opens sealed reports with a :class:`server.driver.Receiver`; in deployment it is
wrapped in :class:`LedgerReceiver`, which writes each accepted report (run, round, site,
phase, metrics JSON, time) and each refusal (with its reason) to the ledger. The schema is
created on first use; ``qanafed coord status`` summarises it. The ServerApp's qanafed log
(rounds, dropped sites, refusals) goes to ``serverapp.log`` beside the ledger.

Tamper evidence: every report and refusal is also appended to the ``journal`` table, an
append-only hash chain. Entry *n* stores its content as canonical JSON (sorted keys, no
spaces), the hash of entry *n-1* and its own hash ``SHA-256(prev_hash, newline, entry)``; the
rows of ``reports`` and ``refusals`` carry the hash of their entry (``entry_hash``), and each
accepted report's sealed envelope is kept with its SHA-256. :func:`audit_ledger` re-walks the
chain and matches every row to its entry, so editing, deleting or reordering a row (or an
entry) is found and named (``qanafed coord audit``). A chain can be recomputed by someone who
can write the file: keep the last entry's hash (printed by the audit) somewhere else too.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from common.log import ensure_log_output, get_logger
from common.release import canonical_json

__all__ = ["GENESIS", "Ledger", "LedgerAudit", "LedgerReceiver", "audit_ledger"]

#: The "previous hash" of the first journal entry.
GENESIS = "0" * 64

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
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    entry TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    envelope BLOB
);
"""


def _entry_hash(prev_hash: str, entry: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{entry}".encode()).hexdigest()


def _sha256(envelope: object) -> str | None:
    return hashlib.sha256(envelope).hexdigest() if isinstance(envelope, bytes) else None


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
            for table in ("reports", "refusals"):  # ledgers from before the hash chain
                columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if "entry_hash" not in columns:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN entry_hash TEXT")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                yield db
        finally:
            db.close()

    @staticmethod
    def _append(db: sqlite3.Connection, entry: dict[str, Any], envelope: bytes | None) -> str:
        """Append ``entry`` to the journal (inside the caller's write transaction); its hash."""
        last = db.execute("SELECT hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
        prev = last[0] if last else GENESIS
        text = canonical_json(entry).decode("utf-8")
        digest = _entry_hash(prev, text)
        db.execute("INSERT INTO journal (entry, prev_hash, hash, envelope) VALUES (?, ?, ?, ?)",
                   (text, prev, digest, envelope))
        return digest

    def record(
        self, run: str, round: int, site: str, phase: str, metrics: Mapping[str, Any],
        at: float | None = None, envelope: bytes | None = None,
    ) -> None:
        """Store one decrypted report (and its sealed ``envelope``, for the audit).

        A report re-sent for the same (run, round, site) replaces the earlier one in
        ``reports`` (a round redone after a coordinator restart); the journal keeps both.
        """
        text = json.dumps(dict(metrics), sort_keys=True, default=_jsonable)
        at = at if at is not None else time.time()
        entry = {"kind": "report", "run": run, "round": int(round), "site": site,
                 "phase": phase, "metrics": json.loads(text), "time": at,
                 "envelope_sha256": _sha256(envelope)}
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            digest = self._append(db, entry, envelope if isinstance(envelope, bytes) else None)
            db.execute(
                "INSERT OR REPLACE INTO reports (run, round, site, phase, metrics, time, "
                "entry_hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run, int(round), site, phase, text, at, digest),
            )

    def refuse(self, run: str, round: int, site: str, reason: str,
               envelope: object = None) -> None:
        """Store one refused report with the reason (and the SHA-256 of what was received)."""
        at = time.time()
        entry = {"kind": "refusal", "run": run, "round": int(round), "site": site,
                 "reason": reason, "time": at, "envelope_sha256": _sha256(envelope)}
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            digest = self._append(db, entry, None)
            db.execute(
                "INSERT INTO refusals (run, round, site, reason, time, entry_hash) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (run, int(round), site, reason, at, digest),
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
                # the (ε, δ) rows a run ends with are numbered after its last round
                "last-round": max((k for k, v in rounds.items() if v["phase"] != "privacy"),
                                  default=max(rounds)),
                "rounds": {str(k): {"phase": v["phase"], "sites": sorted(v["sites"])}
                           for k, v in sorted(rounds.items())},
                "refusals": entry["refusals"],
                "first": entry["first"],
                "last": entry["last"],
            })
        return out


@dataclass(frozen=True)
class LedgerAudit:
    """The verdict of :func:`audit_ledger`.

    Attributes
    ----------
    ok : bool
        Every entry chains to the one before and every row matches its entry.
    entries : int
        Journal entries read.
    first_broken : int | None
        Sequence number (1-based) of the first entry found broken, None when ``ok`` or when
        the ledger predates the chain.
    reason : str
        What is wrong with it (or a one-line summary when ``ok``).
    head : str | None (default: None)
        Hash of the last entry: record it elsewhere to notice a recomputed chain.
    envelopes_checked : int (default: 0)
        Sealed envelopes whose SHA-256 (and, with the metrics key, content) was checked.
    """

    ok: bool
    entries: int
    first_broken: int | None
    reason: str
    head: str | None = None
    envelopes_checked: int = 0


def _row_problem(entry: dict[str, Any], row: dict[str, Any]) -> str | None:
    """Say how a ``reports``/``refusals`` row differs from its journal entry (None: it does not)."""
    for key, value in row.items():
        if entry.get(key) != value:
            return f"its {key} is {value!r} in the table but {entry.get(key)!r} in the journal"
    return None


def audit_ledger(path: str | Path, metrics_key: str | Path | None = None) -> LedgerAudit:
    """Verify a ledger's hash chain, its rows and its stored envelopes; name the first break.

    Parameters
    ----------
    path : str | Path
        The ledger file (``<coordinator kit>/run/ledger.sqlite``).
    metrics_key : str | Path | None (default: None)
        The coordinator's ``metrics.key``: each stored envelope is then opened again and its
        metrics compared with the stored ones. Without it only the envelopes' SHA-256 is checked.

    Returns
    -------
    LedgerAudit
        ``ok`` and, when not, the first broken entry and why. Nothing is written to the ledger.
    """
    from common.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ledger {path} does not exist",
                          "pass --ledger FILE, or --kit KIT of a coordinator that ran")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "reports" not in tables:
            raise ConfigError(f"{path} is not a qanafed run ledger (no reports table)",
                              "pass the ledger.sqlite of a coordinator kit's run/ folder")
        journal = db.execute("SELECT seq, entry, prev_hash, hash, envelope FROM journal "
                             "ORDER BY seq").fetchall() if "journal" in tables else []
        reports = db.execute("SELECT run, round, site, phase, metrics, time, "
                             + ("entry_hash" if "journal" in tables else "NULL")
                             + " FROM reports").fetchall()
        refusals = db.execute("SELECT run, round, site, reason, time, "
                              + ("entry_hash" if "journal" in tables else "NULL")
                              + " FROM refusals").fetchall() if "refusals" in tables else []
    finally:
        db.close()
    legacy = sum(1 for row in (*reports, *refusals) if row[-1] is None)
    if legacy:
        return LedgerAudit(
            False, len(journal), None,
            f"{path}: {legacy} row(s) were written before ledger entries were hash-chained "
            "(an older qanafed): they cannot be audited. Fix: keep this file as the record of "
            "those runs and move it away; the coordinator starts a new, chained ledger")
    if metrics_key is not None:
        from common.metrics_crypto import ReportReceiver, load_metrics_private_key

        private = load_metrics_private_key(metrics_key)
    problems: list[tuple[int, str]] = []
    entries: dict[str, tuple[int, dict[str, Any]]] = {}
    prev, checked = GENESIS, 0
    for index, (seq, text, prev_hash, digest, envelope) in enumerate(journal, start=1):
        if seq != index:
            problems.append((index, f"entry {index} is missing (the next entry is number {seq}):"
                                    " an entry was deleted"))
            break
        if prev_hash != prev:
            problems.append((seq, f"entry {seq} does not follow entry {seq - 1} (its previous "
                                  "hash differs): an entry was deleted, inserted or reordered"))
            break
        if _entry_hash(prev_hash, text) != digest:
            problems.append((seq, f"entry {seq} was edited (its content no longer matches its "
                                  "hash)"))
            break
        entry = json.loads(text)
        entries[digest] = (seq, entry)
        if envelope is not None:
            checked += 1
            if hashlib.sha256(envelope).hexdigest() != entry.get("envelope_sha256"):
                problems.append((seq, f"entry {seq}'s stored envelope was replaced"))
                break
            if metrics_key is not None:
                receiver = ReportReceiver(private)  # a fresh one: no replay bookkeeping
                try:
                    opened = receiver.open(envelope, run_id=entry["run"], round=entry["round"],
                                           site_id=entry["site"])
                except Exception as err:  # noqa: BLE001 - any refusal is the finding
                    problems.append((seq, f"entry {seq}'s envelope does not open for run "
                                          f"{entry['run']}, round {entry['round']}, site "
                                          f"{entry['site']}: {err}"))
                    break
                if json.loads(json.dumps(opened, sort_keys=True)) != entry.get("metrics"):
                    problems.append((seq, f"entry {seq}'s metrics differ from what its sealed "
                                          "envelope holds"))
                    break
        prev = digest
    latest: dict[tuple[str, int, str], str] = {}
    for digest, (_, entry) in sorted(entries.items(), key=lambda item: item[1][0]):
        if entry.get("kind") == "report":
            latest[(entry["run"], entry["round"], entry["site"])] = digest
    rows = [(r[6], "report", {"run": r[0], "round": r[1], "site": r[2], "phase": r[3],
                              "metrics": json.loads(r[4]), "time": r[5]}) for r in reports]
    rows += [(r[5], "refusal", {"run": r[0], "round": r[1], "site": r[2], "reason": r[3],
                                "time": r[4]}) for r in refusals]
    for digest, kind, row in rows:
        where = f"{kind} row (run {row['run']}, round {row['round']}, site {row['site']})"
        if digest not in entries:
            problems.append((len(journal) + 1, f"{where} has no journal entry: it was added "
                                               "or its entry removed"))
            continue
        seq, entry = entries[digest]
        problem = _row_problem(entry, row)
        if problem:
            problems.append((seq, f"{where} was edited: {problem}"))
    held = {r[0] for r in rows}
    for digest in latest.values():
        if digest not in held:
            seq, entry = entries[digest]
            problems.append((seq, f"report row of entry {seq} (run {entry['run']}, round "
                                  f"{entry['round']}, site {entry['site']}) was deleted"))
    refused = [d for d, (_, e) in entries.items() if e.get("kind") == "refusal"]
    for digest in refused:
        if digest not in held:
            seq, entry = entries[digest]
            problems.append((seq, f"refusal row of entry {seq} (run {entry['run']}, round "
                                  f"{entry['round']}, site {entry['site']}) was deleted"))
    head = journal[-1][3] if journal else None
    if problems:
        seq, reason = min(problems)
        return LedgerAudit(False, len(journal), seq, f"{path}: {reason}", head, checked)
    return LedgerAudit(True, len(journal), None,
                       f"{path}: {len(journal)} entries chained, {len(rows)} rows match, "
                       f"{checked} envelope(s) checked", head, checked)


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
            self.ledger.refuse(run_id, step, site, reason, envelope)
        else:
            self.ledger.record(run_id, step, site, phase, metrics,
                               envelope=envelope if isinstance(envelope, bytes) else None)
        return metrics
