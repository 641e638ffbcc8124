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
) -> None:
    """Check the kit and data, then start the SuperNode (restarted on crash)."""
    from common.errors import ConfigError
    from deploy.site import DEFAULT_ISOLATION, ISOLATIONS, start_site

    isolation = isolation or DEFAULT_ISOLATION
    if isolation not in ISOLATIONS:
        raise ConfigError(f"--isolation {isolation!r} is not one of {', '.join(ISOLATIONS)}",
                          "use --isolation warm, warm-fork or subprocess")
    info = start_site(kit, foreground=foreground, isolation=isolation)  # type: ignore[arg-type]
    if foreground:
        raise typer.Exit(int(info.get("exit-code", 0)))
    console.print(f"site [bold]{info['site']}[/] started (pid {info['pid']}) → "
                  f"{info['superlink']}; key {info['fingerprint']}; log {info['log']}")


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
    data = "" if info["data-exists"] else " [red](missing)[/]"
    console.print(f"  data {info['data']}{data}; log {info['log']}")
    for line in info["log-tail"]:
        console.print("  " + line, style="dim", markup=False)
