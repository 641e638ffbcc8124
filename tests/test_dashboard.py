"""The coordinator dashboard, served for real by uvicorn: a headless Chromium logs in and reads a
finished and an in-progress run (numbers equal to report.json, live update of a running run);
the JSON API refuses missing or wrong tokens (401) and path traversal (404); bad input gives a
clear page, never a traceback.

The finished run is real output of ``make demo`` (``qanafed sim --config simulations/demo.yaml``:
3 synthetic sites, 4 warm-up + calibration + 2 QAT rounds + finalize with on-chip learning;
its report.json and progress.jsonl are in tests/fixtures/dashboard_run). The run in progress is
made from it: a half-written report.json, the checkpoint state after two rounds and the
progress log up to the third round's start.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deploy.dashboard.access import COOKIE, load_token
from deploy.dashboard.app import DashboardConfig, create_app

DATA = Path(__file__).parent / "fixtures" / "dashboard_run"
TOKEN = "test-token-0123456789abcdefghij"
LIVE_ID = "0123456789abcdef" * 2  # the run in progress's run id
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
#: Where to save screenshots of the pages (for docs/): QANAFED_DASHBOARD_SHOTS=docs
SHOTS = os.environ.get("QANAFED_DASHBOARD_SHOTS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Served:
    """A dashboard app served by uvicorn in a thread on a free port of 127.0.0.1."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                   log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        _wait(lambda: self.server.started, what="uvicorn to start")

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
        """GET ``path`` exactly as written (no client-side normalisation of ``..``)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _report() -> dict:
    return json.loads((DATA / "report.json").read_text())


def _checkpoint(run: Path, report: dict, rounds: int) -> None:
    """Write the checkpoint state the driver would have after ``rounds`` rounds."""
    step = f"step-{rounds:05d}"
    phase_seconds: dict[str, float] = {}
    for r in report["rounds"][:rounds]:
        phase_seconds[r["phase"]] = phase_seconds.get(r["phase"], 0.0) + r["seconds"]
    state = {"run-id": LIVE_ID, "scenario": report["scenario"], "step": rounds,
             "rounds": report["rounds"][:rounds], "sites": report["sites"], "seen-ids": [],
             "phase-seconds": phase_seconds}
    (run / "checkpoints" / step).mkdir(parents=True, exist_ok=True)
    (run / "checkpoints" / step / "state.json").write_text(json.dumps(state))
    (run / "checkpoints" / "LATEST").write_text(step)


def _events_until(events: list[str], step: int) -> list[str]:
    """Progress log lines up to and including the start of round ``step``."""
    out = []
    for line in events:
        out.append(line)
        ev = json.loads(line)
        if ev["event"] == "round-start" and ev["step"] == step:
            break
    return out


def _advance(run: Path, report: dict, rounds: int) -> None:
    """Let the run in progress end one more round: new checkpoint, new progress events."""
    events = (DATA / "progress.jsonl").read_text().splitlines()
    _checkpoint(run, report, rounds)
    lines = [e.replace(report["run_id"], LIVE_ID) for e in _events_until(events, rounds + 1)]
    (run / "progress.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A runs folder: a finished run, a run in progress, and things that are not runs."""
    root = tmp_path_factory.mktemp("dashboard")
    runs = root / "runs"
    report = _report()
    finished = runs / "demo"
    finished.mkdir(parents=True)
    for name in ("report.json", "progress.jsonl"):
        shutil.copy(DATA / name, finished / name)
    live = runs / "demo-live"
    live.mkdir()
    text = (DATA / "report.json").read_text()
    (live / "report.json").write_text(text[: len(text) // 3])  # being written
    _advance(live, report, 2)
    (runs / "demo.keys").mkdir()  # where qanafed sim keeps a run's private key: no run
    (runs / "demo.keys" / "metrics.key").write_text("SECRET")
    outside = root / "outside"
    outside.mkdir()
    (outside / "report.json").write_text('{"run_id": "outside", "secret": "OUTSIDE-SECRET"}')
    (runs / "escape").symlink_to(outside, target_is_directory=True)
    return runs


@pytest.fixture(scope="module")
def ledger(runs) -> Path:
    """A real run ledger: every round of the finished run, and one refused report."""
    from deploy.ledger import Ledger

    path = runs.parent / "ledger.sqlite"
    led = Ledger(path)
    report = _report()
    for r in report["rounds"]:
        for site in r["sites"]:
            led.record(report["run_id"], r["step"], site, r["phase"], {"train_loss": 0.5})
    led.refuse(report["run_id"], 2, "site-2", "sealed report refused (replayed)")
    return path


@pytest.fixture(scope="module")
def served(runs, ledger):
    server = Served(create_app(DashboardConfig(runs_dir=runs, token=TOKEN, ledger=ledger,
                                               poll_seconds=0.3)))
    yield server
    server.stop()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ------------------------------------------------------------------------------------ API


def test_api_refuses_missing_or_wrong_token(served):
    for path in ("/api/runs", "/api/runs/demo", "/api/sites", "/api/ledger", "/",
                 "/runs/demo", "/runs/demo/curves.svg", "/sites", "/ledger"):
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                        {"Authorization": f"Basic {TOKEN}"},
                        {"Cookie": f"{COOKIE}={TOKEN}"}):
            status, head, body = served.get(path, headers)
            assert status == 401, (path, headers, status)
            assert head["cache-control"] == "no-store" and b"run_id" not in body


def test_api_lists_runs_by_folder_name_and_mirrors_report(served):
    status, head, body = served.get("/api/runs", AUTH)
    assert status == 200 and head["content-type"].startswith("application/json")
    listed = json.loads(body)
    assert [r["name"] for r in listed["runs"]] == ["demo", "demo-live"]
    report = _report()
    finished = json.loads(served.get("/api/runs/demo", AUTH)[2])
    assert finished["status"] == "complete" and finished["run_id"] == report["run_id"]
    assert finished["final"]["akida"]["balanced_accuracy"] == \
        report["final"]["global"]["akida.balanced_accuracy"]
    # saliency: counts and stability only; the overlay files stay on the sites
    assert "sites/" not in json.dumps(finished["saliency"])
    live = json.loads(served.get("/api/runs/demo-live", AUTH)[2])
    assert live["status"] == "in progress" and live["source"] == "checkpoint"
    assert [r["step"] for r in live["rounds"]] == [1, 2]
    assert live["progress"]["current"]["step"] == 3
    assert any("report.json could not be read" in n for n in live["notices"])
    ledger_runs = listed["ledger_runs"]
    assert ledger_runs[0]["folder"] == "demo" and ledger_runs[0]["refusals"] == 1


@pytest.mark.parametrize("path", [
    "/api/runs/..%2F..%2Fetc%2Fpasswd", "/api/runs/%2e%2e", "/api/runs/..", "/api/runs/escape",
    "/api/runs/demo.keys", "/api/runs/.%2Fdemo", "/runs/..%2F..%2Fetc%2Fpasswd",
    "/runs/escape", "/runs/..%2Foutside/curves.svg", "/static/..%2Fapp.py",
    "/static/../app.py", "/api/runs/demo%2F..%2F..%2Foutside",
])
def test_traversal_is_404_and_reads_nothing_outside(served, path):
    status, head, body = served.get(path, AUTH)
    assert status == 404, (path, status, body[:200])
    assert b"OUTSIDE-SECRET" not in body and b"SECRET" not in body and b"root:" not in body
    assert b"def create_app" not in body and b"Traceback" not in body


def test_security_headers_and_no_remote_sources(served):
    status, head, body = served.get("/runs/demo", AUTH)
    assert status == 200
    csp = head["content-security-policy"]
    assert "default-src 'none'" in csp and "http" not in csp and "unsafe-inline" not in csp
    assert head["cache-control"] == "no-store" and head["x-frame-options"] == "DENY"
    assert head["x-content-type-options"] == "nosniff"
    assert not re.search(rb"(src|href)=\"(https?:)?//", body)  # nothing fetched from afar
    svg = served.get("/runs/demo/curves.svg", AUTH)
    assert svg[0] == 200 and svg[1]["content-type"] == "image/svg+xml" and b"<svg" in svg[2]
    js = served.get("/static/dashboard.js")  # the package's own assets need no token
    assert js[0] == 200 and b"fetch(" in js[2]


def test_bad_input_gives_clear_answers_never_a_traceback(tmp_path, runs):
    # a corrupted ledger, a report that is not JSON at all, a damaged checkpoint pointer
    bad = tmp_path / "ledger.sqlite"
    bad.write_bytes(b"this is not an SQLite database" * 40)
    broken = tmp_path / "runs" / "broken"
    broken.mkdir(parents=True)
    (broken / "report.json").write_bytes(b"\x00\xff{not json")
    (broken / "checkpoints").mkdir()
    (broken / "checkpoints" / "LATEST").write_text("../../outside")
    (broken / "progress.jsonl").write_text('{"event": "start", "total": 5}\n{half a line\n')
    server = Served(create_app(DashboardConfig(runs_dir=tmp_path / "runs", token=TOKEN,
                                               ledger=bad)))
    try:
        for path in ("/ledger", "/sites", "/", "/runs/broken", "/api/ledger", "/api/sites",
                     "/api/runs/broken", "/api/runs"):
            status, _, body = server.get(path, AUTH)
            assert status == 200, (path, status, body[:300])
            assert b"Traceback" not in body
        assert b"could not be read" in server.get("/ledger", AUTH)[2]
        assert "could not be read" in json.loads(server.get("/api/ledger", AUTH)[2])["problem"]
        view = json.loads(server.get("/api/runs/broken", AUTH)[2])
        assert view["status"] == "in progress" and view["notices"]
        # valid JSON of the wrong shape, and no progress log: "report unreadable"
        (broken / "report.json").write_text('{"sites": ["a"], "rounds": "x", "final": 3}')
        (broken / "progress.jsonl").unlink()
        status, head, body = server.get("/runs/broken", AUTH)
        assert status == 200 and b"report unreadable" in body and b"Traceback" not in body
        assert head["cache-control"] == "no-store" and "content-security-policy" in head
        assert server.get("/nowhere", AUTH)[0] == 404
    finally:
        server.stop()


def test_cli_refuses_a_missing_runs_folder_and_serves_with_a_printed_token(tmp_path, runs):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    missing = subprocess.run(
        [sys.executable, "-m", "qanafed", "dashboard", "--runs", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120, env=env)
    said = " ".join(missing.stderr.split())
    assert missing.returncode == 2, said
    assert "nope does not exist" in said and "fix:" in said and "Traceback" not in said

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qanafed", "dashboard", "--runs", str(runs), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines: list[str] = []

        def token() -> str | None:
            assert proc.poll() is None, f"qanafed dashboard exited: {''.join(lines)}"
            lines.append(proc.stderr.readline())
            match = re.search(r"access token \(new.*\): (\S+)", "".join(lines))
            return match.group(1) if match else None

        printed = _wait(token, 120, "the printed token")
        assert "127.0.0.1" in "".join(lines)  # bound to this machine by default

        def answer() -> int | None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/api/runs", headers={"Authorization": f"Bearer {printed}"})
                return conn.getresponse().status
            except OSError:
                return None

        assert _wait(answer, 60, "the dashboard to answer") == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_token_file_must_be_private_and_provisioning_puts_one_in_the_coordinator_kit(tmp_path):
    from common.errors import ConfigError, SecurityError
    from deploy.provision import provision

    loose = tmp_path / "loose.token"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    with pytest.raises(SecurityError):
        load_token(loose)
    with pytest.raises(ConfigError):
        load_token(tmp_path / "absent.token")
    project = Path(__file__).resolve().parents[1] / "deploy" / "example-project.yaml"
    provision(project, tmp_path / "kits")
    token_file = tmp_path / "kits" / "coordinator" / "dashboard.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token, generated = load_token(token_file)
    assert len(token) >= 32 and not generated
    provision(project, tmp_path / "kits")  # re-provisioning keeps the token
    assert load_token(token_file)[0] == token


# -------------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing (.ci/run installs them)")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.implicitly_wait(5)  # find_element waits for what a navigation brings
    yield driver
    driver.quit()


def _cell(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text.split("\n")[0].strip()


def _login(driver, served, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(served.base + "/")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()


def _shot(driver, name: str) -> None:
    if SHOTS:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(max(height + 160, 600), 4000))
        driver.save_screenshot(str(Path(SHOTS) / f"dashboard-{name}.png"))
        driver.set_window_size(1400, 1000)


def test_browser_login_and_finished_run_shows_report_numbers(browser, served):
    from selenium.webdriver.common.by import By

    report = _report()
    browser.delete_all_cookies()
    _login(browser, served, "not-the-token-000000000")
    assert "Wrong token" in browser.find_element(By.ID, "login-error").text
    _login(browser, served, TOKEN)
    _wait(lambda: browser.title.startswith("Runs"), 20, "the runs page")
    rows = browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    assert [r.get_attribute("data-run") for r in rows] == ["demo", "demo-live"]
    cookie = browser.get_cookie(COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != TOKEN
    _shot(browser, "runs")

    browser.find_element(By.LINK_TEXT, "demo").click()
    _wait(lambda: browser.title.startswith("demo "), 20, "the run page")
    assert browser.find_element(By.ID, "run-status").text == "complete"
    assert browser.find_element(By.ID, "run-id").text == report["run_id"]
    rounds = [r for r in report["rounds"] if r["phase"] != "finalize"]
    shown = browser.find_elements(By.CSS_SELECTOR, "#rounds tbody tr")
    assert [int(r.get_attribute("data-step")) for r in shown] == [r["step"] for r in rounds]
    for r in rounds:
        row = f"#rounds tr[data-step='{r['step']}']"
        g = r["global"].get("test.balanced_accuracy")
        assert _cell(browser, f"{row} td[data-site='global']") == ("–" if g is None else
                                                                  f"{g:.3f}")
        for site, m in r["sites"].items():
            want = (m.get("test") or {}).get("balanced_accuracy")
            got = _cell(browser, f"{row} td[data-site='{site}']")
            assert got == ("–" if want is None else f"{want:.3f}"), (r["step"], site)
    final = report["final"]
    assert browser.find_element(By.ID, "server-hash").text == final["server_hash"]
    assert _cell(browser, "#final tr[data-site='global'] td[data-score='akida.balanced_accuracy']"
                 ) == f"{final['global']['akida.balanced_accuracy']:.3f}"
    for site, m in final["sites"].items():
        assert _cell(browser, f"#final tr[data-site='{site}'] "
                     "td[data-score='akida.balanced_accuracy']") == \
            f"{m['akida']['balanced_accuracy']:.3f}"
        edge = m["akida_after_edge"]
        block = edge if "confusion_matrix" in edge else m["akida"]
        cells = browser.find_elements(By.CSS_SELECTOR, f"figure.cm[data-site='{site}'] tbody td")
        assert [int(c.text) for c in cells] == [v for row in block["confusion_matrix"]
                                                for v in row]
    for phase, seconds in report["phase_seconds"].items():
        assert _cell(browser, f"#phases tr[data-phase='{phase}'] td:nth-child(3)") == \
            f"{seconds:.1f}"
    for site in report["saliency"]:
        assert browser.find_elements(By.CSS_SELECTOR, f"#saliency tr[data-site='{site}']")
    assert browser.find_element(By.ID, "curves").get_property("naturalWidth") > 0  # SVG drawn
    assert not browser.find_elements(By.CSS_SELECTOR, "img[src*='saliency'], img[src$='.png']")
    _shot(browser, "run")


def test_browser_run_in_progress_updates_by_itself(browser, served, runs):
    from selenium.webdriver.common.by import By

    report = _report()
    live = runs / "demo-live"
    _advance(live, report, 2)
    browser.get(served.base + "/runs/demo-live")
    if browser.title.startswith("Log in"):  # a fresh browser session
        _login(browser, served, TOKEN)
        _wait(lambda: browser.title.startswith("Runs"), 20, "the runs page")
        browser.get(served.base + "/runs/demo-live")
    assert browser.find_element(By.ID, "run-status").text == "in progress"
    notice = browser.find_element(By.CSS_SELECTOR, ".notice").text
    assert "report.json could not be read" in notice
    assert browser.find_element(By.ID, "no-final")
    assert "round 3" in browser.find_element(By.ID, "progress").text
    for r in report["rounds"][:2]:
        for site, m in r["sites"].items():
            assert _cell(browser, f"#rounds tr[data-step='{r['step']}'] td[data-site='{site}']"
                         ) == f"{m['test']['balanced_accuracy']:.3f}"

    # the run ends its third round: the open page reloads itself and shows it
    _advance(live, report, 3)
    _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#rounds tbody tr")) == 3, 20,
          "the page to show round 3")
    assert "round 4" in browser.find_element(By.ID, "progress").text


def test_browser_sites_and_ledger_pages(browser, served):
    from selenium.webdriver.common.by import By

    browser.get(served.base + "/sites")
    if browser.title.startswith("Log in"):
        _login(browser, served, TOKEN)
        _wait(lambda: browser.title.startswith("Runs"), 20, "the runs page")
        browser.get(served.base + "/sites")
    sites = [r.get_attribute("data-site")
             for r in browser.find_elements(By.CSS_SELECTOR, "#sites tbody tr")]
    assert sites == sorted(_report()["sites"])
    assert _cell(browser, "#sites tr[data-site='site-2'] td[data-col='refusals']") == "1"
    _shot(browser, "sites")
    browser.get(served.base + "/ledger")
    assert "replayed" in browser.find_element(By.ID, "refusals").text
    assert browser.find_element(By.ID, "audit-status").text
    assert browser.find_element(By.LINK_TEXT, "demo")
    _shot(browser, "ledger")
    browser.find_element(By.CSS_SELECTOR, "form.logout button").click()
    _wait(lambda: browser.title.startswith("Log in"), 20, "the login page")
    browser.get(served.base + "/runs/demo")
    assert browser.title.startswith("Log in")  # logged out: the login form again


def test_coord_start_dashboard_serves_the_kit_runs_with_the_kit_token(tmp_path):
    from deploy.coord import coord_paths
    from deploy.loopback import free_ports
    from deploy.provision import provision

    coord_port, dash_port, site_port = free_ports(3)
    project = tmp_path / "project.yaml"
    project.write_text(
        f"name: dash\ncoordinator:\n  address: 127.0.0.1\n  port: {coord_port}\n"
        f"  bind-host: 127.0.0.1\nsites:\n  - name: a\n    data: {tmp_path / 'data'}\n"
        f"    device: cpu\n    runtime-port: {site_port}\n")
    provision(project, tmp_path / "kits")
    kit = tmp_path / "kits" / "coordinator"
    token = load_token(kit / "dashboard.token")[0]

    def status(headers: dict) -> int | None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", dash_port, timeout=5)
            conn.request("GET", "/api/runs", headers=headers)
            return conn.getresponse().status
        except OSError:
            return None

    # the foreground form (systemd, start.sh): one supervisor, SuperLink and dashboard
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qanafed", "coord", "start", "--kit", str(kit), "--foreground",
         "--insecure", "--dashboard", "--dashboard-port", str(dash_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        assert _wait(lambda: status({"Authorization": f"Bearer {token}"}), 90,
                     "the coordinator's dashboard") == 200
        assert status({}) == 401
        assert coord_paths(kit).runs_dir.is_dir()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert status({}) is None  # stopped with the coordinator


# ------------------------------------------------------------------- trust panels (issue 16)


def _one_run(tmp_path: Path, report: dict) -> Path:
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_privacy_panel_shows_epsilon_per_site(tmp_path):
    report = _report()
    sites = sorted(report["sites"])
    report["privacy"] = {"enabled": True, "clip": 1.0, "noise_multiplier": 1.1, "delta": 1e-5,
                         "accountant": "RDP", "sampling_rate": 1.0,
                         "sites": {s: {"rounds": 3, "epsilon": 2.5 + i, "delta": 1e-5}
                                   for i, s in enumerate(sites)}}
    _one_run(tmp_path, report)
    server = Served(create_app(DashboardConfig(runs_dir=tmp_path / "runs", token=TOKEN)))
    try:
        page = server.get("/runs/r", AUTH)[2].decode()
        view = json.loads(server.get("/api/runs/r", AUTH)[2])
    finally:
        server.stop()
    assert view["privacy"]["sites"][sites[1]]["epsilon"] == 3.5
    for i, s in enumerate(sites):
        assert re.search(rf'data-site="{s}">.*?<td class="n">3</td>\s*<td class="n">{2.5 + i:.3g}<',
                         page, re.S), s


def test_release_panel_verifies_the_signed_global_model(tmp_path):
    release = pytest.importorskip("common.release", reason="signed releases not in this version")
    run = _one_run(tmp_path, _report())
    model = run / "global_model.fbz"
    model.write_bytes(os.urandom(2048))  # what is checked is hash and signature, not content
    keys = tmp_path / "runs" / "r.keys"  # where qanafed sim keeps the run's keys
    release.generate_release_keypair(keys / "release.key", keys / "release.pub")
    release.sign_release(model, keys / "release.key", run_id="r", round=5,
                         variant="qana-akd1000")
    server = Served(create_app(DashboardConfig(runs_dir=tmp_path / "runs", token=TOKEN)))
    try:
        ok = json.loads(server.get("/api/runs/r", AUTH)[2])["release"]
        assert ok["verified"] and ok["manifest"]["variant"] == "qana-akd1000"
        assert "signature and model hash verified" in server.get("/runs/r", AUTH)[2].decode()
        model.write_bytes(os.urandom(2048))  # another model under the released name
        bad = json.loads(server.get("/api/runs/r", AUTH)[2])["release"]
        assert not bad["verified"] and "differs from its signed release" in bad["problem"]
        assert "Not a valid release" in server.get("/runs/r", AUTH)[2].decode()
    finally:
        server.stop()


def test_ledger_audit_panel_names_the_first_broken_entry(tmp_path):
    ledger_mod = pytest.importorskip("deploy.ledger")
    if not hasattr(ledger_mod, "audit_ledger"):
        pytest.skip("ledger audit not in this version")
    import sqlite3

    path = tmp_path / "ledger.sqlite"
    led = ledger_mod.Ledger(path)
    for rnd in (1, 2, 3):
        led.record("run-1", rnd, "site-0", "warmup", {"train_loss": 1.0 / rnd})
    (tmp_path / "runs").mkdir()
    server = Served(create_app(DashboardConfig(runs_dir=tmp_path / "runs", token=TOKEN,
                                               ledger=path)))
    try:
        assert json.loads(server.get("/api/ledger", AUTH)[2])["audit"]["ok"] is True
        assert "Intact" in server.get("/ledger", AUTH)[2].decode()
        db = sqlite3.connect(path)
        db.execute("UPDATE reports SET metrics = '{\"train_loss\": 0.01}' WHERE round = 2")
        db.commit()
        db.close()
        audit = json.loads(server.get("/api/ledger", AUTH)[2])["audit"]
        assert audit["ok"] is False and audit["first_broken"] == 2
        assert "Broken at entry 2" in server.get("/ledger", AUTH)[2].decode()
    finally:
        server.stop()


def test_a_training_run_folder_shows_its_test_scores(tmp_path):
    run = tmp_path / "runs" / "m64"
    run.mkdir(parents=True)
    scores = {kind: {"accuracy": 0.5 + i / 10, "balanced_accuracy": 0.4 + i / 10,
                     "macro_f1": 0.3 + i / 10, "num_examples": 120}
              for i, kind in enumerate(("float", "quantized", "akida"))}
    (run / "metrics.json").write_text(json.dumps({"variant": "qana-akd1000", "size": 64,
                                                  "class_names": ["mel", "nv"], **scores}))
    server = Served(create_app(DashboardConfig(runs_dir=tmp_path / "runs", token=TOKEN)))
    try:
        listed = json.loads(server.get("/api/runs", AUTH)[2])["runs"]
        page = server.get("/runs/m64", AUTH)[2].decode()
    finally:
        server.stop()
    assert listed[0]["kind"] == "training"
    assert listed[0]["balanced_accuracy"] == scores["akida"]["balanced_accuracy"]
    for kind, s in scores.items():
        assert re.search(rf'data-model="{kind}">.*?data-score="balanced_accuracy">'
                         rf'{s["balanced_accuracy"]:.3f}<', page, re.S), kind


def test_sites_page_shows_the_policy_a_site_told_at_hello(tmp_path):
    report = _report()
    policy = {"coordinators": ["ab12cd34"], "variants": ["qana-akd1000"], "max-rounds": 10,
              "dp": {"required": True, "max-epsilon": 8.0}, "saliency-overlays": False,
              "never-send": []}
    report["sites"]["site-0"]["policy"] = policy
    _one_run(tmp_path, report)
    server = Served(create_app(DashboardConfig(runs_dir=tmp_path / "runs", token=TOKEN)))
    try:
        page = server.get("/sites", AUTH)[2].decode()
        sites = json.loads(server.get("/api/sites", AUTH)[2])["sites"]
    finally:
        server.stop()
    assert {s["site"]: s["policy"] for s in sites}["site-0"] == policy
    row = re.search(r'<tr data-site="site-0">.*?</tr>', page, re.S).group(0)
    for shown in ("<dt>max-rounds</dt><dd>10</dd>", "<dd>required: yes; max-epsilon: 8.000</dd>",
                  "<dt>saliency-overlays</dt><dd>no</dd>", "<dt>never-send</dt><dd>none</dd>"):
        assert shown in row, shown
