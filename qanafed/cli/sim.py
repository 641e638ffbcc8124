"""``qanafed sim``: run a scenario on Flower's Simulation Engine with live progress and a report."""

from __future__ import annotations

import json
import logging
import os
import shlex
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from common.log import ensure_log_output, get_logger
from qanafed.cli._common import console

log = get_logger("cli.sim")


def _keys(out: Path, metrics_key: Path | None) -> tuple[Path, Path]:
    """Coordinator metrics key pair: the given private key, the run's own, or a new one.

    The run's own pair lives outside the shareable run folder (``sim_checks.key_paths``).
    """
    from cryptography.hazmat.primitives import serialization

    from common.keyfiles import private_dir, write_public
    from common.metrics_crypto import load_metrics_private_key, save_metrics_keypair
    from qanafed.cli.sim_checks import key_paths

    private, public = key_paths(out)
    private_dir(private.parent)
    if metrics_key is not None:
        pub = load_metrics_private_key(metrics_key).public_key()
        write_public(public, pub.public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo),
                     overwrite=True)
        return metrics_key, public
    if not private.is_file():
        save_metrics_keypair(private, public, overwrite=True)
    return private, public


def _release_key(private_metrics: Path) -> Path:
    """Return the run's release key beside its metrics key (made once); it signs the model.

    ``qanafed model verify --model OUT/global_model.fbz`` finds the public half there.
    """
    from common.release import generate_release_keypair

    private = private_metrics.with_name("release.key")
    if not private.is_file():
        private.with_name("release.pub").unlink(missing_ok=True)
        generate_release_keypair(private, private.with_name("release.pub"))
    return private


def _resume_command(config: Path, out: Path, data: str | None, parallel: int | None,
                    metrics_key: Path | None) -> str:
    """Return the ``qanafed sim ... --resume`` command that continues this run."""
    args = ["qanafed", "sim", "--config", str(config), "--out", str(out)]
    for flag, value in (("--data", data), ("--parallel", parallel),
                        ("--metrics-key", metrics_key)):
        if value is not None:
            args += [flag, str(value)]
    return shlex.join([*args, "--resume"])


def _checkpointed(out: Path) -> str:
    """Name the last complete checkpoint in ``out`` (read from its ``LATEST`` pointer)."""
    from common.checkpoint import LATEST

    pointer = out / "checkpoints" / LATEST
    try:
        return f"the last complete round is kept in {pointer.parent / pointer.read_text().strip()}"
    except OSError:
        return "no round was complete yet"


def _follow(path: Path, stop: threading.Event, total_hint: int, offset: int = 0) -> None:
    """Show the driver's progress events (``progress.jsonl``) as a live rounds x sites table.

    Events before byte ``offset`` (an earlier run's, on resume) are skipped.
    """
    from rich import box
    from rich.console import Group
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text

    from common.progress import read_events

    state: dict = {"total": total_hint, "done": 0, "sites": [], "now": "waiting for sites",
                   "rows": []}

    def render() -> Group:
        table = Table(title="rounds", title_justify="left", expand=False, box=box.SIMPLE_HEAD)
        for name in ("round", "phase", "replies", "dropped", *state["sites"], "global", "s"):
            table.add_column(name, justify="left" if name == "phase" else "right",
                             no_wrap=True, min_width=max(len(name), 9 if name == "phase" else 3))
        for ev in state["rows"]:
            s = ev.get("summary") or {}
            # the same preference as each site's column (server.driver._site_scores)
            ba = next((s[k] for k in ("akida.balanced_accuracy", "test.balanced_accuracy")
                       if isinstance(s.get(k), int | float)), None)
            scores = ev.get("site_scores") or {}
            table.add_row(str(ev["step"]), ev["phase"], str(ev["replies"]), str(ev["dropped"]),
                          *(_fmt(scores.get(site)) for site in state["sites"]), _fmt(ba),
                          f"{ev['seconds']:.0f}")
        status = Text(f"{state['done']}/{state['total']} rounds - {state['now']}", style="cyan")
        return Group(table, status)

    with Live(render(), console=console, refresh_per_second=2, transient=False) as live:
        while not stop.is_set():
            new, offset = read_events(path, offset)
            for ev in new:
                kind = ev.get("event")
                if kind == "start":
                    state.update(total=ev["total"], done=ev["done"])
                elif kind == "sites":
                    state["sites"] = sorted(ev["sites"])
                    state["now"] = f"{len(state['sites'])} site(s) connected"
                elif kind == "round-start":
                    state["now"] = f"round {ev['step']}: {ev['phase']} {ev['index']} running"
                elif kind == "round-end":
                    state["done"] += 1
                    state["rows"].append(ev)
                    state["now"] = f"round {ev['step']} done"
                    log.debug("round %s %s: %s replies, %s dropped, %s s", ev["step"],
                              ev["phase"], ev["replies"], ev["dropped"], ev["seconds"])
            if new:
                live.update(render())
            time.sleep(0.5)
    if not console.is_terminal:
        console.line()  # a redirected console gets the last frame without its line end


def _fmt(value: float | None) -> str:
    """Format a balanced accuracy as 0.123, or a dash when there is none."""
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


