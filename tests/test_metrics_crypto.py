"""Encrypted metrics reports and the key files behind them."""

from __future__ import annotations

import json
import logging
import os
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import DataError, SecurityError
from common.keyfiles import read_private, read_public, write_private, write_public
from common.metrics_crypto import (
    MAGIC,
    MAX_ENVELOPE_BYTES,
    MalformedReport,
    MisaddressedReport,
    ReplayedReport,
    ReportReceiver,
    TamperedReport,
    encrypt_report,
    generate_metrics_keypair,
    key_id,
    load_metrics_private_key,
    load_metrics_public_key,
    save_metrics_keypair,
)

BINDING = {"run_id": "run-7", "round": 3, "site_id": "rosendahl"}
METRICS = {
    "accuracy": 0.8125,
    "n": 64,
    "per_class_f1": [0.5, 0.75, None],
    "confusion": {"nv": {"nv": 40, "mel": 2}, "mel": {"nv": 5, "mel": 17}},
    "model": "qana-akd1000",
    "converged": True,
}


@pytest.fixture()
def keys():
    return generate_metrics_keypair()


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# ------------------------------------------------------------------------------- round trip


def test_round_trip_returns_the_metrics(keys):
    # Prepare
    private, public = keys
    # Execute
    envelope = encrypt_report(METRICS, public, **BINDING)
    opened = ReportReceiver(private).open(envelope, **BINDING)
    # Assert
    assert opened == METRICS
    assert envelope[:4] == MAGIC and envelope[4] == 1
    assert b"rosendahl" in envelope and b"0.8125" not in envelope  # binding clear, metrics not


def test_numpy_metrics_are_converted(keys):
    private, public = keys
    metrics = {"cm": np.array([[3, 1], [0, 4]]), "acc": np.float32(0.5), "n": np.int64(8)}
    opened = ReportReceiver(private).open(encrypt_report(metrics, public, **BINDING), **BINDING)
    assert opened == {"cm": [[3, 1], [0, 4]], "acc": 0.5, "n": 8}


def test_each_report_is_fresh(keys):
    _, public = keys
    first = encrypt_report(METRICS, public, **BINDING)
    second = encrypt_report(METRICS, public, **BINDING)
    assert first != second  # new ephemeral key, nonce and report id every time


def test_envelope_fits_a_flower_config_record(keys):
    # ConfigRecord values may be bytes (MetricRecord only int/float and their lists).
    from flwr.app import ConfigRecord

    private, public = keys
    envelope = encrypt_report(METRICS, public, **BINDING)
    # Execute: through the record's own wire serialisation
    restored = ConfigRecord.inflate(ConfigRecord({"metrics-envelope": envelope}).deflate())
    # Assert
    assert restored["metrics-envelope"] == envelope
    assert ReportReceiver(private).open(restored["metrics-envelope"], **BINDING) == METRICS


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"acc": float("nan")}, "metrics.acc"),
        ({"cm": [[1.0, float("inf")]]}, "metrics.cm[0][1]"),
        ({"per": {"mel": np.float64("nan")}}, "metrics.per.mel"),
    ],
)
def test_non_finite_metrics_are_refused_by_name(keys, bad, where):
    _, public = keys
    with pytest.raises(DataError, match="NaN and infinities") as err:
        encrypt_report(bad, public, **BINDING)
    assert where in str(err.value)


@pytest.mark.parametrize(
    "bad",
    [{1: 0.5}, {"x": object()}, {"x": b"raw"}],
)
def test_unsupported_metric_values_are_refused(keys, bad):
    _, public = keys
    with pytest.raises(DataError):
        encrypt_report(bad, public, **BINDING)


@pytest.mark.parametrize(
    "binding",
    [
        {**BINDING, "round": -1},
        {**BINDING, "round": True},
        {**BINDING, "run_id": ""},
        {**BINDING, "site_id": "s" * 256},
    ],
)
def test_bad_binding_values_are_refused(keys, binding):
    _, public = keys
    with pytest.raises(DataError):
        encrypt_report(METRICS, public, **binding)


def test_plaintext_metrics_are_never_logged(keys, caplog):
    private, public = keys
    secret = "melanoma-count-31337"
    with caplog.at_level(logging.DEBUG, logger="qanafed"):
        envelope = encrypt_report({"note": secret}, public, **BINDING)
        ReportReceiver(private).open(envelope, **BINDING)
    assert caplog.records  # the module does log (so the check below means something)
    assert secret not in caplog.text


# ---------------------------------------------------------------------------- tampering


def _header_len(binding) -> int:
    return 57 + 1 + len(binding["run_id"]) + 4 + 1 + len(binding["site_id"])


