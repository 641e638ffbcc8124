"""Provisioning: from PROJECT.yaml to a CA, TLS and SuperNode keys, and one kit per participant.

Layout written under ``KITS/`` (``out_dir``)::

    manifest.json               fingerprints of everything below (no key material)
    ca/ca.key                   the CA key (0600): the provisioner's secret, never in a kit
    ca/ca.crt
    coordinator/                ca.crt, server.crt, server.key (0600), metrics.key (0600),
                                metrics.pub, release.key (0600), release.pub,
                                site-keys/<site>.pub, coordinator.yaml,
                                dashboard.token (0600), start.sh, stop.sh,
                                qanafed-coordinator.service
    sites/<site>/               ca.crt, supernode.key (0600), supernode.pub, metrics.pub,
                                release.pub (the root release key; see deploy.release_keys),
                                site.yaml, start.sh, stop.sh, qanafed-site-<site>.service

Re-running is incremental: the CA, the server certificate, the metrics key pair and every
existing site key are reused (an existing private key is never overwritten); a new site gets a
kit and its public key in the coordinator kit; a site no longer in PROJECT.yaml keeps its kit but
its key leaves ``site-keys/`` and is listed under ``revoked`` in ``coordinator.yaml``. Config
files and scripts are rewritten only when their content changes, so an unchanged project leaves
every file byte-identical.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.errors import ConfigError, SecurityError
from common.keyfiles import read_private, read_public, write_private, write_public
from common.log import get_logger
from common.metrics_crypto import (
    key_id,
    load_metrics_private_key,
    load_metrics_public_key,
    save_metrics_keypair,
)
from common.policy import POLICY_FILE, default_policy
from common.release import release_key_ids
from deploy import pki
from deploy.dashboard.access import TOKEN_FILE as DASHBOARD_TOKEN
from deploy.dashboard.access import make_token_file
from deploy.kit import (
    COORDINATOR_YAML,
    SITE_KEYS_DIR,
    SITE_YAML,
    load_supernode_private_key,
    ssh_fingerprint,
    validate_coordinator_kit,
    validate_site_kit,
)
from deploy.project import (
    DEFAULT_SITE_RUNTIME_PORT,
    CoordinatorConfig,
    Project,
    RevokedKey,
    SiteConfig,
    SiteEntry,
    format_address,
    load_project,
)
from deploy.release_keys import ensure_release_key, site_release_files

__all__ = ["MANIFEST", "Artifact", "ProvisionResult", "provision"]

MANIFEST = "manifest.json"
_CA_DIR, _COORD_DIR, _SITES_DIR = "ca", "coordinator", "sites"
_SCRIPT_MODE = 0o755
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")

_log = get_logger("provision")


@dataclass(frozen=True)
class Artifact:
    """One thing provisioning created, reused, updated or revoked.

    Attributes
    ----------
    owner : str
        ``ca``, the coordinator's name, or a site id.
    item : str
        What it is (``CA certificate``, ``SuperNode key``, ``site kit`` ...).
    action : str
        ``created``, ``reused``, ``updated``, ``unchanged``, ``replaced`` (a lost key made anew)
        or ``revoked``.
    path : Path
        The file or folder.
    fingerprint : str | None (default: None)
        Certificate SHA-256, SSH key ``SHA256:...`` or metrics key id; never key material.
    """

    owner: str
    item: str
    action: str
    path: Path
    fingerprint: str | None = None


@dataclass
class ProvisionResult:
    """What :func:`provision` did.

    Attributes
    ----------
    project : str
        Project name.
    out_dir : Path
        The KITS folder.
    manifest : Path
        ``manifest.json``.
    sites : list[str]
        Admitted sites, in PROJECT.yaml order.
    revoked : list[str]
        Sites revoked by this run (removed from PROJECT.yaml since the last run).
    artifacts : list[Artifact]
        Every item, with its action.
    """

    project: str
    out_dir: Path
    manifest: Path
    sites: list[str]
    revoked: list[str]
    artifacts: list[Artifact] = field(default_factory=list)

    def actions(self, owner: str) -> dict[str, str]:
        """Return ``item -> action`` for one owner (``ca``, the coordinator or a site)."""
        return {a.item: a.action for a in self.artifacts if a.owner == owner}

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (paths as strings)."""
        return {
            "project": self.project,
            "out-dir": str(self.out_dir),
            "manifest": str(self.manifest),
            "sites": self.sites,
            "revoked": self.revoked,
            "artifacts": [
                {**asdict(a), "path": str(a.path)} for a in self.artifacts
            ],
        }


