"""``qanafed provision``: CA, TLS certificate, SuperNode/metrics keys, one kit per participant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qanafed.cli._common import console, print_json

_STYLE = {
    "created": "green",
    "replaced": "yellow",
    "updated": "cyan",
    "reused": "dim",
    "unchanged": "dim",
    "revoked": "bold red",
}


def _short(fingerprint: str | None) -> str:
    if not fingerprint:
        return ""
    return fingerprint if len(fingerprint) <= 20 else fingerprint[:19] + "…"


def provision(
    project: Annotated[Path, typer.Argument(
        help="PROJECT.yaml: the coordinator and the sites (see deploy/example-project.yaml).")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="KITS folder; re-running on it adds/updates/revokes incrementally.")],
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print what was done as JSON on stdout.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Write kits into a non-empty folder that holds no earlier kits.")] = False,
) -> None:
    """Create or update the CA, keys and kits of a federation (no key material is printed)."""
    from common.errors import QanafedError
    from common.outdir import check_out_dir
    from deploy.provision import MANIFEST
    from deploy.provision import provision as run

    try:
        # A KITS folder of earlier kits (it has the manifest) is updated incrementally.
        update = (out / MANIFEST).is_file()
        check_out_dir(out, inputs={"PROJECT": project}, force=force or update)
        result = run(project, out)
    except QanafedError as err:
        console.print(f"[bold red]error:[/] {err.problem}")
        if err.fix:
            console.print(f"[yellow]fix:[/] {err.fix}")
        raise typer.Exit(2) from None
    if as_json:
        print_json(result.to_dict())
        return
    from rich.table import Table

    table = Table(title=f"qanafed provision: project {result.project} → {result.out_dir}")
    for column in ("participant", "item", "action", "fingerprint"):
        table.add_column(column, no_wrap=True)
    for a in result.artifacts:
        style = _STYLE.get(a.action, "")
        table.add_row(a.owner, a.item, f"[{style}]{a.action}[/]" if style else a.action,
                      _short(a.fingerprint))
    console.print(table)
    console.print(f"Full fingerprints: {result.manifest} (or --json).")
    for site in result.revoked:
        console.print(
            f"[bold red]revoked[/] {site}: removed from PROJECT.yaml; its key left "
            "coordinator/site-keys/ and is listed under `revoked` in coordinator.yaml "
            "(its old kit is left in place, but the coordinator refuses it)."
        )
    console.print(
        f"Ship [bold]{result.out_dir}/sites/<site>/[/] to each site, "
        f"[bold]{result.out_dir}/coordinator/[/] to the coordinator. "
        f"Keep [bold]{result.out_dir}/ca/ca.key[/] offline: it is in no kit."
    )