@pytest.mark.parametrize(
    ("index", "error"),
    [
        (0, MalformedReport),  # magic
        (4, MalformedReport),  # version
        (5, TamperedReport),  # recipient key id
        (13, TamperedReport),  # ephemeral public key
        (45, TamperedReport),  # nonce
        (57, TamperedReport),  # run_id length
        (58, TamperedReport),  # run_id
        (57 + 1 + 5 + 3, TamperedReport),  # round (low byte)
        (57 + 1 + 5 + 4, TamperedReport),  # site_id length
        (57 + 1 + 5 + 4 + 1, TamperedReport),  # site_id
        ("ciphertext", TamperedReport),
        (-1, TamperedReport),  # GCM tag
    ],
)
def test_a_flipped_bit_anywhere_is_refused(keys, index, error):
    # Prepare
    private, public = keys
    envelope = encrypt_report(METRICS, public, **BINDING)
    if index == "ciphertext":
        index = _header_len(BINDING) + 5
    tampered = _flip(envelope, index)
    receiver = ReportReceiver(private)
    # Execute / Assert
    with pytest.raises(error):
        receiver.open(tampered, **BINDING)
    assert receiver.open(envelope, **BINDING) == METRICS  # the genuine one still opens


@pytest.mark.parametrize("keep", [0, 3, 20, 57, 70, -16, -1])
def test_truncated_envelope_is_refused(keys, keep):
    private, public = keys
    envelope = encrypt_report(METRICS, public, **BINDING)
    with pytest.raises((MalformedReport, TamperedReport)):
        ReportReceiver(private).open(envelope[:keep], **BINDING)


def test_an_authentic_envelope_over_the_size_cap_is_refused_before_decryption(keys):
    # Prepare: two genuine reports for this receiver, exactly at the cap and one byte over it
    private, public = keys
    overhead = len(encrypt_report({"blob": ""}, public, **BINDING))
    at_cap = encrypt_report({"blob": "x" * (MAX_ENVELOPE_BYTES - overhead)}, public, **BINDING)
    over = encrypt_report({"blob": "x" * (MAX_ENVELOPE_BYTES - overhead + 1)}, public, **BINDING)
    receiver = ReportReceiver(private)

    # Execute
    with pytest.raises(MalformedReport) as err:
        receiver.open(over, **BINDING)
    seen_after_refusal = receiver.seen_ids()
    opened = receiver.open(at_cap, **BINDING)

    # Assert: the size alone refused it (it would authenticate), naming both sizes; at the cap
    # it opens, so the refusal was not a decryption failure
    assert (len(at_cap), len(over)) == (MAX_ENVELOPE_BYTES, MAX_ENVELOPE_BYTES + 1)
    assert f"envelope of {MAX_ENVELOPE_BYTES + 1} bytes exceeds {MAX_ENVELOPE_BYTES}" in str(
        err.value)
    assert not isinstance(err.value, TamperedReport | MisaddressedReport)
    assert seen_after_refusal == frozenset()
    assert len(opened["blob"]) == MAX_ENVELOPE_BYTES - overhead


def test_appended_bytes_are_refused(keys):
    private, public = keys
    envelope = encrypt_report(METRICS, public, **BINDING)
    with pytest.raises(TamperedReport):
        ReportReceiver(private).open(envelope + b"\x00", **BINDING)


@pytest.mark.parametrize(
    "garbage",
    [b"", b"hello world", os.urandom(300), MAGIC + b"\x01" + os.urandom(200), "not bytes"],
)
def test_garbage_is_refused(keys, garbage):
    private, _ = keys
    with pytest.raises((MalformedReport, TamperedReport)):
        ReportReceiver(private).open(garbage, **BINDING)


def test_unknown_version_is_named(keys):
    private, public = keys
    envelope = bytearray(encrypt_report(METRICS, public, **BINDING))
    envelope[4] = 2
    with pytest.raises(MalformedReport, match="version 2"):
        ReportReceiver(private).open(bytes(envelope), **BINDING)


# ------------------------------------------------------------------------------- replays


def test_same_envelope_twice_is_a_replay(keys):
    private, public = keys
    envelope = encrypt_report(METRICS, public, **BINDING)
    receiver = ReportReceiver(private)
    receiver.open(envelope, **BINDING)
    with pytest.raises(ReplayedReport, match="already accepted"):
        receiver.open(envelope, **BINDING)


def test_replay_after_restart_with_restored_seen_set(keys, tmp_path):
    # Prepare: the coordinator accepts a report, persists its seen-set and restarts.
    private, public = keys
    envelope = encrypt_report(METRICS, public, **BINDING)
    before = ReportReceiver(private)
    before.open(envelope, **BINDING)
    ledger = tmp_path / "seen.json"
    ledger.write_text(json.dumps(sorted(before.seen_ids())))
    # Execute
    after = ReportReceiver(private, seen_ids=json.loads(ledger.read_text()))
    forgetful = ReportReceiver(private)
    # Assert
    with pytest.raises(ReplayedReport):
        after.open(envelope, **BINDING)
    assert forgetful.open(envelope, **BINDING) == METRICS  # the seen-set is what stops it
    assert len(before.seen_ids()) == 1


def test_refused_reports_are_not_recorded_as_seen(keys):
    private, public = keys
    envelope = encrypt_report(METRICS, public, **BINDING)
    receiver = ReportReceiver(private)
    with pytest.raises(MisaddressedReport):
        receiver.open(envelope, **{**BINDING, "round": 4})
    assert receiver.seen_ids() == frozenset()
    assert receiver.open(envelope, **BINDING) == METRICS


