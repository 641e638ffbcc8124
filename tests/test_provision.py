"""Provisioning and kit validation: layout, modes, incremental re-runs, revocation, tampered kits,
real TLS handshakes with the issued certificate, SuperNode keys loaded by flwr's own functions."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
import yaml

from common.errors import ConfigError, DataError, SecurityError
from common.metrics_crypto import ReportReceiver, encrypt_report, load_metrics_private_key
from deploy.kit import (
    load_supernode_private_key,
    ssh_fingerprint,
    validate_coordinator_kit,
    validate_site_kit,
)
from deploy.pki import load_certificate
from deploy.project import load_project
from deploy.provision import provision

ADDRESS = "superlink.qanafed.test"


def _project(tmp: Path, sites: list[str], address: str = ADDRESS, **extra) -> Path:
    """Write a PROJECT.yaml whose sites' data folders exist under ``tmp/data``."""
    entries = []
    for i, name in enumerate(sites):
        data = tmp / "data" / name
        data.mkdir(parents=True, exist_ok=True)
        entries.append({"name": name, "data": str(data),
                        "device": ["akd1000", "cpu", "akida2-6n", "akd1500"][i % 4]})
    doc = {"name": "demo", "coordinator": {"address": address, **extra}, "sites": entries}
    path = tmp / f"project-{'-'.join(sites)}-{address}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    """One provisioning of sites a and b; tests that change files copy it first."""
    tmp = tmp_path_factory.mktemp("prov")
    result = provision(_project(tmp, ["a", "b"]), tmp / "KITS")
    return tmp, result


@pytest.fixture()
def copy(kits, tmp_path):
    """A private copy of the provisioned KITS (modes preserved; same data folders)."""
    tmp, _ = kits
    out = tmp_path / "KITS"
    shutil.copytree(tmp / "KITS", out)
    return out


# ------------------------------------------------------------------------------ provisioning


def test_full_provisioning_layout_and_modes(kits):
    # Prepare
    tmp, result = kits
    out = tmp / "KITS"
    coord, site_a = out / "coordinator", out / "sites" / "a"
    # Execute
    manifest = json.loads((out / "manifest.json").read_text())
    site_yaml = yaml.safe_load((site_a / "site.yaml").read_text())
    coord_yaml = yaml.safe_load((coord / "coordinator.yaml").read_text())
    # Assert: files and modes
    for key in [out / "ca/ca.key", coord / "server.key", coord / "metrics.key",
                site_a / "supernode.key", out / "sites/b/supernode.key"]:
        assert _mode(key) == 0o600, key
    for script in [coord / "start.sh", coord / "stop.sh", site_a / "start.sh", site_a / "stop.sh"]:
        assert _mode(script) == 0o755
    for name in ["ca.crt", "supernode.pub", "metrics.pub", "qanafed-site-a.service"]:
        assert _mode(site_a / name) == 0o644
    assert _mode(out / "ca") == 0o700
    # Assert: the CA key is in no kit, under no name
    ca_key = (out / "ca/ca.key").read_bytes()
    for kit in [coord, site_a, out / "sites/b"]:
        assert all(p.read_bytes() != ca_key for p in kit.rglob("*") if p.is_file())
        assert not list(kit.rglob("ca.key"))
    # Assert: contents
    assert (site_a / "ca.crt").read_bytes() == (out / "ca/ca.crt").read_bytes()
    assert (site_a / "metrics.pub").read_bytes() == (coord / "metrics.pub").read_bytes()
    assert (coord / "site-keys/a.pub").read_bytes() == (site_a / "supernode.pub").read_bytes()
    assert site_yaml["site"] == "a" and site_yaml["superlink"] == f"{ADDRESS}:8000"
    assert site_yaml["device"] == "akd1000" and site_yaml["data"] == str(tmp / "data" / "a")
    assert [s["runtime-port"] for s in coord_yaml["sites"]] == [9094, 9095]
    assert coord_yaml["revoked"] == [] and coord_yaml["address"] == ADDRESS
    assert 'qanafed}" site start --kit "$KIT"' in (site_a / "start.sh").read_text()
    unit = (site_a / "qanafed-site-a.service").read_text()
    assert "Restart=on-failure" in unit and "WorkingDirectory=/opt/qanafed/a" in unit
    assert manifest["sites"]["a"]["fingerprint"] == ssh_fingerprint(
        (site_a / "supernode.pub").read_bytes())
    assert manifest["ca"]["fingerprint-sha256"] == result.artifacts[0].fingerprint
    assert set(manifest["server"]["sans"]) == {ADDRESS, "localhost", "127.0.0.1"}
    assert {a.action for a in result.artifacts} == {"created"}


def test_every_kit_validates(kits):
    tmp, _ = kits
    out = tmp / "KITS"
    coord = validate_coordinator_kit(out / "coordinator")
    site = validate_site_kit(out / "sites" / "a")
    assert sorted(coord.site_keys) == ["a", "b"] and coord.revoked == []
    assert coord.superlink_address == f"{ADDRESS}:8000"
    assert site.node_config() == {
        "site-id": "a", "data-path": str(tmp / "data" / "a"),
        "metrics-public-key": str(out / "sites/a/metrics.pub"), "device": "akd1000",
        "out-dir": str(out / "sites/a/out"), "policy-file": str(out / "sites/a/policy.yaml"),
        "release-public-key": str(out / "sites/a/release.pub")}


def test_rerun_unchanged_project_changes_nothing(copy, kits):
    tmp, _ = kits
    before = _snapshot(copy)
    result = provision(_project(tmp, ["a", "b"]), copy)
    assert _snapshot(copy) == before
    assert {a.action for a in result.artifacts} == {"reused", "unchanged"}


def test_rerun_adds_a_site_and_keeps_everything_else_byte_identical(copy, kits):
    # Prepare
    tmp, _ = kits
    before = _snapshot(copy)
    # Execute
    result = provision(_project(tmp, ["a", "b", "c"]), copy)
    after = _snapshot(copy)
    # Assert: only the coordinator's site list and the manifest changed; c was added
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"coordinator/coordinator.yaml", "manifest.json"}
    assert set(after) - set(before) >= {"coordinator/site-keys/c.pub", "sites/c/supernode.key"}
    assert after["coordinator/site-keys/c.pub"] == after["sites/c/supernode.pub"]
    assert result.actions("c") == {"SuperNode key": "created", "site kit": "created"}
    assert result.actions("a") == {"SuperNode key": "reused", "site kit": "unchanged"}
    assert result.actions("ca") == {"CA certificate": "reused"}
    assert result.actions("coordinator")["server certificate"] == "reused"
    assert sorted(validate_coordinator_kit(copy / "coordinator").site_keys) == ["a", "b", "c"]
    assert yaml.safe_load(after["sites/c/site.yaml"])["runtime-port"] == 9096


def test_removed_site_is_revoked_and_cannot_come_back_with_its_old_key(copy, kits):
    # Prepare
    tmp, _ = kits
    old_fp = ssh_fingerprint((copy / "sites/b/supernode.pub").read_bytes())
    # Execute
    result = provision(_project(tmp, ["a"]), copy)
    coord = validate_coordinator_kit(copy / "coordinator")
    # Assert
    assert result.revoked == ["b"] and result.actions("b") == {"SuperNode key": "revoked"}
    assert not (copy / "coordinator/site-keys/b.pub").exists()
    assert (copy / "sites/b/supernode.key").exists()  # its kit is left
    assert [(r.site, r.fingerprint) for r in coord.revoked] == [("b", old_fp)]
    assert sorted(coord.site_keys) == ["a"]
    # Re-adding b while its kit still holds the revoked key is refused ...
    with pytest.raises(ConfigError, match="revoked") as err:
        provision(_project(tmp, ["a", "b"]), copy)
    assert str(copy / "sites/b") in str(err.value)
    # ... and once the old kit is moved away, b gets a new key; the old one stays revoked.
    shutil.move(copy / "sites/b", copy.parent / "old-b")
    again = provision(_project(tmp, ["a", "b"]), copy)
    coord = validate_coordinator_kit(copy / "coordinator")
    assert again.revoked == [] and sorted(coord.site_keys) == ["a", "b"]
    assert ssh_fingerprint((copy / "coordinator/site-keys/b.pub").read_bytes()) != old_fp
    assert [r.fingerprint for r in coord.revoked] == [old_fp]


def test_existing_private_keys_are_never_replaced(copy, kits):
    tmp, _ = kits
    (copy / "coordinator/server.crt").unlink()  # half a pair: refuse rather than reissue
    with pytest.raises(SecurityError, match="server.key exists but .*server.crt does not"):
        provision(_project(tmp, ["a", "b"]), copy)
    assert _mode(copy / "coordinator/server.key") == 0o600


def test_a_new_address_needs_an_explicit_new_certificate(copy, kits):
    tmp, _ = kits
    with pytest.raises(ConfigError, match="10.9.8.7") as err:
        provision(_project(tmp, ["a", "b"], address="10.9.8.7"), copy)
    assert "delete" in err.value.fix and "server.crt" in err.value.fix


def test_kits_of_another_project_are_refused(copy, kits, tmp_path):
    tmp, _ = kits
    other = _project(tmp_path, ["a"])
    other.write_text(other.read_text().replace("name: demo", "name: other"))
    with pytest.raises(ConfigError, match="project 'demo'"):
        provision(other, copy)


# ------------------------------------------------------------------------------ tampered kits


def test_missing_file_is_named(copy):
    (copy / "sites/a/metrics.pub").unlink()
    (copy / "coordinator/site-keys/b.pub").unlink()
    with pytest.raises(ConfigError, match=r"missing metrics\.pub") as err:
        validate_site_kit(copy / "sites/a")
    assert "re-run `qanafed provision" in err.value.fix
    with pytest.raises(ConfigError, match=r"missing site-keys/b\.pub"):
        validate_coordinator_kit(copy / "coordinator")


@pytest.mark.parametrize("key", ["sites/a/supernode.key", "coordinator/server.key",
                                 "coordinator/metrics.key"])
def test_loose_private_key_is_refused_with_chmod(copy, key):
    os.chmod(copy / key, 0o644)
    validate = validate_site_kit if key.startswith("sites") else validate_coordinator_kit
    with pytest.raises(SecurityError) as err:
        validate(copy / Path(key).parent)
    assert err.value.fix == f"chmod 600 {copy / key}"


def test_certificate_for_another_host_is_refused(copy, kits, tmp_path):
    # Prepare: the same CA issues a certificate for another host (another project address).
    tmp, _ = kits
    other = tmp_path / "OTHER"
    shutil.copytree(copy / "ca", other / "ca")
    provision(_project(tmp_path, ["a"], address="other.qanafed.test"), other)
    for name in ("server.crt", "server.key"):
        shutil.copy2(other / "coordinator" / name, copy / "coordinator" / name)
    # Execute / Assert
    with pytest.raises(SecurityError, match=f"does not cover host '{ADDRESS}'") as err:
        validate_coordinator_kit(copy / "coordinator")
    assert str(copy / "coordinator/server.crt") in str(err.value)


def test_certificate_from_another_ca_is_refused(copy, tmp_path):
    other = tmp_path / "OTHER"
    provision(_project(tmp_path, ["a"]), other)  # same address, its own CA
    for name in ("server.crt", "server.key"):
        shutil.copy2(other / "coordinator" / name, copy / "coordinator" / name)
    with pytest.raises(SecurityError, match="not (issued|signed) by") as err:
        validate_coordinator_kit(copy / "coordinator")
    assert str(copy / "coordinator/server.crt") in str(err.value)


def test_site_yaml_with_unknown_field_is_refused(copy):
    path = copy / "sites/a/site.yaml"
    path.write_text(path.read_text() + "colour: blue\n")
    with pytest.raises(ConfigError, match="unknown field 'colour'") as err:
        validate_site_kit(copy / "sites/a")
    assert str(path) in str(err.value) and "allowed: version, project, site, data" in str(err.value)


def test_missing_data_path_is_refused_unless_not_checked(copy, kits):
    path = copy / "sites/a/site.yaml"
    path.write_text(path.read_text().replace(str(kits[0] / "data" / "a"), "/nowhere/a"))
    with pytest.raises(DataError, match="'/nowhere/a'") as err:
        validate_site_kit(copy / "sites/a")
    assert str(path) in err.value.fix
    assert validate_site_kit(copy / "sites/a", check_data=False).data == Path("/nowhere/a")


def test_mismatched_site_key_pair_is_refused(copy):
    shutil.copy2(copy / "sites/b/supernode.pub", copy / "sites/a/supernode.pub")
    with pytest.raises(SecurityError, match="is not the public key of"):
        validate_site_kit(copy / "sites/a")


def test_stray_key_in_site_keys_is_refused(copy):
    shutil.copy2(copy / "coordinator/site-keys/b.pub", copy / "coordinator/site-keys/x.pub")
    with pytest.raises(SecurityError, match="x.pub"):
        validate_coordinator_kit(copy / "coordinator")


# ---------------------------------------------------------------------------- bad PROJECT.yaml


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: demo\ncoordinator:\n  address: [oops\n", r"not valid YAML at line \d+, column"),
        ("name: demo\ncoordinator: {address: h, fleet-port: 9092}\n"
         "sites: [{name: a, data: /d, device: cpu}]\n", "it is now port .*one HTTPS port"),
        ("name: demo\ncoordinator: {address: h}\nsites: [{name: Hospital A, data: /d, "
         "device: cpu}]\n", "'Hospital A' is not a DNS-safe name"),
        ("name: demo\ncoordinator: {address: h}\nsites: [{name: a, data: /d, device: gpu}]\n",
         "received 'gpu'"),
        ("name: demo\ncoordinator: {address: 'https://h:9092'}\n"
         "sites: [{name: a, data: /d, device: cpu}]\n", "neither an IP address nor a DNS"),
        ("name: demo\ncoordinator: {address: h}\nsites: [{name: a, data: /d, device: cpu}, "
         "{name: a, data: /e, device: cpu}]\n", r"unique, got \['a'\]"),
        ("name: demo\ncoordinator: {address: h}\nsites: [{name: a, data: /d, device: cpu, "
         "runtime-port: 8000}]\n", "also the coordinator's port"),
        ("name: demo\ncoordinator: {address: h}\nsites: [{name: a, data: /d, device: cpu, "
         "install-dir: 'opt/my kit'}]\n", "must be an absolute path"),
    ],
)
def test_bad_project_file_is_refused_with_the_value(tmp_path, text, expected):
    path = tmp_path / "project.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_project(path)
    assert str(path) in str(err.value)


def test_example_project_is_valid():
    project = load_project(Path(__file__).parent.parent / "deploy" / "example-project.yaml")
    assert [s.device for s in project.sites] == ["akd1000", "akida2-6n", "cpu"]
    assert project.coordinator.sans() == (["localhost"], ["127.0.0.1"])


# ------------------------------------------------------------------------ keys work for real


def test_tls_handshake_with_provisioned_certificate(kits):
    # Prepare: the SuperLink side serves server.crt/key; a site trusts its kit's ca.crt.
    tmp, _ = kits
    coord, site = tmp / "KITS/coordinator", tmp / "KITS/sites/a"
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(coord / "server.crt", coord / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(n: int) -> None:
        for _ in range(n):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, args=(3,), daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(site / "ca.crt"))
    replies, refused = [], None
    # Execute
    try:
        for name in (ADDRESS, "127.0.0.1"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=name) as tls:
                    replies.append(tls.recv(2))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            try:
                client_ctx.wrap_socket(raw, server_hostname="evil.example.org")
            except ssl.SSLCertVerificationError as err:
                refused = err
    finally:
        thread.join(timeout=10)
        listener.close()
    # Assert
    assert replies == [b"ok", b"ok"]
    assert refused is not None


def test_supernode_keys_load_with_flwr_own_loaders(kits):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_public_key,
        sign_message,
        verify_signature,
    )
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    # Prepare
    tmp, _ = kits
    site, coord = tmp / "KITS/sites/a", tmp / "KITS/coordinator"
    args = argparse.Namespace(auth_supernode_private_key=str(site / "supernode.key"),
                              auth_supernode_public_key=None)
    # Execute
    private_key, derived_public = _try_setup_client_authentication(args)
    registered = bytes_to_public_key(try_load_public_key(coord / "site-keys/a.pub"))
    other = bytes_to_public_key(try_load_public_key(coord / "site-keys/b.pub"))
    signature = sign_message(private_key, b"2026-01-01T00:00:00Z")
    # Assert
    assert private_key.curve.name == "secp384r1"
    assert registered == derived_public
    assert verify_signature(registered, b"2026-01-01T00:00:00Z", signature)
    assert not verify_signature(other, b"2026-01-01T00:00:00Z", signature)
    assert load_supernode_private_key(site / "supernode.key").public_key() == derived_public


def test_site_metrics_key_reaches_the_coordinator(kits):
    tmp, _ = kits
    site = validate_site_kit(tmp / "KITS/sites/a")
    coord = validate_coordinator_kit(tmp / "KITS/coordinator")
    from common.metrics_crypto import load_metrics_public_key

    envelope = encrypt_report({"acc": 0.5}, load_metrics_public_key(site.metrics_public_key),
                              run_id="r1", round=1, site_id="a")
    receiver = ReportReceiver(load_metrics_private_key(coord.metrics_private_key))
    assert receiver.open(envelope, run_id="r1", round=1, site_id="a") == {"acc": 0.5}
    assert load_certificate(site.ca_cert) == load_certificate(coord.ca_cert)


# ---------------------------------------------------------------------------------------- CLI


def test_cli_provision_json_and_bad_input(tmp_path):
    from typer.testing import CliRunner

    from qanafed.cli import app

    # Prepare
    project = _project(tmp_path, ["a", "b"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: demo\ncoordinator: {address: h, colour: red}\nsites: []\n")
    runner = CliRunner()
    # Execute
    ok = runner.invoke(app, ["provision", str(project), "--out", str(tmp_path / "K"), "--json"])
    table = runner.invoke(app, ["provision", str(project), "--out", str(tmp_path / "K")])
    refused = runner.invoke(app, ["provision", str(bad), "--out", str(tmp_path / "K2")])
    # Assert
    assert ok.exit_code == 0, ok.output
    payload = json.loads(ok.stdout)
    assert payload["sites"] == ["a", "b"] and payload["revoked"] == []
    assert table.exit_code == 0 and "reused" in table.output and "unchanged" in table.output
    for output in (ok.output, table.output):
        assert "PRIVATE KEY" not in output and "ecdsa-sha2" not in output
    assert refused.exit_code == 2
    assert "unknown field 'colour'" in refused.output and "fix:" in refused.output
    assert not (tmp_path / "K2").exists()
