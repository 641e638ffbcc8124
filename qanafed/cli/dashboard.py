"""``qanafed dashboard``: serve the read-only coordinator dashboard (runs, sites, ledger)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from qanafed.cli._common import console


def dashboard(
    runs: Annotated[Path, typer.Option(
        "--runs", help="Folder of run folders (e.g. runs/, or <coordinator kit>/run/runs).")],
    ledger: Annotated[Path | None, typer.Option(
        "--ledger", help="The coordinator's run ledger (<kit>/run/ledger.sqlite).")] = None,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="File holding the access token (the coordinator kit's "
        "dashboard.token, 0600); default: a new token, printed once.")] = None,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port.")] = 8800,
) -> None:
    """Serve the coordinator dashboard: runs, rounds × sites, Akida results, sites, ledger."""
    from deploy.dashboard.access import load_token
    from deploy.dashboard.app import DashboardConfig, check_runs_dir, serve

    runs_dir = check_runs_dir(runs)
    token, generated = load_token(token_file)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] the dashboard listens on {host}, beyond this machine, "
                      "without TLS: reach it through an SSH tunnel or a TLS reverse proxy instead")
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    console.print(f"dashboard of {runs_dir} on {url}"
                  + (f" (ledger {ledger})" if ledger else ""), highlight=False, soft_wrap=True)
    if generated:
        # The one place a secret is shown: the operator needs it to log in.
        console.print(f"access token (new, for this start only): [bold]{token}[/]",
                      highlight=False, soft_wrap=True)
    # The release key a coordinator verifies global models with (as `model verify` reads it).
    release_key = os.environ.get("QANAFED_RELEASE_KEY") or None
    serve(DashboardConfig(runs_dir=runs_dir, token=token, ledger=ledger,
                          release_key=Path(release_key) if release_key else None),
          host=host, port=port)
