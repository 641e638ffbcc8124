"""Kit layout and validation: is a site or coordinator kit complete, private and consistent.

A kit is checked before anything connects (``qanafed site start`` / ``qanafed coord start``) and
right after provisioning. Every problem is refused with a message naming the file and the fix:

* a missing file → :class:`ConfigError` naming it and "re-run qanafed provision";
* a private key group/other can read → :class:`SecurityError` with ``chmod 600 FILE``;
* a server certificate not issued by the kit's CA, or not covering the coordinator address →
  :class:`SecurityError` naming the certificate file and the host;
* ``site.yaml`` / ``coordinator.yaml`` / ``policy.yaml`` with an unknown field →
  :class:`ConfigError` naming the file, the field and the allowed ones;
* a site data path that does not exist → :class:`DataError` naming the path (optional check);
* a key that does not load the way flwr 1.41 loads it, or a public key that does not match its
  private key → :class:`SecurityError`.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel

from common.errors import ConfigError, DataError, SecurityError
from common.keyfiles import read_private, read_public
from common.log import get_logger
from common.policy import POLICY_FILE, load_policy
from deploy.project import (
    CoordinatorConfig,
    RevokedKey,
    SiteConfig,
    format_address,
    load_yaml,
    parse_model,
)

__all__ = [
    "COORDINATOR_YAML",
    "SITE_KEYS_DIR",
    "SITE_YAML",
    "CoordinatorKit",
    "SiteKit",
    "load_supernode_private_key",
    "load_supernode_public_key",
    "ssh_fingerprint",
    "validate_coordinator_kit",
    "validate_site_kit",
]

SITE_YAML = "site.yaml"
COORDINATOR_YAML = "coordinator.yaml"
#: Folder of the coordinator kit holding one ``<site>.pub`` per admitted site.
SITE_KEYS_DIR = "site-keys"
_REPROVISION = "re-run `qanafed provision PROJECT.yaml --out KITS/` and copy the kit again"

M = TypeVar("M", bound=BaseModel)

_log = get_logger("kit")


def ssh_fingerprint(public_line: bytes | str) -> str:
    """Return the ``SHA256:...`` fingerprint of an OpenSSH public key line (``ssh-keygen -l``)."""
    text = public_line.decode() if isinstance(public_line, bytes) else public_line
    parts = text.split()
    if len(parts) < 2:
        raise SecurityError(
            f"{text[:40]!r} is not an OpenSSH public key line",
            "expected 'ecdsa-sha2-nistp384 AAAA...'",
        )
    digest = hashlib.sha256(base64.b64decode(parts[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def load_supernode_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """Load a SuperNode private key exactly as ``flower-supernode`` does, after a 0600 check.

    flwr 1.41 reads ``--auth-supernode-private-key`` with ``load_ssh_private_key`` and requires an
    EC key (OpenSSH format); its own wrapper exits the process on failure, so the same checks are
    made here with a message instead.

    Raises
    ------
    SecurityError
        Missing file, loose permissions (``chmod 600 FILE``), not OpenSSH, or not EC.
    """
    data = read_private(path, how_to_create=_REPROVISION)
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SecurityError(
            f"{path} is not an unencrypted OpenSSH private key as flower-supernode needs ({err})",
            _REPROVISION,
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecurityError(
            f"{path} holds a {type(key).__name__}; flower-supernode needs an EC (P-384) key",
            _REPROVISION,
        )
    return key


def load_supernode_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """Load a SuperNode public key exactly as ``flwr supernode register`` does.

    Raises
    ------
    SecurityError
        Missing file, not an OpenSSH public key line, or not an EC key on a NIST curve.
    """
    data = read_public(path, how_to_create=_REPROVISION)
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise SecurityError(
            f"{path} is not an OpenSSH public key line ({err})", _REPROVISION
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not key.curve.name.startswith("secp"):
        raise SecurityError(
            f"{path} holds a {type(key).__name__}; flwr needs an EC key on a NIST curve",
            _REPROVISION,
        )
    return key


def _public_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def _require(kit: Path, names: list[str], what: str) -> None:
    missing = [name for name in names if not (kit / name).is_file()]
    if missing:
        raise ConfigError(
            f"{what} {kit} is missing {', '.join(missing)}",
            _REPROVISION,
        )


def _config(kit: Path, name: str, model: type[M]) -> M:
    path = kit / name
    return parse_model(model, load_yaml(path), str(path), _REPROVISION)


# ------------------------------------------------------------------------------------ site kit


@dataclass(frozen=True)
class SiteKit:
    """A validated site kit (all paths absolute).

    Attributes
    ----------
    dir : Path
        The kit folder.
    config : SiteConfig
        ``site.yaml``.
    ca_cert, private_key, public_key, metrics_public_key : Path
        The kit files.
    data : Path
        The site's data path (resolved; relative paths are taken from the kit folder).
    fingerprint : str
        ``SHA256:...`` of the SuperNode public key (its identity at the SuperLink).
    policy : Path | None
        The site's ``policy.yaml`` (validated; None in a kit provisioned before policies).
    """

    dir: Path
    config: SiteConfig
    ca_cert: Path
    private_key: Path
    public_key: Path
    metrics_public_key: Path
    data: Path
    fingerprint: str
    policy: Path | None = None

    @property
    def site_id(self) -> str:
        """The site id."""
        return self.config.site

    @property
    def superlink(self) -> str:
        """SuperLink address ``host:port``."""
        return self.config.superlink

    def node_config(self) -> dict[str, str]:
        """Return the node config: site-id, data-path, metrics-public-key, device, out-dir.

        ``out-dir`` (``<kit>/out``) is where the site keeps what never leaves it, such as the
        saliency overlays of its own images. ``policy-file`` (the kit's ``policy.yaml``) is
        added when the kit has one; ``release-public-key`` (the kit's ``release.pub``) too: the
        key the global model must be signed with before the site converts it or learns from it
        on-chip.
        """
        config = {
            "site-id": self.config.site,
            "data-path": str(self.data),
            "metrics-public-key": str(self.metrics_public_key),
            "device": self.config.device,
            "out-dir": str(self.dir / "out"),
        }
        if self.policy is not None:  # checked by the ClientApp before every task
            config["policy-file"] = str(self.policy)
        if (self.dir / "release.pub").is_file():
            config["release-public-key"] = str(self.dir / "release.pub")
        return config


def validate_site_kit(kit_dir: str | Path, *, check_data: bool = True) -> SiteKit:
    """Check a site kit before ``flower-supernode`` is started with it.

    Parameters
    ----------
    kit_dir : str | Path
        The kit folder (``KITS/sites/<site>`` or wherever it was installed).
    check_data : bool (default: True)
        Also check that the data path exists (off where the site's disk is not visible, e.g. on
        the provisioner's machine).

    Returns
    -------
    SiteKit
        The kit, with absolute paths.

    Raises
    ------
    ConfigError
        Missing folder/file, or an invalid ``site.yaml`` (naming the key and the allowed ones).
    SecurityError
        Loose key permissions, a key flwr cannot load, a mismatched key pair, a bad certificate.
    DataError
        The data path does not exist (``check_data``).
    """
    from common.metrics_crypto import load_metrics_public_key
    from deploy.pki import load_certificate

    kit = Path(kit_dir).expanduser().resolve()
    if not kit.is_dir():
        raise ConfigError(f"site kit folder {kit} does not exist", "pass the kit folder to --kit")
    _require(kit, [SITE_YAML], "site kit")
    config = _config(kit, SITE_YAML, SiteConfig)
    files = config.files
    _require(
        kit,
        [files.ca_cert, files.private_key, files.public_key, files.metrics_public_key],
        "site kit",
    )
    ca_cert, private_key = kit / files.ca_cert, kit / files.private_key
    public_key, metrics_public = kit / files.public_key, kit / files.metrics_public_key
    private = load_supernode_private_key(private_key)
    public = load_supernode_public_key(public_key)
    if _public_bytes(private.public_key()) != _public_bytes(public):
        raise SecurityError(
            f"{public_key} is not the public key of {private_key}", _REPROVISION
        )
    load_certificate(ca_cert)
    load_metrics_public_key(metrics_public)
    data = Path(config.data).expanduser()
    data = data if data.is_absolute() else kit / data
    if check_data and not data.exists():
        raise DataError(
            f"data path {str(data)!r} of site {config.site!r} (from {kit / SITE_YAML}) "
            "does not exist",
            f"put the site's data there, or set `data:` in {kit / SITE_YAML} to where it is",
        )
    fingerprint = ssh_fingerprint(read_public(public_key))
    if (kit / "release.pub").exists():  # kits made before signed releases have none
        from common.release import load_release_public_key

        load_release_public_key(kit / "release.pub")
    policy = kit / POLICY_FILE
    if policy.exists():
        load_policy(policy)  # an unknown or bad field is refused here, naming the file
    else:
        _log.warning("site kit %s has no %s: every task will run (%s)", kit, POLICY_FILE,
                     _REPROVISION)
    _log.debug("site kit %s valid (site %s, key %s)", kit, config.site, fingerprint)
    return SiteKit(kit, config, ca_cert, private_key, public_key, metrics_public, data, fingerprint,
                   policy if policy.exists() else None)


# ----------------------------------------------------------------------------- coordinator kit


@dataclass(frozen=True)
class CoordinatorKit:
    """A validated coordinator kit (all paths absolute).

    Attributes
    ----------
    dir : Path
        The kit folder.
    config : CoordinatorConfig
        ``coordinator.yaml``.
    ca_cert, server_cert, server_key, metrics_private_key, metrics_public_key : Path
        The kit files.
    site_keys : dict[str, Path]
        Admitted site id → its SuperNode public key file (``site-keys/<site>.pub``).
    revoked : list[RevokedKey]
        Keys of removed sites, to be refused.
    """

    dir: Path
    config: CoordinatorConfig
    ca_cert: Path
    server_cert: Path
    server_key: Path
    metrics_private_key: Path
    metrics_public_key: Path
    site_keys: dict[str, Path]
    revoked: list[RevokedKey]

    @property
    def superlink_address(self) -> str:
        """``address:port`` the sites connect to (``flower-supernode --superlink``)."""
        return format_address(self.config.address, self.config.port)


def validate_coordinator_kit(kit_dir: str | Path) -> CoordinatorKit:
    """Check a coordinator kit before ``flower-superlink`` is started with it.

    Parameters
    ----------
    kit_dir : str | Path
        The kit folder (``KITS/coordinator`` or wherever it was installed).

    Returns
    -------
    CoordinatorKit
        The kit, with absolute paths.

    Raises
    ------
    ConfigError
        Missing folder/file, or an invalid ``coordinator.yaml``.
    SecurityError
        Loose key permissions, a server certificate not issued by ``ca.crt`` or not covering the
        coordinator address, mismatched key pairs, a site key flwr cannot register, a revoked key
        still among the site keys.
    """
    from common.metrics_crypto import load_metrics_private_key, load_metrics_public_key
    from deploy.pki import load_certificate, load_private_key, verify_chain

    kit = Path(kit_dir).expanduser().resolve()
    if not kit.is_dir():
        raise ConfigError(
            f"coordinator kit folder {kit} does not exist", "pass the kit folder to --kit"
        )
    _require(kit, [COORDINATOR_YAML], "coordinator kit")
    config = _config(kit, COORDINATOR_YAML, CoordinatorConfig)
    files = config.files
    site_files = [entry.public_key for entry in config.sites]
    _require(
        kit,
        [files.ca_cert, files.server_cert, files.server_key, files.metrics_private_key,
         files.metrics_public_key, *site_files],
        "coordinator kit",
    )
    paths = {name: kit / getattr(files, name) for name in type(files).model_fields}
    server_key = load_private_key(paths["server_key"])
    verify_chain(paths["ca_cert"], paths["server_cert"], config.address)
    cert = load_certificate(paths["server_cert"])
    if cert.public_key() != server_key.public_key():
        raise SecurityError(
            f"{paths['server_key']} is not the key of {paths['server_cert']}", _REPROVISION
        )
    metrics_private = load_metrics_private_key(paths["metrics_private_key"])
    if load_metrics_public_key(paths["metrics_public_key"]) != metrics_private.public_key():
        raise SecurityError(
            f"{paths['metrics_public_key']} is not the public key of "
            f"{paths['metrics_private_key']}",
            _REPROVISION,
        )
    revoked = {r.fingerprint: r.site for r in config.revoked}
    site_keys: dict[str, Path] = {}
    for entry in config.sites:
        path = kit / entry.public_key
        load_supernode_public_key(path)
        fingerprint = ssh_fingerprint(read_public(path))
        if fingerprint != entry.fingerprint:
            raise SecurityError(
                f"{path} has fingerprint {fingerprint}, but {kit / COORDINATOR_YAML} lists "
                f"{entry.fingerprint} for site {entry.name!r}",
                _REPROVISION,
            )
        if fingerprint in revoked:
            raise SecurityError(
                f"{path} (site {entry.name!r}) is the revoked key of site "
                f"{revoked[fingerprint]!r} ({fingerprint})",
                f"remove {path} and its entry, or {_REPROVISION}",
            )
        site_keys[entry.name] = path
    listed = {path.name for path in site_keys.values()}
    stray = sorted(p.name for p in (kit / SITE_KEYS_DIR).glob("*.pub") if p.name not in listed)
    if stray:
        raise SecurityError(
            f"{kit / SITE_KEYS_DIR} holds keys of no admitted site: {', '.join(stray)}",
            f"remove them from {kit / SITE_KEYS_DIR}, or {_REPROVISION}",
        )
    if (kit / "release.key").exists():  # checked now, not when a run ends and signs its model
        from deploy.release_keys import check_release_pair

        check_release_pair(kit)
    _log.debug("coordinator kit %s valid (%d sites, %d revoked)", kit, len(site_keys), len(revoked))
    return CoordinatorKit(
        kit, config, paths["ca_cert"], paths["server_cert"], paths["server_key"],
        paths["metrics_private_key"], paths["metrics_public_key"], site_keys, list(config.revoked),
    )