# ------------------------------------------------------------------------------------ helpers


#: Header of the default ``policy.yaml`` of a site kit (:mod:`common.policy`).
_POLICY_HEADER = (
    "# This site's policy, checked before every task; a task outside it is refused and the\n"
    "# coordinator is told why. Written once by `qanafed provision` (never overwritten):\n"
    "# edit it here. coordinators: key ids of the coordinator metrics keys this site reports\n"
    "# to. never-send: any of weight-updates, calibration-ranges, class-counts,\n"
    "# confusion-matrices, per-class-metrics, saliency-summary. dp.max-epsilon: the most\n"
    "# (epsilon, delta) a run may spend on this site's updates (null: no limit).\n"
)


def _put(path: Path, data: bytes, mode: int = 0o644) -> str:
    """Write a non-secret file only if its content or mode differs; return what happened."""
    if path.is_file():
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return "unchanged"
        action = "updated"
    else:
        action = "created"
    write_public(path, data, overwrite=True)
    if mode != 0o644:
        os.chmod(path, mode)
    return action


def _merge(actions: list[str], existed: bool) -> str:
    if not existed:
        return "created"
    return "updated" if any(a != "unchanged" for a in actions) else "unchanged"


def _template(name: str, **values: str) -> bytes:
    text = resources.files("deploy").joinpath("templates", name).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace(f"@{key.upper()}@", value)
    left = _PLACEHOLDER.findall(text)
    if left:
        raise RuntimeError(f"template {name} has unfilled placeholders {left}")
    return text.encode()


def _yaml(header: str, data: dict[str, Any]) -> bytes:
    import yaml

    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return (header + body).encode()


def _ssh_public(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ) + b"\n"


def _pair_error(present: Path, absent: Path) -> SecurityError:
    return SecurityError(
        f"{present} exists but {absent} does not",
        f"restore {absent.name} from a backup, or delete {present} to make a new pair "
        "(kits using the old one must then be redistributed)",
    )


# ----------------------------------------------------------------------------------- provision


