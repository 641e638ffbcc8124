"""The run ledger's hash chain on real SQLite files and real sealed reports: edits are found."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from common.metrics_crypto import encrypt_report, load_metrics_public_key, save_metrics_keypair
from deploy.ledger import GENESIS, Ledger, LedgerAudit, LedgerReceiver, _entry_hash, audit_ledger


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "keys" / "metrics.key", tmp_path / "keys" / "metrics.pub"
    save_metrics_keypair(private, public)
    return private, public


@pytest.fixture
def ledger(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    """A ledger written through the ServerApp's own receiver: 4 reports, 1 refusal."""
    from common.metrics_crypto import load_metrics_private_key
    from server.driver import Receiver

    path = tmp_path / "run" / "ledger.sqlite"
    receiver = LedgerReceiver(Receiver(load_metrics_private_key(keys[0])), path,
                              {1: "warmup", 2: "qat"})
    public = load_metrics_public_key(keys[1])
    for step in (1, 2):
        for site in ("a", "b"):
            metrics = {"test": {"balanced_accuracy": 0.5 + step / 10, "num_examples": 12}}
            envelope = encrypt_report(metrics, public, run_id="r1", round=step, site_id=site)
            assert receiver.open(envelope, "r1", step, site) == metrics
    assert receiver.open(b"garbage", "r1", 2, "c") is None
    return path


def _sql(path: Path, statement: str, *args: object) -> None:
    db = sqlite3.connect(path)
    with db:
        db.execute(statement, args)
    db.close()


def test_intact_ledger_passes_with_and_without_the_metrics_key(
    ledger: Path, keys: tuple[Path, Path]
) -> None:
    result = audit_ledger(ledger)
    assert isinstance(result, LedgerAudit)
    assert result.ok and result.entries == 5 and result.first_broken is None
    assert result.envelopes_checked == 4 and len(result.head or "") == 64
    assert audit_ledger(ledger, keys[0]).ok


def test_a_report_sent_again_replaces_its_row_and_the_chain_still_holds(ledger: Path) -> None:
    Ledger(ledger).record("r1", 2, "a", "qat", {"test": {"balanced_accuracy": 0.9}})
    result = audit_ledger(ledger)
    assert result.ok and result.entries == 6
    assert len(Ledger(ledger).reports("r1")) == 4


def test_edited_row_is_found(ledger: Path) -> None:
    _sql(ledger, "UPDATE reports SET metrics = ? WHERE round = 2 AND site = 'a'",
         json.dumps({"test": {"balanced_accuracy": 0.99, "num_examples": 12}}))
    result = audit_ledger(ledger)
    assert not result.ok and result.first_broken == 3
    assert "report row (run r1, round 2, site a) was edited" in result.reason
    assert str(ledger) in result.reason


def test_edited_journal_entry_is_found(ledger: Path) -> None:
    db = sqlite3.connect(ledger)
    text = db.execute("SELECT entry FROM journal WHERE seq = 2").fetchone()[0]
    db.close()
    _sql(ledger, "UPDATE journal SET entry = ? WHERE seq = 2", text.replace("0.6", "0.7"))
    result = audit_ledger(ledger)
    assert not result.ok and result.first_broken == 2 and "entry 2 was edited" in result.reason


def test_deleted_row_is_found(ledger: Path) -> None:
    _sql(ledger, "DELETE FROM reports WHERE round = 1 AND site = 'b'")
    result = audit_ledger(ledger)
    assert not result.ok and result.first_broken == 2 and "was deleted" in result.reason
    _sql(ledger, "DELETE FROM refusals")
    assert audit_ledger(ledger).first_broken == 2  # the first break is named


def test_deleted_journal_entry_is_found(ledger: Path) -> None:
    _sql(ledger, "DELETE FROM journal WHERE seq = 3")
    result = audit_ledger(ledger)
    assert not result.ok and result.first_broken == 3 and "deleted" in result.reason


def test_reordered_rows_are_found(ledger: Path) -> None:
    _sql(ledger, "UPDATE journal SET seq = 100 WHERE seq = 2")
    _sql(ledger, "UPDATE journal SET seq = 2 WHERE seq = 3")
    _sql(ledger, "UPDATE journal SET seq = 3 WHERE seq = 100")
    result = audit_ledger(ledger)
    assert not result.ok and result.first_broken == 2
    assert "does not follow entry 1" in result.reason


def test_recomputed_chain_is_caught_by_the_sealed_envelopes(
    ledger: Path, keys: tuple[Path, Path]
) -> None:
    """Someone who rewrites a row and recomputes every hash: the envelopes still tell."""
    db = sqlite3.connect(ledger)
    rows = db.execute("SELECT seq, entry, hash FROM journal ORDER BY seq").fetchall()
    prev = GENESIS
    with db:
        for seq, text, old in rows:
            entry = json.loads(text)
            if seq == 1:
                entry["metrics"]["test"]["balanced_accuracy"] = 0.99
                text = json.dumps(entry, sort_keys=True, separators=(",", ":"))
                db.execute("UPDATE reports SET metrics = ? WHERE round = 1 AND site = 'a'",
                           (json.dumps(entry["metrics"], sort_keys=True),))
            new = _entry_hash(prev, text)
            db.execute("UPDATE journal SET entry = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                       (text, prev, new, seq))
            for table in ("reports", "refusals"):
                db.execute(f"UPDATE {table} SET entry_hash = ? WHERE entry_hash = ?", (new, old))
            prev = new
    db.close()
    assert audit_ledger(ledger).ok  # the chain alone cannot tell (see the module docstring)
    result = audit_ledger(ledger, keys[0])
    assert not result.ok and result.first_broken == 1
    assert "differ from what its sealed envelope holds" in result.reason


def test_legacy_ledger_gets_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    _sql(path, "CREATE TABLE reports (run TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT "
               "NULL, phase TEXT NOT NULL, metrics TEXT NOT NULL, time REAL NOT NULL, "
               "PRIMARY KEY (run, round, site))")
    _sql(path, "INSERT INTO reports VALUES ('r0', 1, 'a', 'warmup', '{}', 1.0)")
    result = audit_ledger(path)
    assert not result.ok and result.first_broken is None
    assert "before ledger entries were hash-chained" in result.reason and "move it away" in \
        result.reason
    Ledger(path).record("r1", 1, "a", "warmup", {})  # an old file opened by this version
    assert "1 row(s) were written before" in audit_ledger(path).reason
    assert len(Ledger(path).reports()) == 2  # nothing saved is lost


def test_cli_audit_exit_codes(ledger: Path) -> None:
    cmd = [sys.executable, "-m", "qanafed", "coord", "audit", "--ledger", str(ledger)]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "ledger intact" in ok.stderr
    _sql(ledger, "UPDATE refusals SET reason = 'nothing happened'")
    bad = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    verdict = json.loads(bad.stdout)
    assert verdict["ok"] is False and verdict["first_broken"] == 5
    assert "refusal row (run r1, round 2, site c) was edited" in verdict["reason"]
