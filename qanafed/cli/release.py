"""``qanafed model verify`` and ``qanafed release``: check a signed model, rotate or revoke keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qanafed.cli._common import console, print_json

app = typer.Typer(help="Rotate or revoke the coordinator's model release key (in KITS/).",
                  no_args_is_help=True)

ReleaseKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--release-key", envvar="QANAFED_RELEASE_KEY",
        help="Trusted release public key (a site kit's release.pub): refuse the model unless "
        "its signed <model>.release.json verifies. Without it a model that has a manifest is "
        "still verified (with its run's key).",
    ),
]
KitsArg = Annotated[Path, typer.Argument(
    help="The KITS folder written by `qanafed provision` (holds coordinator/ and sites/).")]


def verify_command(
    model: Annotated[Path, typer.Option(
        "--model", help="The released model file (e.g. runs/demo/global_model.fbz).",
        show_default=False)],
    key: Annotated[Path | None, typer.Option(
        "--key", help="Trusted release public key (a kit's release.pub); default: the run's "
        "own, RUN.keys/release.pub beside the model's run folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Check a model against its signed <model>.release.json: exit 0 if valid, 2 naming what failed.

    Checks that the manifest is signed by the trusted key (or a key it rotated to), that no key
    involved is revoked (release-revoked.json beside the key), and that the model's SHA-256 is
    the signed one.
    """
    from common.release import default_public_key, verify_release

    key = key if key is not None else default_public_key(model)
    manifest = verify_release(model, key)
    if as_json:
        print_json({"model": str(model), "key": str(key), "valid": True, "manifest": manifest})
        return
    metrics = manifest.get("metrics") or {}
    score = metrics.get("akida.balanced_accuracy", metrics.get("test.balanced_accuracy"))
    console.print(
        f"[bold green]valid release[/]: {model} (sha256 {manifest['model']['sha256'][:16]}…) "
        f"signed by key {manifest['key_id']} (trusted key file {key}); run "
        f"{manifest.get('run_id')}, round {manifest.get('round')}, variant "
        f"{manifest.get('variant')}, classes {manifest.get('classes')}, released "
        f"{manifest.get('created')}" + (f", Akida bal. acc. {score:.3f}" if score else ""),
        highlight=False, soft_wrap=True)


@app.command("rotate-key")
def rotate_key(kits: KitsArg) -> None:
    """Make a new release key, signed by the old one; sites keep trusting their root key.

    The new link goes to coordinator/release-chain.json (copied to every site kit); the old
    private key moves to coordinator/retired/. Re-ship the coordinator kit.
    """
    from deploy.release_keys import rotate_in_kits

    old, new, sites = rotate_in_kits(kits)
    console.print(f"release key rotated: {old} → {new}; chain copied to {len(sites)} site "
                  f"kit(s). Re-ship {kits}/coordinator/ (the site kits need nothing new: every "
                  f"release embeds the chain). Destroy {kits}/coordinator/retired/release-{old}"
                  ".key once no release is signed with it any more.", highlight=False,
                  soft_wrap=True)


@app.command("revoke-key")
def revoke_key(
    kits: KitsArg,
    key_id: Annotated[str, typer.Option("--key-id", help="The release key id to revoke.",
                                        show_default=False)],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")] = "",
) -> None:
    """Revoke a (retired) release key in every kit: models it signed are refused from then on."""
    from deploy.release_keys import revoke_in_kits

    files = revoke_in_kits(kits, key_id, reason)
    console.print(f"release key {key_id} revoked in {len(files)} kit file(s) "
                  f"(release-revoked.json). Re-ship every kit, or copy that file to each site.",
                  highlight=False, soft_wrap=True)


def register(model_app: typer.Typer) -> None:
    """Add ``verify`` to the ``model`` group."""
    model_app.command("verify")(verify_command)
