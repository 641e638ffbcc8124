"""``qanafed site start/stop/status``: a site's supervised SuperNode, run from its kit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qanafed.cli._common import console, print_json

app = typer.Typer(help="Run this site's SuperNode from its kit (TLS, authenticated, supervised).",
                  no_args_is_help=True)

Kit = Annotated[Path, typer.Option("--kit", "-k", help="The site kit folder (KITS/sites/NAME).")]


@app.command("start")
def start(
    kit: Kit,
    foreground: Annotated[bool, typer.Option(
        "--foreground", help="Run in this process until stopped (systemd, start.sh).")] = False,
    isolation: Annotated[str | None, typer.Option(
        "--isolation", help="warm (default): one long-lived executor that imported "
        "TensorFlow once runs every message itself, data and model cached (fastest); "
        "warm-fork: it forks itself per message (imports shared, data and model rebuilt); "
        "subprocess: a fresh ClientApp process per message (flwr's default). See "
        "deploy/README.md.")] = None,
    connect_timeout: Annotated[float, typer.Option(
        "--connect-timeout", min=0, help="Seconds to wait for the first connection to the "
        "SuperLink; without one the site is stopped again and start fails (0: do not "
        "wait).")] = 60.0,
) -> None:
    """Check the kit and data, start the SuperNode (restarted on crash), wait until connected."""
    from common.errors import ConfigError
    from deploy.site import DEFAULT_ISOLATION, ISOLATIONS, start_site

    isolation = isolation or DEFAULT_ISOLATION
    if isolation not in ISOLATIONS:
        raise ConfigError(f"--isolation {isolation!r} is not one of {', '.join(ISOLATIONS)}",
                          "use --isolation warm, warm-fork or subprocess")
    info = start_site(kit, foreground=foreground, isolation=isolation,  # type: ignore[arg-type]
                      connect_timeout=connect_timeout)
    if foreground:
        raise typer.Exit(int(info.get("exit-code", 0)))
    connection = info.get("connection")
    where = (f"(pid {info['pid']}) → {info['superlink']}; key {info['fingerprint']}; "
             f"data {info['data']['images']} images; log {info['log']}")
    if connection is None:
        console.print(f"site [bold]{info['site']}[/] launched, connection not awaited {where}")
    elif connection["status"] == "connected":
        console.print(f"site [bold]{info['site']}[/] started and connected as SuperNode "
                      f"{connection['node_id']} {where}")
    else:
        console.print(f"site [bold]{info['site']}[/] is running but [bold red]NOT connected[/]: "
                      f"{connection['reason']} {where}", highlight=False)
        console.print(f"[yellow]fix:[/] {connection['fix']}", highlight=False)


@app.command("stop")
def stop(kit: Kit) -> None:
    """Stop the site's SuperNode (and its supervisor)."""
    from deploy.site import stop_site

    pid = stop_site(kit)
    console.print("not running" if pid is None else f"stopped (pid {pid})")


@app.command("status")
def status(
    kit: Kit,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Show whether the SuperNode runs, its restarts and the last log lines."""
    from deploy.site import site_status

    info = site_status(kit)
    if as_json:
        print_json(info)
        return
    state = "[green]running[/]" if info["running"] else "[red]stopped[/]"
    console.print(f"site [bold]{info['site']}[/]: {state}"
                  + (f" (pid {info['pid']})" if info["pid"] else "")
                  + f" → {info['superlink']}, key {info['fingerprint']}")
    for name, child in info["children"].items():
        console.print(f"  {name}: pid {child['pid']}, restarts {child['restarts']}")
    conn = info["connection"]
    if conn["status"] == "connected":
        console.print(f"  connection: [green]connected[/] (SuperNode {conn['node_id']})")
    elif conn["status"] in ("failing", "connecting"):
        last = "" if info["running"] else "last attempt "
        console.print(f"  connection: {last}[red]{conn['status']}[/]: {conn['reason']}",
                      highlight=False)
        console.print(f"  [yellow]fix:[/] {conn['fix']}", highlight=False)
    data = "" if info["data-exists"] else " [red](missing)[/]"
    console.print(f"  data {info['data']}{data}; log {info['log']}")
    for line in info["log-tail"]:
        console.print("  " + line, style="dim", markup=False)
