"""Site/coordinator daemons without a federation: refusals, supervision, the run ledger."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

from common.errors import ConfigError, DataError, SecurityError
from deploy.loopback import free_ports

#: Coordinator, site a and site b ports of the provisioned project: free when the module starts.
PORTS = tuple(free_ports(3))
COORD_PORT, PORT_A, PORT_B = PORTS


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deploy.loopback import write_site_data
    from deploy.provision import provision

    root = tmp_path_factory.mktemp("deploy")
    write_site_data(root / "data", "synthetic:n=24,size=32,sites=2,seed=0", "ab")
    project = root / "project.yaml"
    project.write_text(
        f"name: unit\ncoordinator:\n  address: 127.0.0.1\n  port: {COORD_PORT}\n"
        "  bind-host: 127.0.0.1\nsites:\n"
        f"  - name: a\n    data: {root / 'data' / 'a'}\n    device: cpu\n"
        f"    runtime-port: {PORT_A}\n"
        f"  - name: b\n    data: {root / 'data' / 'b'}\n    device: cpu\n"
        f"    runtime-port: {PORT_B}\n"
    )
    provision(project, root / "kits")
    return root / "kits"


def _copy_kit(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _listen(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


# ------------------------------------------------------------------------------ bad input


def test_site_runtime_port_in_use_is_refused_naming_port_and_file(kits: Path) -> None:
    from deploy.site import start_site

    with _listen(PORT_A):
        with pytest.raises(ConfigError) as err:
            start_site(kits / "sites" / "a")
    assert f"port {PORT_A}" in err.value.problem and "site.yaml" in err.value.problem


def test_coordinator_port_in_use_is_refused(kits: Path) -> None:
    from deploy.coord import start_coordinator

    with _listen(COORD_PORT):
        with pytest.raises(ConfigError) as err:
            start_coordinator(kits / "coordinator")
    assert f"port {COORD_PORT}" in err.value.problem and "coordinator.yaml" in err.value.problem


def test_a_second_start_of_a_running_site_or_coordinator_is_refused(kits: Path) -> None:
    from deploy.coord import coord_paths, start_coordinator
    from deploy.site import site_paths, start_site

    for start, paths, kit, stop in (
        (start_site, site_paths, kits / "sites" / "a", "qanafed site stop"),
        (start_coordinator, coord_paths, kits / "coordinator", "qanafed coord stop"),
    ):
        pid_file = paths(kit).pid_file
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")  # a live process holds the pid file
        try:
            with pytest.raises(ConfigError) as err:
                start(kit)
        finally:
            pid_file.unlink()
        assert f"pid {os.getpid()}" in err.value.problem
        assert "already running" in err.value.problem and stop in err.value.fix


def test_missing_data_path_is_refused(kits: Path, tmp_path: Path) -> None:
    from deploy.site import start_site

    kit = _copy_kit(kits / "sites" / "a", tmp_path / "a")
    cfg = yaml.safe_load((kit / "site.yaml").read_text())
    cfg["data"] = str(tmp_path / "nowhere")
    (kit / "site.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(DataError) as err:
        start_site(kit)
    assert "nowhere" in err.value.problem and "site.yaml" in err.value.fix


def test_empty_data_folder_is_refused_before_anything_starts(kits: Path, tmp_path: Path) -> None:
    from deploy.process import port_in_use
    from deploy.site import site_paths, start_site

    # Prepare: site a's kit pointing at an empty folder
    kit = _copy_kit(kits / "sites" / "a", tmp_path / "a")
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = yaml.safe_load((kit / "site.yaml").read_text())
    cfg["data"] = str(empty)
    (kit / "site.yaml").write_text(yaml.safe_dump(cfg))

    # Execute
    with pytest.raises(DataError) as err:
        start_site(kit, connect_timeout=5)

    # Assert: the path, the kit file and the inspect command are named; nothing was started
    assert str(empty) in err.value.problem and "site.yaml" in err.value.problem
    assert f"qanafed data inspect {empty}" in err.value.fix
    paths = site_paths(kit)
    assert not paths.pid_file.exists() and not paths.log_file.exists()
    assert not port_in_use("127.0.0.1", PORT_A)


def test_loose_key_and_unknown_field_and_missing_file_are_refused(
    kits: Path, tmp_path: Path
) -> None:
    from deploy.site import start_site

    loose = _copy_kit(kits / "sites" / "a", tmp_path / "loose")
    os.chmod(loose / "supernode.key", 0o644)
    with pytest.raises(SecurityError) as err:
        start_site(loose)
    assert "chmod 600" in err.value.fix

    unknown = _copy_kit(kits / "sites" / "a", tmp_path / "unknown")
    with open(unknown / "site.yaml", "a") as fh:
        fh.write("colour: blue\n")
    with pytest.raises(ConfigError) as err:
        start_site(unknown)
    assert "colour" in err.value.problem

    missing = _copy_kit(kits / "sites" / "a", tmp_path / "missing")
    (missing / "ca.crt").unlink()
    with pytest.raises(ConfigError) as err:
        start_site(missing)
    assert "ca.crt" in err.value.problem


def test_cli_refuses_with_exit_code_2_and_a_fix(kits: Path) -> None:
    import subprocess

    res = subprocess.run([sys.executable, "-m", "qanafed", "site", "start", "--kit",
                          str(kits / "sites" / "a"), "--isolation", "threads"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "threads" in res.stderr and "fix:" in res.stderr


def test_supernode_command_uses_tls_auth_node_config_and_runtime_port(kits: Path) -> None:
    from deploy.kit import validate_site_kit
    from deploy.site import supernode_argv

    kit = validate_site_kit(kits / "sites" / "b")
    argv = supernode_argv(kit, "subprocess")
    assert argv[argv.index("--root-certificates") + 1] == str(kit.ca_cert)
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(kit.private_key)
    assert argv[argv.index("--port") + 1] == str(PORT_B)
    assert 'site-id="b"' in argv[argv.index("--node-config") + 1]
    assert "--insecure" not in argv


def test_status_of_a_stopped_site(kits: Path) -> None:
    from deploy.site import site_status

    info = site_status(kits / "sites" / "a")
    assert info["running"] is False and info["site"] == "a" and info["data-exists"]


# ------------------------------------------------------------------------------ supervision


def test_supervisor_restarts_with_backoff_then_gives_up(tmp_path: Path) -> None:
    from deploy.process import Child, RestartPolicy, Supervisor

    crash = Child("crash", [sys.executable, "-c", "raise SystemExit(3)"])
    sup = Supervisor("t", [crash], tmp_path, "t",
                     RestartPolicy(max_restarts=3, window=60, backoff=0.1, max_backoff=0.4))
    start = time.monotonic()
    code = sup.run(poll=0.05)
    assert code == 1
    assert len(crash.restarts) == 3
    assert time.monotonic() - start >= 0.1 + 0.2 + 0.4  # backoff doubled, capped
    assert not (tmp_path / "t.pid").exists()


def test_background_daemon_stops_by_pid_with_its_children(tmp_path: Path) -> None:
    from deploy.process import pid_alive, read_pid, read_state, spawn_background, stop_pid

    script = tmp_path / "daemon.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nfrom deploy.process import Child, Supervisor\n"
        "Supervisor('d', [Child('sleeper', [sys.executable, '-c', 'import time; "
        "time.sleep(60)'])], Path(sys.argv[1]), 'd').run(poll=0.1)\n"
    )
    pid_file = tmp_path / "d.pid"
    pid = spawn_background([sys.executable, str(script), str(tmp_path)], tmp_path / "d.log",
                           pid_file)
    try:
        assert read_pid(pid_file) == pid
        for _ in range(50):
            child = (read_state(tmp_path / "d.state.json").get("children") or {}).get("sleeper")
            if child and child["pid"]:
                break
            time.sleep(0.1)
        assert stop_pid(pid_file, timeout=10) == pid
        assert not pid_alive(pid) and not pid_alive(child["pid"])
        assert read_pid(pid_file) is None
    finally:
        if pid_alive(pid):
            os.killpg(pid, 9)


# ------------------------------------------------------------------------------ run ledger


def test_ledger_records_opened_reports_and_refuses_tampered_and_replayed(
    kits: Path, tmp_path: Path
) -> None:
    from common.metrics_crypto import encrypt_report, load_metrics_private_key
    from deploy.ledger import Ledger, LedgerReceiver
    from server.driver import Receiver

    # Prepare: site b's report is well addressed; one flipped ciphertext byte is its only defect
    private = load_metrics_private_key(kits / "coordinator" / "metrics.key")
    receiver = LedgerReceiver(Receiver(private), tmp_path / "ledger.sqlite", {1: "warmup"})
    good = encrypt_report({"test.accuracy": 0.5}, private.public_key(), run_id="r1", round=1,
                          site_id="a")
    from_b = encrypt_report({"test.accuracy": 0.25}, private.public_key(), run_id="r1", round=1,
                            site_id="b")
    tampered = bytearray(from_b)
    tampered[-5] ^= 0xFF

    # Execute
    opened = receiver.open(good, "r1", 1, "a")
    replayed = receiver.open(good, "r1", 1, "a")
    forged = receiver.open(bytes(tampered), "r1", 1, "b")
    untouched = receiver.open(from_b, "r1", 1, "b")

    # Assert
    assert opened == {"test.accuracy": 0.5} and untouched == {"test.accuracy": 0.25}
    assert replayed is None and forged is None
    ledger = Ledger(tmp_path / "ledger.sqlite")
    reports = ledger.reports("r1")
    assert [(r["round"], r["site"], r["phase"], r["metrics"]) for r in reports] == [
        (1, "a", "warmup", {"test.accuracy": 0.5}), (1, "b", "warmup", {"test.accuracy": 0.25})]
    refusals = ledger.refusals("r1")
    assert [r["site"] for r in refusals] == ["a", "b"]
    assert refusals[0]["reason"].startswith("ReplayedReport: ")
    assert refusals[1]["reason"].startswith("TamperedReport: ")
    assert "failed authentication" in refusals[1]["reason"]
    summary = ledger.summary()
    assert summary[0]["refusals"] == 2 and summary[0]["last-round"] == 1
    assert "refused" in (tmp_path / "serverapp.log").read_text()