# --------------------------------------------------------------------------- misaddressed


@pytest.mark.parametrize(
    ("field", "value"),
    [("run_id", "run-8"), ("round", 4), ("site_id", "vienna_dias")],
)
def test_report_for_another_run_round_or_site(keys, field, value):
    private, public = keys
    envelope = encrypt_report(METRICS, public, **BINDING)
    with pytest.raises(MisaddressedReport, match=field):
        ReportReceiver(private).open(envelope, **{**BINDING, field: value})


def test_report_for_another_coordinator_key(keys):
    private, _ = keys
    _, other_public = generate_metrics_keypair()
    envelope = encrypt_report(METRICS, other_public, **BINDING)
    receiver = ReportReceiver(private)
    with pytest.raises(MisaddressedReport) as err:
        receiver.open(envelope, **BINDING)
    assert key_id(other_public) in str(err.value) and receiver.key_id in str(err.value)


def test_key_id_is_a_short_stable_fingerprint(keys):
    private, public = keys
    assert key_id(public) == key_id(private.public_key()) == ReportReceiver(private).key_id
    assert len(key_id(public)) == 16
    assert key_id(public) != key_id(generate_metrics_keypair()[1])


# ------------------------------------------------------------------------------ key files


def test_saved_keypair_modes_and_round_trip(tmp_path):
    # Prepare
    private_path, public_path = tmp_path / "kit" / "metrics.key", tmp_path / "kit" / "metrics.pub"
    # Execute
    public = save_metrics_keypair(private_path, public_path)
    envelope = encrypt_report(METRICS, load_metrics_public_key(public_path), **BINDING)
    opened = ReportReceiver(load_metrics_private_key(private_path)).open(envelope, **BINDING)
    # Assert
    assert _mode(private_path) == 0o600 and _mode(public_path) == 0o644
    assert opened == METRICS
    assert key_id(public) == key_id(load_metrics_public_key(public_path))
    assert sorted(p.name for p in private_path.parent.iterdir()) == ["metrics.key", "metrics.pub"]


def test_save_keypair_refuses_to_overwrite(tmp_path):
    private_path, public_path = tmp_path / "m.key", tmp_path / "m.pub"
    save_metrics_keypair(private_path, public_path)
    original = private_path.read_bytes()
    with pytest.raises(SecurityError, match="refusing to overwrite"):
        save_metrics_keypair(private_path, public_path)
    assert private_path.read_bytes() == original
    save_metrics_keypair(private_path, public_path, overwrite=True)
    assert private_path.read_bytes() != original and _mode(private_path) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_loose_private_key_is_refused(tmp_path, mode):
    private_path = tmp_path / "m.key"
    save_metrics_keypair(private_path, tmp_path / "m.pub")
    os.chmod(private_path, mode)
    with pytest.raises(SecurityError) as err:
        load_metrics_private_key(private_path)
    assert str(private_path) in str(err.value)
    assert f"{mode:04o}" in str(err.value)
    assert f"chmod 600 {private_path}" in str(err.value)


def test_missing_key_files_name_the_file_and_the_fix(tmp_path):
    for loader in (load_metrics_private_key, load_metrics_public_key):
        with pytest.raises(SecurityError, match="does not exist") as err:
            loader(tmp_path / "absent.pem")
        assert str(tmp_path / "absent.pem") in str(err.value)
        assert "qanafed provision" in str(err.value)


def test_garbage_or_wrong_key_type_is_refused_by_name(tmp_path):
    # Prepare: garbage, and a perfectly good EC key that is not X25519.
    garbage = write_private(tmp_path / "garbage.key", b"not a key")
    ec_key = ec.generate_private_key(ec.SECP384R1())
    ec_private = write_private(
        tmp_path / "ec.key",
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    ec_public = write_public(
        tmp_path / "ec.pub",
        ec_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    # Execute / Assert
    for loader, path in [
        (load_metrics_private_key, garbage),
        (load_metrics_private_key, ec_private),
        (load_metrics_public_key, ec_public),
    ]:
        with pytest.raises(SecurityError) as err:
            loader(path)
        assert str(path) in str(err.value)
    with pytest.raises(SecurityError, match="EC secp384r1 key"):
        load_metrics_private_key(ec_private)


def test_write_private_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        path = write_private(tmp_path / "a" / "secret", b"s3cret")
    finally:
        os.umask(old)
    assert _mode(path) == 0o600 and read_private(path) == b"s3cret"


def test_overwrite_replaces_a_loose_file_with_a_0600_one(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    write_private(path, b"new", overwrite=True)
    assert _mode(path) == 0o600 and path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]  # no temp file left behind


def test_write_public_is_0644_and_refuses_overwrite(tmp_path):
    path = write_public(tmp_path / "ca.crt", b"cert")
    assert _mode(path) == 0o644 and read_public(path) == b"cert"
    with pytest.raises(SecurityError, match="refusing to overwrite"):
        write_public(path, b"other")
    assert path.read_bytes() == b"cert"


def test_read_private_refuses_a_directory(tmp_path):
    with pytest.raises(SecurityError, match="not a regular file"):
        read_private(tmp_path)
