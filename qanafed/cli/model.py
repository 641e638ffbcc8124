"""``qanafed model``: list, train, evaluate, map and teach QANA models."""

from __future__ import annotations

import typer

from qanafed.cli import model_edge, model_explain, model_train

app = typer.Typer(help="List, train, evaluate, map and teach QANA models.", no_args_is_help=True)
model_train.register(app)
model_edge.register(app)
model_explain.register(app)


@app.command("list")
def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print the variants as JSON on stdout."),
) -> None:
    """List the registered QANA variants, their Akida target, bits and allowed input sizes."""
    from common.models import list_variants
    from qanafed.cli._common import console, print_json

    variants = list_variants()
    if as_json:
        print_json([v.to_dict() for v in variants])
        return
    from rich.table import Table

    table = Table(title="QANA variants")
    for column in ("name", "target", "akida", "bits w/a/in", "edge learning", "input sizes"):
        table.add_column(column, no_wrap=True)
    for v in variants:
        bits = "float" if v.weight_bits is None else (
            f"{v.weight_bits}/{v.activation_bits}/{v.input_bits}")
        sizes = f"{v.allowed_sizes[0]}–{v.allowed_sizes[-1]} ({len(v.allowed_sizes)})"
        table.add_row(v.name, v.target, v.akida_version or "-", bits,
                      "yes" if v.edge_learning else "no", sizes)
    console.print(table)
    console.print("Details (stage tables, descriptions): qanafed model list --json")
