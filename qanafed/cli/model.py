"""``qanafed model``: list, train, evaluate, map and teach QANA models."""

from __future__ import annotations

import typer

from qanafed.cli import model_edge

app = typer.Typer(help="List, train, evaluate, map and teach QANA models.", no_args_is_help=True)
model_edge.register(app)
