"""Signed model releases on real Ed25519 keys and files: sign, verify, tamper, rotate, revoke."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import SecurityError
from common.model_meta import model_meta, write_meta
from common.release import (
    generate_release_keypair,
    release_path,
    revoke_release_key,
    root_public_pem,
    rotate_release_key,
    sign_release,
    verify_release,
)


@pytest.fixture
def released(tmp_path: Path) -> dict[str, Path]:
    """A coordinator key folder, a site kit trusting its key, and a signed model with metadata."""
    coord, site = tmp_path / "coordinator", tmp_path / "site"
    generate_release_keypair(coord / "release.key", coord / "release.pub")
    site.mkdir()
    (site / "release.pub").write_bytes(root_public_pem(coord))
    model = tmp_path / "run" / "global_model.fbz"
    model.parent.mkdir()
    model.write_bytes(bytes(range(256)) * 64)
    write_meta(model, model_meta(variant="qana-akd1000", size=32, class_names=["a", "b"],
                                 colour="shades-of-gray"))
    sign_release(model, coord / "release.key", run_id="run-1", round=7,
                 metrics={"balanced_accuracy": 0.61, "undefined": float("nan")})
    return {"coord": coord, "site": site, "model": model, "pub": site / "release.pub"}


def test_valid_release_returns_the_signed_manifest(released: dict[str, Path]) -> None:
    manifest = verify_release(released["model"], released["pub"])
    assert manifest["run_id"] == "run-1" and manifest["round"] == 7
    assert manifest["variant"] == "qana-akd1000" and manifest["classes"] == ["a", "b"]
    assert manifest["preprocessing"]["colour_constancy"] == "shades-of-gray"
    assert manifest["metrics"] == {"balanced_accuracy": 0.61, "undefined": None}
    assert len(manifest["model"]["sha256"]) == 64 and manifest["key_id"]


def test_model_one_byte_different_is_refused(released: dict[str, Path]) -> None:
    model = released["model"]
    data = bytearray(model.read_bytes())
    data[100] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(SecurityError, match="differs from its signed release") as err:
        verify_release(model, released["pub"])
    assert str(model) in err.value.problem and "copy it again" in err.value.fix
    assert release_path(model).is_file()  # nothing saved is deleted


def test_tampered_manifest_is_refused(released: dict[str, Path]) -> None:
    path = release_path(released["model"])
    doc = json.loads(path.read_text())
    doc["manifest"]["round"] = 8
    path.write_text(json.dumps(doc))
    with pytest.raises(SecurityError, match="altered after it was signed") as err:
        verify_release(released["model"], released["pub"])
    assert str(path) in err.value.problem


def test_manifest_resigned_by_another_key_is_unknown(released: dict[str, Path],
                                                     tmp_path: Path) -> None:
    generate_release_keypair(tmp_path / "evil" / "release.key", tmp_path / "evil" / "release.pub")
    sign_release(released["model"], tmp_path / "evil" / "release.key", run_id="run-1")
    with pytest.raises(SecurityError, match="not the trusted key"):
        verify_release(released["model"], released["pub"])


def test_wrong_public_key_is_refused(released: dict[str, Path], tmp_path: Path) -> None:
    generate_release_keypair(tmp_path / "other" / "release.key", tmp_path / "other" / "release.pub")
    with pytest.raises(SecurityError, match="not the trusted key") as err:
        verify_release(released["model"], tmp_path / "other" / "release.pub")
    assert "--key" in err.value.fix


def test_missing_manifest_is_refused(released: dict[str, Path]) -> None:
    release_path(released["model"]).unlink()
    with pytest.raises(SecurityError, match="no signed release manifest") as err:
        verify_release(released["model"], released["pub"])
    assert "never run an unsigned model" in err.value.fix


def test_rotated_key_is_followed_from_the_root(released: dict[str, Path]) -> None:
    old_id, new_id = rotate_release_key(released["coord"])
    assert old_id != new_id
    assert (released["coord"] / "retired" / f"release-{old_id}.key").stat().st_mode & 0o077 == 0
    assert root_public_pem(released["coord"]) == released["pub"].read_bytes()
    sign_release(released["model"], released["coord"] / "release.key", run_id="run-2")
    manifest = verify_release(released["model"], released["pub"])  # site still trusts the root
    assert manifest["key_id"] == new_id and manifest["run_id"] == "run-2"
    old_id2, newer = rotate_release_key(released["coord"])  # a chain of two links
    assert old_id2 == new_id
    sign_release(released["model"], released["coord"] / "release.key", run_id="run-3")
    assert verify_release(released["model"], released["pub"])["key_id"] == newer


def test_forged_rotation_link_is_refused(released: dict[str, Path]) -> None:
    rotate_release_key(released["coord"])
    sign_release(released["model"], released["coord"] / "release.key", run_id="run-2")
    path = release_path(released["model"])
    doc = json.loads(path.read_text())
    doc["key_chain"][0]["created"] = "2000-01-01T00:00:00Z"
    path.write_text(json.dumps(doc))
    with pytest.raises(SecurityError, match="key chain tampered"):
        verify_release(released["model"], released["pub"])


def test_revoked_keys_are_refused(released: dict[str, Path]) -> None:
    old_id, new_id = rotate_release_key(released["coord"])
    sign_release(released["model"], released["coord"] / "release.key", run_id="run-2")
    revoke_release_key(released["site"], new_id, "lost laptop")
    with pytest.raises(SecurityError, match="revoked") as err:
        verify_release(released["model"], released["pub"])
    assert str(released["site"] / "release-revoked.json") in err.value.problem
    revoke_release_key(released["site"], old_id)  # the trusted root itself
    with pytest.raises(SecurityError, match=f"release key {old_id}, which is revoked"):
        verify_release(released["model"], released["pub"])


def test_cli_verify_exit_codes(released: dict[str, Path]) -> None:
    cmd = [sys.executable, "-m", "qanafed", "model", "verify", "--model", str(released["model"]),
           "--key", str(released["pub"])]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "run-1" in ok.stdout + ok.stderr
    data = bytearray(released["model"].read_bytes())
    data[0] ^= 0xFF
    released["model"].write_bytes(bytes(data))
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "differs from its signed release" in bad.stderr


def test_cli_verify_finds_the_run_key(released: dict[str, Path]) -> None:
    keys = released["model"].parent.with_name("run.keys")
    keys.mkdir()
    shutil.copy(released["pub"], keys / "release.pub")
    cmd = [sys.executable, "-m", "qanafed", "model", "verify", "--model", str(released["model"]),
           "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["manifest"]["round"] == 7


def test_provisioned_kits_rotate_and_revoke(tmp_path: Path) -> None:
    """The coordinator kit signs, every site kit verifies; rotation and revocation via the CLI."""
    import stat

    import yaml

    from deploy.provision import provision

    sites = []
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        sites.append({"name": name, "data": str(tmp_path / "data" / name), "device": "cpu"})
    project = tmp_path / "project.yaml"
    project.write_text(yaml.safe_dump({"name": "demo", "coordinator": {"address": "localhost"},
                                       "sites": sites}))
    kits = tmp_path / "kits"
    result = provision(project, kits)
    coord = kits / "coordinator"
    assert result.actions("coordinator")["release key"] == "created"
    assert stat.S_IMODE((coord / "release.key").stat().st_mode) == 0o600
    for name in ("a", "b"):
        assert not (kits / "sites" / name / "release.key").exists()
        assert (kits / "sites" / name / "release.pub").read_bytes() == \
            (coord / "release.pub").read_bytes()
    before = {p: p.read_bytes() for p in kits.rglob("*") if p.is_file()}
    assert provision(project, kits).actions("coordinator")["release key"] == "reused"
    assert before == {p: p.read_bytes() for p in kits.rglob("*") if p.is_file()}

    model = tmp_path / "published" / "global_model.fbz"
    model.parent.mkdir()
    model.write_bytes(b"\x01" * 4096)
    sign_release(model, coord / "release.key", run_id="r1", round=3)
    site_pub = kits / "sites" / "a" / "release.pub"
    first = verify_release(model, site_pub)["key_id"]
    old_copy = tmp_path / "old-release.json"
    shutil.copy(release_path(model), old_copy)

    cli = [sys.executable, "-m", "qanafed", "release"]
    rotated = subprocess.run([*cli, "rotate-key", str(kits)], capture_output=True, text=True,
                             timeout=120)
    assert rotated.returncode == 0, rotated.stderr
    assert (kits / "sites" / "b" / "release-chain.json").is_file()
    assert site_pub.read_bytes() == before[site_pub]  # sites keep trusting the root key
    sign_release(model, coord / "release.key", run_id="r2", round=3)
    assert verify_release(model, site_pub)["key_id"] != first

    current = subprocess.run([*cli, "revoke-key", str(kits), "--key-id",
                              verify_release(model, site_pub)["key_id"]],
                             capture_output=True, text=True, timeout=120)
    assert current.returncode == 2 and "rotate-key" in current.stderr
    shutil.copy(old_copy, release_path(model))  # a release by the root key, to be revoked
    revoked = subprocess.run([*cli, "revoke-key", str(kits), "--key-id", first, "--reason",
                              "drill"], capture_output=True, text=True, timeout=120)
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(SecurityError, match="revoked"):
        verify_release(model, site_pub)
    assert provision(project, kits).actions("coordinator")["release key"] == "reused"
    assert (kits / "sites" / "a" / "release-revoked.json").is_file()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "qanafed", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_site_refuses_to_learn_from_a_tampered_or_unsigned_model(
    released: dict[str, Path], tmp_path: Path
) -> None:
    """``model learn`` (on-chip learning at a site) refuses before it loads anything."""
    model, pub, out = released["model"], released["pub"], tmp_path / "learned"
    learn = ("model", "learn", "--model", str(model), "--data", "synthetic:n=40,size=32",
             "--shots", "1", "--out", str(out))
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    tampered = _cli(*learn, "--release-key", str(pub))
    assert tampered.returncode == 2 and "differs from its signed release" in tampered.stderr
    assert not out.exists()
    no_key = _cli(*learn)  # a manifest beside it, but no trusted key anywhere
    assert no_key.returncode == 2 and "no release public key given" in no_key.stderr
    release_path(model).unlink()
    unsigned = _cli(*learn, env={"QANAFED_RELEASE_KEY": str(pub)})  # a site's key, no manifest
    assert unsigned.returncode == 2 and "no signed release manifest" in unsigned.stderr
    evaluate = _cli("model", "evaluate", "--model", str(model), "--data", "synthetic:n=40",
                    "--release-key", str(pub))
    assert evaluate.returncode == 2 and "no signed release manifest" in evaluate.stderr
    assert not out.exists() and model.is_file()  # nothing saved is lost


def test_coordinator_kit_with_a_loose_release_key_is_refused_at_start(tmp_path: Path) -> None:
    """A run must not fail at its very end, when it signs: the kit check finds the key first."""
    import yaml

    from deploy.kit import validate_coordinator_kit, validate_site_kit
    from deploy.provision import provision

    (tmp_path / "data").mkdir()
    project = tmp_path / "project.yaml"
    project.write_text(yaml.safe_dump({"name": "demo", "coordinator": {"address": "localhost"},
                                       "sites": [{"name": "a", "data": str(tmp_path / "data"),
                                                  "device": "cpu"}]}))
    kits = tmp_path / "kits"
    provision(project, kits)
    (kits / "coordinator" / "release.key").chmod(0o644)
    with pytest.raises(SecurityError, match="mode 0644") as err:
        validate_coordinator_kit(kits / "coordinator")
    assert "chmod 600" in err.value.fix
    (kits / "coordinator" / "release.key").chmod(0o600)
    (kits / "sites" / "a" / "release.pub").write_text("not a key\n")
    with pytest.raises(SecurityError, match="not a PEM public key"):
        validate_site_kit(kits / "sites" / "a", check_data=False)
