"""The coordinator's release key across the kits: make it, rotate it, revoke a key.

The private key ``release.key`` (0600) lives in the coordinator kit only; every site kit holds
the *root* public key ``release.pub`` (the first key, which rotation never replaces there) and
copies of ``release-chain.json`` (rotation links) and ``release-revoked.json`` (revoked key ids).
See :mod:`common.release` for the manifest and the verification.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from common.errors import ConfigError, SecurityError
from common.keyfiles import read_public
from common.log import get_logger
from common.release import (
    CHAIN_FILE,
    REVOKED_FILE,
    generate_release_keypair,
    load_release_private_key,
    load_release_public_key,
    release_key_id,
    release_key_ids,
    revoke_release_key,
    root_public_pem,
    rotate_release_key,
)

__all__ = [
    "RELEASE_KEY",
    "RELEASE_PUB",
    "check_release_pair",
    "ensure_release_key",
    "revoke_in_kits",
    "rotate_in_kits",
    "site_release_files",
]

RELEASE_KEY = "release.key"
RELEASE_PUB = "release.pub"

_log = get_logger("deploy.release_keys")


def ensure_release_key(coord_dir: str | Path) -> tuple[str, str]:
    """Make the coordinator's release key pair in ``coord_dir`` unless it exists.

    Returns
    -------
    tuple[str, str]
        ``(action, key id)`` with action ``created`` or ``reused``.

    Raises
    ------
    SecurityError
        ``release.pub`` is not the public key of ``release.key``, or a key chain is left without
        its key (``release.key`` deleted after a rotation).
    """
    coord = Path(coord_dir)
    private, public = coord / RELEASE_KEY, coord / RELEASE_PUB
    if not private.exists():
        if (coord / CHAIN_FILE).exists():
            raise SecurityError(
                f"{coord / CHAIN_FILE} exists but {private} does not",
                f"restore {private} from a backup; to start a new root key on purpose, also "
                f"delete {coord / CHAIN_FILE} (then re-ship every kit)",
            )
        public.unlink(missing_ok=True)  # a public key without its private key is useless
        return "created", generate_release_keypair(private, public)
    return "reused", check_release_pair(coord)


def check_release_pair(coord_dir: str | Path) -> str:
    """Check ``release.key`` (0600, Ed25519) against ``release.pub``; return the key id.

    Raises
    ------
    SecurityError
        A loose or unreadable private key (``chmod 600 FILE``), or a public key of another key.
    """
    coord = Path(coord_dir)
    private, public = coord / RELEASE_KEY, coord / RELEASE_PUB
    key = load_release_private_key(private)
    if load_release_public_key(public) != key.public_key():
        raise SecurityError(f"{public} is not the public key of {private}",
                            f"delete {public}; re-running `qanafed provision` derives it from "
                            f"{private}")
    return release_key_id(key.public_key())


def site_release_files(coord_dir: str | Path) -> dict[str, bytes]:
    """Return what every site kit holds of the release key: root public key, chain, revocations."""
    coord = Path(coord_dir)
    files = {RELEASE_PUB: root_public_pem(coord)}
    for name in (CHAIN_FILE, REVOKED_FILE):
        if (coord / name).is_file():
            files[name] = read_public(coord / name)
    return files


def _site_kits(kits: Path) -> list[Path]:
    sites = kits / "sites"
    return sorted(p for p in sites.iterdir() if (p / RELEASE_PUB).is_file()) \
        if sites.is_dir() else []


def _copy_to_sites(kits: Path, name: str) -> list[Path]:
    written = []
    for site in _site_kits(kits):
        shutil.copyfile(kits / "coordinator" / name, site / name)
        written.append(site / name)
    return written


def _coordinator(kits: str | Path) -> tuple[Path, Path]:
    kits = Path(kits).expanduser().resolve()
    coord = kits / "coordinator"
    if not (coord / RELEASE_KEY).is_file():
        raise ConfigError(f"{kits} holds no coordinator release key ({coord / RELEASE_KEY})",
                          "pass the KITS folder written by `qanafed provision` (re-run it to "
                          "make the release key of kits provisioned before releases were signed)")
    return kits, coord


def rotate_in_kits(kits: str | Path) -> tuple[str, str, list[Path]]:
    """Rotate the release key of ``KITS/coordinator``; copy the chain into every site kit.

    Returns
    -------
    tuple[str, str, list[Path]]
        Old key id, new key id, and the site files updated. Sites keep trusting the root key;
        re-shipping them the chain is optional (every release embeds it).
    """
    kits, coord = _coordinator(kits)
    old, new = rotate_release_key(coord)
    return old, new, _copy_to_sites(kits, CHAIN_FILE)


def revoke_in_kits(kits: str | Path, key_id: str, reason: str = "") -> list[Path]:
    """Revoke release key ``key_id`` in the coordinator kit and every site kit.

    Raises
    ------
    ConfigError
        ``key_id`` is no key of this federation, or is the key the coordinator signs with now
        (rotate first; a compromised current key needs a new root: see the fix).
    """
    kits, coord = _coordinator(kits)
    current = release_key_id(load_release_private_key(coord / RELEASE_KEY).public_key())
    known = set(release_key_ids(coord))
    if key_id not in known:
        raise ConfigError(f"release key {key_id!r} is no key of {coord} (known: "
                          f"{', '.join(sorted(known))})", "pass one of the known key ids")
    if key_id == current:
        raise ConfigError(
            f"release key {key_id} is the one the coordinator signs with now",
            f"run `qanafed release rotate-key {kits}` first, then revoke it; if that key is "
            f"compromised, delete {coord / RELEASE_KEY}, {coord / RELEASE_PUB} and "
            f"{coord / CHAIN_FILE}, re-run `qanafed provision` (a new root) and re-ship every kit",
        )
    revoke_release_key(coord, key_id, reason)
    _log.info("release key %s revoked in %s", key_id, kits)
    return [coord / REVOKED_FILE, *_copy_to_sites(kits, REVOKED_FILE)]

