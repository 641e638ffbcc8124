"""The CLI keeps native TensorFlow/CUDA/absl lines off the console and in the run log."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from qanafed.cli.quiet import is_native_noise

NOISE = [
    "E0000 00:00:1796691730.219020   20336 cuda_blas.cc:1407] Unable to register cuBLAS factory",
    "W0000 00:00:1796691730.258931   20336 computation_placer.cc:177] computation placer already",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "2026-12-08 01:03:05.100562: E external/local_xla/xla/stream_executor/cuda/cuda_platform.cc"
    ":51] failed call to cuInit: INTERNAL: CUDA error",
    "\x1b[36m(pid=21642)\x1b[0m W0000 00:00:1796691763.553952   21642 computation_placer.cc:177] x",
    "(ClientAppActor pid=21643) 2026-12-08 01:03:08.070417: E external/x/cuda_platform.cc:51] y",
]
KEPT = [
    "[12/08/26 01:02:31] INFO     simulation: 3 sites, 2 in parallel",
    "error: --out folder runs/demo is not empty",
    "Traceback (most recent call last):",
    "(pid=1) a site's own message",
    "E0000 is not a log record without its file:line] part",
]


def test_noise_patterns_match_native_lines_only():
    assert all(is_native_noise(line) for line in NOISE)
    assert not any(is_native_noise(line) for line in KEPT)


def test_filter_drops_native_lines_of_a_real_tensorflow_import_and_keeps_the_rest(tmp_path):
    # A child process: the filter on, TensorFlow imported (its C++ start-up lines go to fd 2),
    # then one native noise line and one ordinary line written straight to fd 2, and one
    # line through Python's sys.stderr; dropped lines go to a sink file.
    sink = tmp_path / "native.log"
    script = textwrap.dedent(f"""
        import os, sys
        from qanafed.cli.quiet import filter_native_stderr
        out = open({str(sink)!r}, "w")
        filter_native_stderr(lambda line: (out.write(line + "\\n"), out.flush()))
        import tensorflow as tf
        tf.constant(1.0) + 1.0
        os.write(2, b"E0000 00:00:12.5 77 fake_plugin.cc:9] a native start-up line\\n")
        os.write(2, b"a child process's own line\\n")
        print("python stderr line", file=sys.stderr)
    """)
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "0"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert not [line for line in lines if is_native_noise(line)], res.stderr
    assert "a child process's own line" in lines
    assert "python stderr line" in lines
    assert "fake_plugin.cc:9] a native start-up line" in sink.read_text()


def test_sim_console_shows_a_live_rounds_by_sites_table(tmp_path, monkeypatch):
    # The driver's progress events, as `qanafed sim` follows them, become one table row per
    # round with each site's balanced accuracy and the global one.
    import io
    import threading
    import time

    from rich.console import Console

    from common.progress import append_event
    from qanafed.cli import sim as sim_cli

    recorded = Console(file=io.StringIO(), width=120, record=True, force_terminal=True)
    monkeypatch.setattr(sim_cli, "console", recorded)
    path = tmp_path / "progress.jsonl"
    path.touch()
    stop = threading.Event()
    follower = threading.Thread(target=sim_cli._follow, args=(path, stop, 2), daemon=True)
    follower.start()
    append_event(path, event="start", total=2, done=0)
    append_event(path, event="sites", sites=["site-1", "site-0"])
    append_event(path, event="round-end", step=1, phase="warmup", seconds=12.3, replies=2,
                 dropped=0, summary={"test.balanced_accuracy": 0.4567},
                 site_scores={"site-0": 0.5123, "site-1": 0.4012})
    append_event(path, event="round-end", step=2, phase="qat", seconds=8.0, replies=1,
                 dropped=1, summary={}, site_scores={"site-0": 0.6})
    deadline = time.monotonic() + 20
    while "2/2 rounds" not in recorded.export_text(clear=False):
        assert time.monotonic() < deadline, recorded.export_text(clear=False)
        time.sleep(0.2)
    stop.set()
    follower.join(timeout=5)
    text = recorded.export_text()
    text = text[text.rindex("phase"):]  # from the header of the live table's last frame
    rows = [line.replace("│", " ") for line in text.splitlines()
            if "warmup" in line or " qat " in line]
    assert "site-0" in text and "site-1" in text
    assert rows[-2].split()[:6] == ["1", "warmup", "2", "0", "0.512", "0.401"]
    assert "0.457" in rows[-2]
    assert rows[-1].split()[:6] == ["2", "qat", "1", "1", "0.600", "-"]


def test_cli_logging_shows_info_once_and_debug_only_in_the_run_log(tmp_path):
    # A library's module-level logging.info() must not give the root logger a console handler
    # that echoes the run log's debug records (it did once quantizeml had calibrated).
    script = textwrap.dedent(f"""
        import logging
        from common.log import ensure_log_output, get_logger
        from qanafed.cli._common import setup_logging
        setup_logging(logging.INFO)
        ensure_log_output({str(tmp_path / "run.log")!r}, logging.DEBUG)
        logging.info("a library's own line")
        get_logger("t").debug("detail for the run log")
        get_logger("t").info("progress for the console")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    console = res.stdout + res.stderr
    assert console.count("progress for the console") == 1, console
    assert "detail for the run log" not in console
    assert "detail for the run log" in (tmp_path / "run.log").read_text()
