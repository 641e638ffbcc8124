"""The ``qanafed`` command line: one Typer app with a group per concern."""

from __future__ import annotations

import logging

import typer

from qanafed import __version__
from qanafed.cli import coord, dashboard, data, model, model_study, provision, release, sim, site

app = typer.Typer(
    name="qanafed",
    help="Federated QANA skin-lesion training with on-site Akida conversion.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(data.app, name="data")
model_study.register(model.app)
release.register(model.app)
app.add_typer(model.app, name="model")
app.add_typer(site.app, name="site")
app.add_typer(coord.app, name="coord")
app.add_typer(release.app, name="release")
app.command("sim")(sim.sim)
app.command("provision")(provision.provision)
app.command("dashboard")(dashboard.dashboard)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qanafed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Federated QANA skin-lesion training with on-site Akida conversion."""
    from common.log import get_logger
    from qanafed.cli._common import setup_logging
    from qanafed.cli.quiet import filter_native_stderr

    setup_logging(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        native = get_logger("native")
        filter_native_stderr(lambda line: native.debug("%s", line))


def main() -> None:
    """Run the CLI, turning qanafed errors into one clear message and exit code 2."""
    from common.errors import QanafedError

    try:
        app()
    except QanafedError as err:
        from qanafed.cli._common import console

        console.print(f"[bold red]error:[/] {err.problem}")
        if err.fix:
            console.print(f"[yellow]fix:[/] {err.fix}")
        raise SystemExit(2) from None