def sim(
    config: Annotated[Path, typer.Option(
        "--config", "-c", exists=True, dir_okay=False,
        help="Scenario YAML, e.g. simulations/demo.yaml.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Run folder (report, plots, model, checkpoints).")],
    data: Annotated[str | None, typer.Option(
        "--data", help="Data path or spec replacing the scenario's `data`.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the last complete round in OUT/checkpoints.")] = False,
    parallel: Annotated[int | None, typer.Option(
        "--parallel", min=1,
        help="Sites trained at once (each a TensorFlow process, ~1.3 GB); default: "
        "min(sites, CPU cores).")] = None,
    metrics_key: Annotated[Path | None, typer.Option(
        "--metrics-key", exists=True, dir_okay=False,
        help="Coordinator metrics private key (PEM); default: OUT.keys/metrics.key beside "
        "OUT (not in the shareable run folder), created if missing.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Delete what OUT holds (another run) and start a new run.")] = False,
    allow_no_training: Annotated[bool, typer.Option(
        "--allow-no-training",
        help="Run a scenario with no training rounds (rounds.warmup and rounds.qat 0).")] = False,
    verbose_flower: Annotated[bool, typer.Option(
        "--verbose-flower", help="Flower debug logs.")] = False,
) -> None:
    """Run a federated scenario on the Simulation Engine: one simulated SuperNode per site."""
    from common.fedconfig import load_config
    from qanafed.cli import sim_checks

    cfg = load_config(config, {"data": data} if data else None)
    sim_checks.check_data(cfg, "--data" if data else f"`data` of {config}")
    sim_checks.check_rounds(cfg, config, allow_no_training)
    sim_checks.check_out(out, cfg, {"--config": config, "--data": cfg.data,
                                    "--metrics-key": metrics_key}, resume=resume, force=force)

    from client.client_app import make_client_app
    from qanafed.cli.interrupt import EXIT_INTERRUPTED, two_stage_interrupt
    from server.driver import plan
    from server.plots import write_plots
    from server.rounds import RunInterrupted
    from server.server_app import make_server_app
    from server.simulation import simulate

    if force:
        sim_checks.clear(out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_log_output(out / "run.log", logging.DEBUG)
    private, public = _keys(out, metrics_key)
    if out.resolve() in private.resolve().parents:
        console.print(f"[yellow]warning:[/] the metrics private key {private} is inside the run "
                      f"folder (an earlier qanafed put it there): remove {private.parent} from "
                      f"any copy of {out} you share", highlight=False, soft_wrap=True)
    else:
        console.print(f"metrics private key: {private} (outside the run folder {out}, which "
                      "is safe to share; --resume finds the key there)",
                      highlight=False, soft_wrap=True)
    cfg = cfg.model_copy(update={"metrics_key": str(public.resolve())})
    interrupt = threading.Event()
    resume_cmd = _resume_command(config, out, data, parallel, metrics_key)
    release_key = _release_key(sim_checks.key_paths(out)[0])
    server_app = make_server_app({"scenario-config": cfg, "out-dir": str(out),
                                  "metrics-private-key": str(private), "resume": resume,
                                  "release-private-key": str(release_key),
                                  "stop-event": interrupt})
    # The simulated sites trust the run's release key, as a site trusts its kit's release.pub.
    client_app = make_client_app(node_defaults={
        "release-public-key": str(release_key.with_name("release.pub").resolve())})
    stop = threading.Event()
    events = out / "progress.jsonl"
    follower = threading.Thread(
        target=_follow, daemon=True,
        args=(events, stop, len(plan(cfg)), events.stat().st_size if events.exists() else 0))
    follower.start()
    parallel = parallel or max(1, min(cfg.partition.sites, os.cpu_count() or 1))
    start = time.monotonic()
    try:
        with two_stage_interrupt(
            interrupt,
            "Ctrl-C: stopping the round in progress; the last complete round's checkpoint is "
            "kept (Ctrl-C again to quit at once)",
            lambda: f"Ctrl-C again: quitting now; {_checkpointed(out)}. Continue with:\n"
                    f"  {resume_cmd}",
        ):
            simulate(server_app, client_app, num_sites=cfg.partition.sites, parallel=parallel,
                     verbose=verbose_flower)
    except Exception as err:
        if not interrupt.is_set():
            raise
        stop.set()
        follower.join(timeout=2)
        what = err.problem if isinstance(err, RunInterrupted) else \
            f"run interrupted ({type(err).__name__}: {err}); {_checkpointed(out)}"
        console.print(f"[yellow]{what}[/]. Continue with:\n  {resume_cmd}", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        stop.set()
        follower.join(timeout=2)
    report = json.loads((out / "report.json").read_text())
    plots = write_plots(report, out)
    final = report.get("final") or {}
    console.print(f"[bold green]done[/] in {time.monotonic() - start:.0f} s: "
                  f"{out / 'report.md'}, {len(plots)} plot(s)"
                  + (f", {out / 'global_model.fbz'}" if (out / "global_model.fbz").exists()
                     else ""))
    from common.release import release_path

    if release_path(out / "global_model.fbz").is_file():
        console.print(f"signed release: {release_path(out / 'global_model.fbz')} (check it: "
                      f"qanafed model verify --model {out / 'global_model.fbz'}; public key "
                      f"{release_key.with_name('release.pub')})", highlight=False, soft_wrap=True)
    union = (report.get("global") or {}).get("akida") or {}
    if union.get("balanced_accuracy") is not None:
        ci = union.get("balanced_accuracy_ci") or []
        interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if len(ci) == 2 else ""
        console.print(f"global Akida model, all sites' test images: balanced accuracy "
                      f"{_fmt(union['balanced_accuracy'])}{interval}, macro F1 "
                      f"{_fmt(union.get('macro_f1'))}", highlight=False)
    for site, m in sorted((final.get("sites") or {}).items()):
        a, e = m.get("akida") or {}, m.get("akida_after_edge") or {}
        after = e.get("balanced_accuracy")
        console.print(f"  {site}: hash match {m.get('hash_matches')}, Akida bal. acc. "
                      f"{_fmt(a.get('balanced_accuracy'))}, after on-chip learning "
                      f"{_fmt(after) if after is not None else e.get('error', '-')}",
                      highlight=False)