class _Provisioner:
    """One provisioning run; collects :class:`Artifact` records as it goes."""

    def __init__(self, project: Project, out: Path) -> None:
        self.project = project
        self.out = out
        self.coord = out / _COORD_DIR
        self.artifacts: list[Artifact] = []
        self.previous = self._previous_manifest()

    def note(self, owner: str, item: str, action: str, path: Path, fp: str | None = None) -> None:
        self.artifacts.append(Artifact(owner, item, action, path, fp))
        _log.debug("%s %s: %s (%s)", owner, item, action, path)

    def _previous_manifest(self) -> dict[str, Any]:
        path = self.out / MANIFEST
        if not path.is_file():
            return {}
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"{path} is not valid JSON ({err})",
                "restore it from a backup, or delete it (revocations listed in it are then lost)",
            ) from None
        if previous.get("project") != self.project.name:
            raise ConfigError(
                f"{self.out} holds kits of project {previous.get('project')!r}, "
                f"not {self.project.name!r}",
                "use another --out folder for another project, or fix `name:` in PROJECT.yaml",
            )
        return previous

    # ---------------------------------------------------------------------------- secrets

    def ca(self) -> tuple[Any, x509.Certificate]:
        key_path, cert_path = self.out / _CA_DIR / "ca.key", self.out / _CA_DIR / "ca.crt"
        if key_path.exists() and cert_path.exists():
            key, cert = pki.load_private_key(key_path), pki.load_certificate(cert_path)
            if cert.public_key() != key.public_key():
                raise SecurityError(
                    f"{cert_path} is not the certificate of {key_path}",
                    "restore the matching pair from a backup",
                )
            action = "reused"
        elif key_path.exists() or cert_path.exists():
            present, absent = (key_path, cert_path) if key_path.exists() else (cert_path, key_path)
            raise _pair_error(present, absent)
        else:
            key, cert = pki.create_ca(f"qanafed-ca {self.project.name}", self.project.ca_days)
            pki.save_private_key(key_path, key)
            pki.save_certificate(cert_path, cert)
            action = "created"
        os.chmod(key_path.parent, 0o700)
        self.note("ca", "CA certificate", action, cert_path, pki.cert_fingerprint(cert))
        return key, cert

    def server_cert(self, ca_key: Any, ca_cert: x509.Certificate) -> x509.Certificate:
        spec = self.project.coordinator
        key_path, cert_path = self.coord / "server.key", self.coord / "server.crt"
        hostnames, ips = spec.sans()
        if key_path.exists() and cert_path.exists():
            key, cert = pki.load_private_key(key_path), pki.load_certificate(cert_path)
            if cert.public_key() != key.public_key():
                raise SecurityError(
                    f"{cert_path} is not the certificate of {key_path}",
                    f"delete {cert_path} and {key_path} and re-run to issue a new pair",
                )
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = set(san.get_values_for_type(x509.DNSName)) | {
                str(ip) for ip in san.get_values_for_type(x509.IPAddress)
            }
            missing = [name for name in [*hostnames, *ips] if name not in have]
            if missing:
                raise ConfigError(
                    f"{cert_path} covers {sorted(have)} but PROJECT.yaml's coordinator now needs "
                    f"{missing} too",
                    f"delete {cert_path} and {key_path} and re-run to issue a certificate for the "
                    "new address (the CA and site keys stay; redistribute the coordinator kit and "
                    "the sites' site.yaml)",
                )
            pki.verify_chain(ca_cert, cert, spec.address)
            action = "reused"
        elif key_path.exists() or cert_path.exists():
            present, absent = (key_path, cert_path) if key_path.exists() else (cert_path, key_path)
            raise _pair_error(present, absent)
        else:
            key, cert = pki.issue_server_cert(
                ca_key, ca_cert, hostnames, ips, days=self.project.cert_days
            )
            pki.save_private_key(key_path, key)
            pki.save_certificate(cert_path, cert)
            action = "created"
        self.note(spec.name, "server certificate", action, cert_path, pki.cert_fingerprint(cert))
        return cert

    def metrics_key(self) -> bytes:
        private, public = self.coord / "metrics.key", self.coord / "metrics.pub"
        owner = self.project.coordinator.name
        if private.exists():
            key = load_metrics_private_key(private)
            pem = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if public.exists() and load_metrics_public_key(public) != key.public_key():
                raise SecurityError(
                    f"{public} is not the public key of {private}",
                    f"delete {public}; re-running derives it from {private}",
                )
            _put(public, pem)
            action = "reused"
        else:
            public.unlink(missing_ok=True)  # a public key without its private key is useless
            save_metrics_keypair(private, public)
            action = "created"
        pub_key = load_metrics_public_key(public)
        self.note(owner, "metrics key", action, private, key_id(pub_key))
        return read_public(public)

    def site_key(self, site: str) -> bytes:
        kit = self.out / _SITES_DIR / site
        private, public = kit / "supernode.key", kit / "supernode.pub"
        if private.exists():
            line = _ssh_public(load_supernode_private_key(private))
            if public.exists() and read_public(public) != line:
                raise SecurityError(
                    f"{public} is not the public key of {private}",
                    f"delete {public}; re-running derives it from {private}",
                )
            _put(public, line)
            action = "reused"
        else:
            private_bytes, line = pki.generate_supernode_keypair()
            write_private(private, private_bytes)
            write_public(public, line, overwrite=True)
            known = site in self.previous.get("sites", {})
            action = "replaced" if known else "created"
        fingerprint = ssh_fingerprint(line)
        for entry in self.previous.get("revoked", []):
            if entry["fingerprint"] == fingerprint:
                raise ConfigError(
                    f"site {site!r} is back in PROJECT.yaml, but {kit} still holds the key "
                    f"{fingerprint} revoked on {entry['revoked-at']}",
                    f"move {kit} away and re-run to issue the site a new key, or remove "
                    f"{site!r} from PROJECT.yaml",
                )
        self.note(site, "SuperNode key", action, private, fingerprint)
        return line

    # ---------------------------------------------------------------------------- revocation

    def revoke_removed(self) -> tuple[list[RevokedKey], list[str]]:
        """Revoke sites provisioned before but no longer in the project."""
        revoked = [RevokedKey.model_validate(r) for r in self.previous.get("revoked", [])]
        done = {r.fingerprint for r in revoked}
        wanted = {s.name for s in self.project.sites}
        known = set(self.previous.get("sites", {}))
        sites_dir = self.out / _SITES_DIR
        if sites_dir.is_dir():
            known |= {p.name for p in sites_dir.iterdir() if (p / "supernode.pub").is_file()}
        newly: list[str] = []
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for site in sorted(known - wanted):
            registered = self.coord / SITE_KEYS_DIR / f"{site}.pub"
            source = registered if registered.is_file() else sites_dir / site / "supernode.pub"
            if not source.is_file():
                continue
            line = read_public(source)
            fingerprint = ssh_fingerprint(line)
            if fingerprint not in done:
                revoked.append(RevokedKey(site=site, fingerprint=fingerprint,
                                          public_key=line.decode().strip(), revoked_at=now))
                done.add(fingerprint)
                newly.append(site)
                self.note(site, "SuperNode key", "revoked", sites_dir / site, fingerprint)
            registered.unlink(missing_ok=True)
        return revoked, newly

    def runtime_ports(self) -> dict[str, int]:
        """Each site's SuperNode runtime port: explicit, else kept from the last run, else next."""
        before = self.previous.get("sites", {})
        ports: dict[str, int] = {}
        for site in self.project.sites:
            if site.runtime_port is not None:
                ports[site.name] = site.runtime_port
        for site in self.project.sites:
            old = before.get(site.name, {}).get("runtime-port")
            if site.name not in ports and old is not None and old not in ports.values():
                ports[site.name] = old
        taken = set(ports.values()) | {self.project.coordinator.port}
        candidate = DEFAULT_SITE_RUNTIME_PORT
        for site in self.project.sites:
            if site.name in ports:
                continue
            while candidate in taken:
                candidate += 1
            ports[site.name] = candidate
            taken.add(candidate)
        return ports

    # ------------------------------------------------------------------------------- kits

    def site_kit(self, site: str, ca_pem: bytes, metrics_pem: bytes, port: int) -> None:
        spec = self.project.site(site)
        coordinator = self.project.coordinator
        kit = self.out / _SITES_DIR / site
        existed = (kit / SITE_YAML).exists()
        config = SiteConfig(
            project=self.project.name,
            site=site,
            data=spec.data,
            device=spec.device,
            superlink=format_address(coordinator.address, coordinator.port),
            runtime_port=port,
        )
        header = (
            f"# Site kit of {site!r}, project {self.project.name!r}: written by "
            "`qanafed provision`.\n# Start with ./start.sh (or the systemd unit); "
            "`data` may be edited to this machine's data path.\n"
        )
        values = {"site": site, "project": self.project.name, "install_dir": spec.kit_install_dir}
        actions = [
            _put(kit / "ca.crt", ca_pem),
            _put(kit / "metrics.pub", metrics_pem),
            _put(kit / SITE_YAML, _yaml(header, config.model_dump(by_alias=True, mode="json"))),
            _put(kit / "start.sh", _template("site-start.sh", **values), _SCRIPT_MODE),
            _put(kit / "stop.sh", _template("site-stop.sh", **values), _SCRIPT_MODE),
            _put(kit / f"qanafed-site-{site}.service", _template("site.service", **values)),
        ]
        if not (kit / POLICY_FILE).exists():  # the site's own document: never overwritten
            coordinator_id = key_id(serialization.load_pem_public_key(metrics_pem))
            actions.append(_put(kit / POLICY_FILE, _yaml(_POLICY_HEADER, default_policy(
                [coordinator_id]))))
        self.note(site, "site kit", _merge(actions, existed), kit)

    def coordinator_kit(
        self,
        ca_pem: bytes,
        site_lines: dict[str, bytes],
        ports: dict[str, int],
        revoked: list[RevokedKey],
    ) -> None:
        spec = self.project.coordinator
        existed = (self.coord / COORDINATOR_YAML).exists()
        actions = [_put(self.coord / "ca.crt", ca_pem)]
        entries = []
        for site in self.project.sites:
            rel = f"{SITE_KEYS_DIR}/{site.name}.pub"
            actions.append(_put(self.coord / rel, site_lines[site.name]))
            entries.append(SiteEntry(name=site.name, device=site.device, public_key=rel,
                                     fingerprint=ssh_fingerprint(site_lines[site.name]),
                                     runtime_port=ports[site.name]))
        config = CoordinatorConfig(
            project=self.project.name,
            name=spec.name,
            address=spec.address,
            port=spec.port,
            bind_host=spec.bind_host,
            sites=entries,
            revoked=revoked,
        )
        header = (
            f"# Coordinator kit of project {self.project.name!r}: written by `qanafed provision`."
            "\n# Register every key under site-keys/ and refuse every key under `revoked`.\n"
        )
        values = {"site": spec.name, "project": self.project.name, "install_dir": spec.install_dir}
        actions += [
            _put(self.coord / COORDINATOR_YAML,
                 _yaml(header, config.model_dump(by_alias=True, mode="json"))),
            _put(self.coord / "start.sh", _template("coordinator-start.sh", **values),
                 _SCRIPT_MODE),
            _put(self.coord / "stop.sh", _template("coordinator-stop.sh", **values),
                 _SCRIPT_MODE),
            _put(self.coord / "qanafed-coordinator.service",
                 _template("coordinator.service", **values)),
        ]
        token = self.coord / DASHBOARD_TOKEN
        if make_token_file(token):  # kept across re-provisioning, like the keys
            self.note(spec.name, "dashboard token", "created", token)
        self.note(spec.name, "coordinator kit", _merge(actions, existed), self.coord)

    def manifest(
        self,
        ca: x509.Certificate,
        server: x509.Certificate,
        metrics_pem: bytes,
        site_lines: dict[str, bytes],
        ports: dict[str, int],
        revoked: list[RevokedKey],
    ) -> Path:
        spec = self.project.coordinator
        hostnames, ips = spec.sans()
        data = {
            "version": 1,
            "project": self.project.name,
            "ca": {
                "certificate": f"{_CA_DIR}/ca.crt",
                "fingerprint-sha256": pki.cert_fingerprint(ca),
                "not-after": ca.not_valid_after_utc.isoformat(),
            },
            "server": {
                "certificate": f"{_COORD_DIR}/server.crt",
                "fingerprint-sha256": pki.cert_fingerprint(server),
                "sans": [*hostnames, *ips],
                "not-after": server.not_valid_after_utc.isoformat(),
            },
            "metrics": {
                "public-key": f"{_COORD_DIR}/metrics.pub",
                "key-id": key_id(load_metrics_public_key(self.coord / "metrics.pub")),
            },
            "release": {
                "public-key": f"{_COORD_DIR}/release.pub",
                "key-ids": release_key_ids(self.coord),
            },
            "coordinator": {
                "name": spec.name,
                "address": spec.address,
                "port": spec.port,
                "bind-host": spec.bind_host,
                "kit": _COORD_DIR,
            },
            "sites": {
                site.name: {
                    "fingerprint": ssh_fingerprint(site_lines[site.name]),
                    "device": site.device,
                    "runtime-port": ports[site.name],
                    "kit": f"{_SITES_DIR}/{site.name}",
                }
                for site in self.project.sites
            },
            "revoked": [r.model_dump(by_alias=True) for r in revoked],
        }
        path = self.out / MANIFEST
        _put(path, (json.dumps(data, indent=2) + "\n").encode())
        return path


