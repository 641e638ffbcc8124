"""``qanafed model map`` and ``qanafed model learn``: Akida hardware mapping and on-chip learning."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the edge commands to the ``model`` group."""
