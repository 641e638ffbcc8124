"""``qanafed site start`` says started only when connected; status names failing connections.

Real kits from ``qanafed provision``, a real TLS + authenticated SuperLink and SuperNodes on
127.0.0.1; every daemon started here is killed with its process tree at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.loopback import Daemons, free_ports, qanafed, write_project, write_site_data

pytestmark = pytest.mark.slow


def _provision(project: Path, kits: Path) -> None:
    res = qanafed("provision", str(project), "--out", str(kits))
    assert res.returncode == 0, res.stderr


def _processes_using(path: Path) -> list[int]:
    """Pids of live processes whose command line names ``path``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(path) in cmd:
                out.append(int(entry.name))
    return out


def test_a_site_with_another_projects_ca_fails_to_start_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    from deploy.process import port_in_use

    # Prepare: two provisionings of the same addresses (two CAs); coordinator of "alpha" up
    data = write_site_data(tmp_path / "data", "synthetic:n=24,size=32,sites=1,seed=0", "a")
    ports = free_ports(2)
    _provision(write_project(tmp_path / "alpha.yaml", data, ports, "alpha"), tmp_path / "alpha")
    _provision(write_project(tmp_path / "beta.yaml", data, ports, "beta"), tmp_path / "beta")
    foreign = tmp_path / "beta" / "sites" / "a"
    with Daemons() as daemons:
        daemons.start("coord", tmp_path / "alpha" / "coordinator")

        # Execute: start beta's site a against alpha's SuperLink
        res = qanafed("site", "start", "--kit", str(foreign), "--isolation", "subprocess",
                      "--connect-timeout", "60")
        status = qanafed("site", "status", "--kit", str(foreign))
        status_json = json.loads(qanafed("site", "status", "--kit", str(foreign),
                                         "--json").stdout)
        leftovers = _processes_using(foreign)

    # Assert: a clear refusal, exit code 2, nothing left running
    err = " ".join(res.stderr.split())
    assert res.returncode == 2, res.stderr
    assert "started" not in res.stderr.replace("did not start", "")
    assert "is not signed by this kit's CA" in err, res.stderr
    assert str(foreign / "ca.crt") in "".join(res.stderr.split())
    assert "CERTIFICATE_VERIFY_FAILED" in err
    assert "use the kit from the same provisioning" in err
    assert leftovers == []
    assert not port_in_use("127.0.0.1", ports[1])
    # status: stopped, and why its last connection failed
    assert status_json["running"] is False
    assert status_json["connection"]["status"] == "failing"
    assert status_json["connection"]["cause"] == "tls"
    out = " ".join(status.stderr.split())
    assert "stopped" in out and "last attempt failing" in out
    assert "not signed by this kit's CA" in out


def test_a_revoked_site_that_was_registered_is_refused_and_status_says_why(
    tmp_path: Path,
) -> None:
    # Prepare: project with sites a and b; b connects once, so its key was registered
    data = write_site_data(tmp_path / "data", "synthetic:n=24,size=32,sites=2,seed=0", "ab")
    ports = free_ports(3)
    kits = tmp_path / "kits"
    _provision(write_project(tmp_path / "p.yaml", data, ports, "rev"), kits)
    coord, site_b = kits / "coordinator", kits / "sites" / "b"
    with Daemons() as daemons:
        daemons.start("coord", coord)
        first = qanafed("site", "start", "--kit", str(site_b), "--isolation", "subprocess")
        stop_b = qanafed("site", "stop", "--kit", str(site_b))
        stop_coord = qanafed("coord", "stop", "--kit", str(coord))
        nodes_before = json.loads((coord / "run" / "nodes.json").read_text())

        # Execute: b removed from the project (revoked), coordinator restarted, b starts again
        _provision(write_project(tmp_path / "p.yaml", {"a": data["a"]}, ports, "rev"), kits)
        daemons.start("coord", coord)
        nodes_after = json.loads((coord / "run" / "nodes.json").read_text())
        second = qanafed("site", "start", "--kit", str(site_b), "--isolation", "subprocess")
        status = json.loads(qanafed("site", "status", "--kit", str(site_b), "--json").stdout)
        status_text = " ".join(qanafed("site", "status", "--kit", str(site_b)).stderr.split())
        coord_log = (coord / "run" / "coordinator.log").read_text(errors="replace")
        qanafed("site", "stop", "--kit", str(site_b))

    # Assert: b was registered and connected before; after revocation its node is unregistered
    assert first.returncode == 0 and "connected as SuperNode" in first.stderr, first.stderr
    assert stop_b.returncode == 0 and stop_coord.returncode == 0
    assert "b" in {n["site"] for n in nodes_before.values()}
    assert "b" not in {n["site"] for n in nodes_after.values()}
    assert "unregistered (revoked)" in coord_log
    # the revoked SuperNode is refused, and start says so instead of "started"
    err = " ".join(second.stderr.split())
    assert "NOT connected" in err and "started" not in err
    assert "refused this site's key" in err and "not registered" in err
    assert status["running"] is True
    assert status["connection"]["status"] == "failing"
    assert status["connection"]["cause"] == "unregistered"
    assert "refused this site's key" in status_text and "qanafed provision" in status_text


def test_a_site_without_a_reachable_superlink_fails_after_the_connect_timeout(
    tmp_path: Path,
) -> None:
    from deploy.process import port_in_use

    # Prepare: a kit whose coordinator is not running
    data = write_site_data(tmp_path / "data", "synthetic:n=24,size=32,sites=1,seed=0", "a")
    ports = free_ports(2)
    _provision(write_project(tmp_path / "p.yaml", data, ports, "nolink"), tmp_path / "kits")
    kit = tmp_path / "kits" / "sites" / "a"

    # Execute
    with Daemons():
        res = qanafed("site", "start", "--kit", str(kit), "--isolation", "subprocess",
                      "--connect-timeout", "8")
        leftovers = _processes_using(kit)

    # Assert: refused after the timeout, naming the address and the way out; stopped again
    err = " ".join(res.stderr.split())
    assert res.returncode == 2, res.stderr
    assert f"was not connected to 127.0.0.1:{ports[0]} within 8 s" in err
    assert "no answer from the SuperLink" in err and "qanafed coord start" in err
    assert "--connect-timeout" in err and "stopped again" in err
    assert leftovers == [] and not port_in_use("127.0.0.1", ports[1])