def provision(project_file: str | Path, out_dir: str | Path) -> ProvisionResult:
    """Create or update the CA, keys and kits of a project.

    Parameters
    ----------
    project_file : str | Path
        PROJECT.yaml (see ``deploy/example-project.yaml``).
    out_dir : str | Path
        The KITS folder; created if missing, updated incrementally if it holds earlier kits.

    Returns
    -------
    ProvisionResult
        What was created, reused, updated or revoked, with fingerprints.

    Raises
    ------
    ConfigError
        Invalid PROJECT.yaml; KITS of another project; a server certificate that no longer covers
        the coordinator address; a revoked site re-added with its old key.
    SecurityError
        A half-present key pair, a mismatched pair, a private key with loose permissions.
    """
    project = load_project(project_file)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file", "pass a folder for the kits")
    out.mkdir(parents=True, exist_ok=True)
    run = _Provisioner(project, out)

    ca_key, ca_cert = run.ca()
    server = run.server_cert(ca_key, ca_cert)
    metrics_pem = run.metrics_key()
    action, release_id = ensure_release_key(run.coord)
    run.note(project.coordinator.name, "release key", action, run.coord / "release.key",
             release_id)
    revoked, newly_revoked = run.revoke_removed()
    site_lines = {site.name: run.site_key(site.name) for site in project.sites}
    ports = run.runtime_ports()
    ca_pem = read_public(out / _CA_DIR / "ca.crt")
    run.coordinator_kit(ca_pem, site_lines, ports, revoked)
    for site in project.sites:
        run.site_kit(site.name, ca_pem, metrics_pem, ports[site.name])
        for name, data in site_release_files(run.coord).items():  # root key, chain, revocations
            _put(out / _SITES_DIR / site.name / name, data)
    manifest = run.manifest(ca_cert, server, metrics_pem, site_lines, ports, revoked)

    # Self-check: every kit written must pass the checks its daemon will make.
    validate_coordinator_kit(run.coord)
    for site in project.sites:
        validate_site_kit(out / _SITES_DIR / site.name, check_data=False)
    read_private(out / _CA_DIR / "ca.key")  # still 0600
    _log.info("provisioned %s: %d sites, %d newly revoked", project.name, len(project.sites),
              len(newly_revoked))
    return ProvisionResult(
        project=project.name,
        out_dir=out,
        manifest=manifest,
        sites=[s.name for s in project.sites],
        revoked=newly_revoked,
        artifacts=run.artifacts,
    )

