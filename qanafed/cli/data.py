"""``qanafed data``: inspect, split and partition dermoscopy datasets."""

from __future__ import annotations

import typer

app = typer.Typer(help="Inspect, split and partition datasets.", no_args_is_help=True)
