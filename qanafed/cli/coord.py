"""``qanafed coord start/stop/run/status/audit``: the SuperLink, sites, runs, the ledger."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from qanafed.cli._common import console, print_json

app = typer.Typer(help="Run the coordinator's SuperLink, launch federated runs, read the ledger.",
                  no_args_is_help=True)

Kit = Annotated[Path, typer.Option("--kit", "-k", help="The coordinator kit (KITS/coordinator).")]


@app.command("start")
def start(
    kit: Kit,
    foreground: Annotated[bool, typer.Option(
        "--foreground", help="Run in this process until stopped (systemd, start.sh).")] = False,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="No TLS (testing only; SuperNode authentication stays on).")] = False,
    dashboard: Annotated[bool, typer.Option(
        "--dashboard", help="Also serve the dashboard on 127.0.0.1 (token: the kit's "
        "dashboard.token).")] = False,
    dashboard_port: Annotated[int, typer.Option(
        "--dashboard-port", min=1, max=65535, help="The dashboard's port.")] = 8800,
) -> None:
    """Check the kit, start the SuperLink (TLS, SuperNode auth, state DB), register site keys."""
    from deploy.coord import start_coordinator

    info = start_coordinator(kit, foreground=foreground, insecure=insecure, dashboard=dashboard,
                             dashboard_port=dashboard_port)
    if foreground:
        raise typer.Exit(int(info.get("exit-code", 0)))
    tls = "[red]WITHOUT TLS[/]" if insecure else "TLS"
    console.print(f"coordinator [bold]{info['project']}[/] started (pid {info['pid']}) on "
                  f"{info['address']} ({tls}); sites {', '.join(info['sites']) or '-'}"
                  + (f"; revoked {', '.join(info['revoked'])}" if info["revoked"] else "")
                  + f"; log {info['log']}")
    if "dashboard" in info:
        console.print(f"dashboard on {info['dashboard']} (token in {info['dashboard-token']})",
                      highlight=False, soft_wrap=True)


@app.command("stop")
def stop(kit: Kit) -> None:
    """Stop the SuperLink (and its supervisor)."""
    from deploy.coord import stop_coordinator

    pid = stop_coordinator(kit)
    console.print("not running" if pid is None else f"stopped (pid {pid})")


def _follow(progress: Path, offset: int, done: list[bool]) -> int:
    """Print the driver's new progress events; return the new offset."""
    from common.progress import read_events

    new, offset = read_events(progress, offset)
    for ev in new:
        kind = ev.get("event")
        if kind == "start":
            console.log(f"run {ev['run_id']}: {ev['total']} rounds, {ev['done']} done before")
        elif kind == "sites":
            console.log(f"sites: {', '.join(ev['sites'])}")
        elif kind == "round-end":
            console.log(f"round {ev['step']} {ev['phase']}: {ev['replies']} replies, "
                        f"{ev['dropped']} dropped, {ev['seconds']} s")
        elif kind == "done":
            done.append(True)
    return offset


@app.command("run")
def run(
    kit: Kit,
    config: Annotated[Path, typer.Option(
        "--config", "-c", exists=True, dir_okay=False, help="Scenario YAML.")],
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the last complete round.")] = False,
    stop_after: Annotated[int, typer.Option(
        "--stop-after", min=0, help="Stop after this many complete rounds (drills).")] = 0,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Run folder (default KIT/run/runs/<scenario name>).")] = None,
    detach: Annotated[bool, typer.Option(
        "--detach", help="Submit and return without following the run.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
) -> None:
    """Launch the scenario on the Deployment Engine and follow it to the end."""
    from deploy.coord import launch_run, run_status

    info = launch_run(kit, config, resume=resume, stop_after=stop_after, out_dir=out)
    console.print(f"run {info['run-id']} submitted; out {info['out-dir']}")
    if detach:
        if as_json:
            print_json(info)
        return
    progress = Path(info["out-dir"]) / "progress.jsonl"
    offset = progress.stat().st_size if progress.exists() else 0
    done: list[bool] = []
    status = "running"
    while True:
        offset = _follow(progress, offset, done)
        status = run_status(kit, info["run-id"])
        if status.startswith("finished"):
            _follow(progress, offset, done)
            break
        time.sleep(2.0)
    info["status"] = status
    if as_json:
        print_json(info)
    else:
        console.print(f"run {info['run-id']}: {status}")
    if status != "finished:completed":
        raise typer.Exit(1)


@app.command("status")
def status(
    kit: Kit,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Show the SuperLink, the admitted sites and a summary of the run ledger."""
    from deploy.coord import coord_status

    info = coord_status(kit)
    if as_json:
        print_json(info)
        return
    state = "[green]running[/]" if info["running"] else "[red]stopped[/]"
    console.print(f"coordinator [bold]{info['project']}[/] on {info['address']}: {state}"
                  + (f" (pid {info['pid']})" if info["pid"] else ""))
    console.print(f"  sites: {', '.join(info['sites']) or '-'}"
                  + (f"; revoked: {', '.join(info['revoked'])}" if info["revoked"] else ""))
    from rich.table import Table

    table = Table(title=f"run ledger {info['ledger']}")
    for column in ("run", "rounds", "last round", "sites", "refusals"):
        table.add_column(column)
    for r in info["runs"]:
        table.add_row(r["run"][:12], str(len(r["rounds"])), str(r["last-round"]),
                      ", ".join(r["sites"]), str(r["refusals"]))
    console.print(table)


@app.command("audit")
def audit(
    ledger: Annotated[Path | None, typer.Option(
        "--ledger", help="The ledger file; default: the kit's run/ledger.sqlite.")] = None,
    kit: Annotated[Path | None, typer.Option(
        "--kit", "-k", help="The coordinator kit (its ledger, and its metrics.key to re-open "
        "every stored envelope).")] = None,
    metrics_key: Annotated[Path | None, typer.Option(
        "--metrics-key", help="Coordinator metrics.key: re-open each stored envelope and "
        "compare its metrics (default with --kit: the kit's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Verify the run ledger's hash chain and stored envelopes; exit 1 naming the first break."""
    from dataclasses import asdict

    from common.errors import ConfigError
    from deploy.ledger import audit_ledger

    if ledger is None:
        if kit is None:
            raise ConfigError("no ledger to audit", "pass --ledger FILE or --kit KIT")
        ledger = kit / "run" / "ledger.sqlite"
    if metrics_key is None and kit is not None and (kit / "metrics.key").is_file():
        metrics_key = kit / "metrics.key"
    result = audit_ledger(ledger, metrics_key)
    if as_json:
        print_json(asdict(result))
    elif result.ok:
        console.print(f"[bold green]ledger intact[/]: {result.reason}; last entry hash "
                      f"{result.head}", highlight=False, soft_wrap=True)
    else:
        where = f"entry {result.first_broken}: " if result.first_broken else ""
        console.print(f"[bold red]ledger NOT intact[/] ({where}{result.entries} entries read): "
                      f"{result.reason}", highlight=False, soft_wrap=True)
    if not result.ok:
        raise typer.Exit(1)
