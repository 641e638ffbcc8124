"""Schemas of PROJECT.yaml (what to provision) and of the kits' site.yaml and coordinator.yaml.

All files use kebab-case keys and refuse unknown keys; every error names the file, the key, the
received value and the allowed values. Ports follow flwr 1.41 as installed (checked by running
``flower-superlink``/``flower-supernode``, not only ``--help``):

* the coordinator's ``port`` (default 8000): ONE HTTPS port on which the SuperLink serves the
  Fleet API (SuperNodes), the Control API (``flwr`` CLI) and the Runtime API (ServerApp/SuperExec):
  ``flower-superlink --host BIND-HOST --port PORT``; SuperNodes use ``--superlink ADDRESS:PORT``.
  ``--fleet-api-address`` / ``--control-api-address`` are deprecated and do not open a port, and
  ``--serverappio-api-address`` is refused.
* ``bind-host`` (default ``0.0.0.0``): the interface the SuperLink listens on (flwr's own default,
  127.0.0.1, would refuse every remote site).
* a site's ``runtime-port`` (default 9094, 9095, ... per site): the SuperNode's own Runtime HTTP
  API, which replaced ClientAppIo (``flower-supernode --port``); distinct per node on one host.
"""

from __future__ import annotations

import ipaddress
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from common.errors import ConfigError

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_SITE_RUNTIME_PORT",
    "DEVICES",
    "CoordinatorConfig",
    "CoordinatorFiles",
    "CoordinatorSpec",
    "Project",
    "RevokedKey",
    "SiteConfig",
    "SiteEntry",
    "SiteFiles",
    "SiteSpec",
    "format_address",
    "is_loopback",
    "load_project",
    "load_yaml",
    "parse_model",
]

DEVICES = ("akd1000", "akd1500", "akida2-6n", "cpu")
DEFAULT_PORT = 8000
DEFAULT_SITE_RUNTIME_PORT = 9094

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HOST = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Keys of older Flower versions, with what replaces them here.
_ONE_PORT = (
    "port (flwr 1.41 serves the Fleet, Control and Runtime APIs on one HTTPS port, "
    "`flower-superlink --port`, default 8000)"
)
_RENAMED = {
    "fleet-port": _ONE_PORT,
    "control-port": _ONE_PORT,
    "serverappio-port": _ONE_PORT,
    "clientappio-port": "runtime-port (flwr 1.41 serves ClientAppIo as the SuperNode's Runtime "
    "HTTP API, `flower-supernode --port`, default 9094)",
}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=_kebab, populate_by_name=True)


def _dns_label(value: str) -> str:
    if not _LABEL.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a DNS-safe name: use 1-63 lowercase letters, digits and '-', "
            "not starting or ending with '-' (e.g. 'hospital-a')"
        )
    return value


def _host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOST.fullmatch(value) or len(value) > 253:
            raise ValueError(
                f"{value!r} is neither an IP address nor a DNS host name "
                "(e.g. 'superlink.hospital.org' or '10.0.0.5'; no scheme, no port)"
            ) from None
    return value


def _project_name(value: str) -> str:
    if not _PROJECT.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid project name: use letters, digits, '.', '_' or '-' "
            "(at most 64, starting with a letter or digit)"
        )
    return value


def _relative(value: str) -> str:
    if not value or Path(value).is_absolute() or ".." in Path(value).parts:
        raise ValueError(f"{value!r} must be a file name relative to the kit folder")
    return value


def _install_dir(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() or c in "\"'$`\\%" for c in value):
        raise ValueError(
            f"install-dir {value!r} must be an absolute path without spaces, quotes, '$' or '%' "
            "(systemd unit paths), e.g. /opt/qanafed/hospital-a"
        )
    return value


SiteName = Annotated[str, AfterValidator(_dns_label)]
InstallDir = Annotated[str, AfterValidator(_install_dir)]
Host = Annotated[str, AfterValidator(_host)]
ProjectName = Annotated[str, AfterValidator(_project_name)]
Port = Annotated[int, Field(ge=1, le=65535)]
M = TypeVar("M", bound=BaseModel)
Device = Literal["akd1000", "akd1500", "akida2-6n", "cpu"]
KitPath = Annotated[str, AfterValidator(_relative)]


def is_loopback(host: str) -> bool:
    """Return whether ``host`` is ``localhost`` or a loopback IP address."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_address(host: str, port: int) -> str:
    """Return ``host:port``, bracketing IPv6 addresses (``[::1]:8000``)."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


# ---------------------------------------------------------------------------------- PROJECT.yaml


class CoordinatorSpec(_Section):
    """The coordinator (SuperLink host).

    Parameters
    ----------
    name : str (default: "coordinator")
        DNS-safe id of the coordinator.
    address : str
        Host name or IP address the sites connect to; it goes into the TLS certificate's SAN.
    port : int (default: 8000)
        The SuperLink's HTTPS port: Fleet, Control and Runtime APIs (``flower-superlink --port``).
    bind-host : str (default: "0.0.0.0")
        Interface the SuperLink listens on (``flower-superlink --host``); ``127.0.0.1`` keeps it
        to this machine.
    extra-sans : list[str] (default: [])
        Further host names or IPs the certificate must cover (e.g. a second network interface).
    install-dir : str (default: "/opt/qanafed/coordinator")
        Where the coordinator kit is installed on its machine (used by the systemd unit).
    """

    name: SiteName = "coordinator"
    address: Host
    port: Port = DEFAULT_PORT
    bind_host: Host = "0.0.0.0"
    extra_sans: list[Host] = Field(default_factory=list)
    install_dir: InstallDir = "/opt/qanafed/coordinator"

    def sans(self) -> tuple[list[str], list[str]]:
        """Return the ``(hostnames, ips)`` the SuperLink certificate must cover.

        The address and extra SANs, plus ``localhost`` and ``127.0.0.1`` always: flwr's
        SuperExec (``--runtime-api-address 127.0.0.1:PORT --root-certificates ca.crt``) and the
        ``flwr`` CLI on the coordinator reach the SuperLink over TLS on 127.0.0.1.
        """
        hostnames: list[str] = []
        ips: list[str] = []
        for host in [self.address, *self.extra_sans, "localhost", "127.0.0.1"]:
            try:
                ip = str(ipaddress.ip_address(host))
            except ValueError:
                name = host.lower().rstrip(".")
                if name not in hostnames:
                    hostnames.append(name)
            else:
                if ip not in ips:
                    ips.append(ip)
        return hostnames, ips


class SiteSpec(_Section):
    """One site (hospital, SuperNode).

    Parameters
    ----------
    name : str
        DNS-safe site id (``site-id`` in the SuperNode's node config).
    data : str
        Path of the site's data on the site's own machine.
    device : str
        ``akd1000``, ``akd1500``, ``akida2-6n`` or ``cpu``.
    runtime-port : int | None (default: None)
        SuperNode Runtime HTTP API port; None allocates 9094, 9095, ... (kept across re-runs).
    install-dir : str | None (default: None)
        Where the kit is installed on the site machine (systemd unit);
        None means ``/opt/qanafed/<name>``.
    """

    name: SiteName
    data: Annotated[str, Field(min_length=1)]
    device: Device
    runtime_port: Port | None = None
    install_dir: InstallDir | None = None

    @property
    def kit_install_dir(self) -> str:
        """The install folder of this site's kit on its machine."""
        return self.install_dir or f"/opt/qanafed/{self.name}"


class Project(_Section):
    """A whole federation: the coordinator and its sites.

    Parameters
    ----------
    name : str
        Project name (CA name, Flower federation name).
    coordinator : CoordinatorSpec
        The SuperLink host.
    sites : list[SiteSpec]
        At least one site, names unique.
    ca-days : int (default: 3650)
        CA validity when a CA is created.
    cert-days : int (default: 825)
        Server certificate validity when one is issued.
    """

    name: ProjectName
    coordinator: CoordinatorSpec
    sites: list[SiteSpec] = Field(min_length=1)
    ca_days: int = Field(3650, ge=1)
    cert_days: int = Field(825, ge=1)

    @model_validator(mode="after")
    def _unique(self) -> Project:
        names = [s.name for s in self.sites]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"site names must be unique, got {dupes} more than once")
        if self.coordinator.name in names:
            raise ValueError(
                f"site name {self.coordinator.name!r} is the coordinator's name; rename the site"
            )
        explicit = [s.runtime_port for s in self.sites if s.runtime_port is not None]
        clash = sorted({p for p in explicit if explicit.count(p) > 1})
        if clash:
            raise ValueError(f"sites' runtime-port must be distinct, got {clash} more than once")
        if self.coordinator.port in explicit:
            raise ValueError(
                f"site runtime-port {self.coordinator.port} is also the coordinator's port; "
                "choose another"
            )
        return self

    def site(self, name: str) -> SiteSpec:
        """Return the site called ``name``."""
        return next(s for s in self.sites if s.name == name)


# ------------------------------------------------------------------------ site.yaml (site kit)


class SiteFiles(_Section):
    """Files of a site kit, relative to the kit folder."""

    ca_cert: KitPath = "ca.crt"
    private_key: KitPath = "supernode.key"
    public_key: KitPath = "supernode.pub"
    metrics_public_key: KitPath = "metrics.pub"


class SiteConfig(_Section):
    """``site.yaml``: what ``qanafed site start`` needs to run this site's SuperNode.

    Parameters
    ----------
    version : int (default: 1)
        Kit format version.
    project : str
        Project name.
    site : str
        Site id (``site-id`` node config).
    data : str
        Data path on this machine (relative paths are taken from the kit folder).
    device : str
        ``akd1000``, ``akd1500``, ``akida2-6n`` or ``cpu``.
    superlink : str
        SuperLink address ``host:port`` (``flower-supernode --superlink``).
    runtime-port : int
        SuperNode Runtime HTTP API port (``flower-supernode --port``).
    files : SiteFiles
        Kit file names.
    """

    version: Literal[1] = 1
    project: ProjectName
    site: SiteName
    data: Annotated[str, Field(min_length=1)]
    device: Device
    superlink: str
    runtime_port: Port
    files: SiteFiles = Field(default_factory=SiteFiles)

    @model_validator(mode="after")
    def _superlink(self) -> SiteConfig:
        host, sep, port = self.superlink.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"superlink {self.superlink!r} must be HOST:PORT, e.g. 10.0.0.5:8000")
        _host(host)
        return self

    @property
    def superlink_host(self) -> str:
        """Host part of ``superlink`` (without IPv6 brackets)."""
        host = self.superlink.rpartition(":")[0]
        return host[1:-1] if host.startswith("[") else host


# --------------------------------------------------------------- coordinator.yaml (coordinator kit)


class CoordinatorFiles(_Section):
    """Files of the coordinator kit, relative to the kit folder."""

    ca_cert: KitPath = "ca.crt"
    server_cert: KitPath = "server.crt"
    server_key: KitPath = "server.key"
    metrics_private_key: KitPath = "metrics.key"
    metrics_public_key: KitPath = "metrics.pub"


class SiteEntry(_Section):
    """An admitted site: its registered SuperNode public key."""

    name: SiteName
    device: Device
    public_key: KitPath
    fingerprint: str
    runtime_port: Port


class RevokedKey(_Section):
    """A site removed from the project: its key must be refused (and unregistered)."""

    site: SiteName
    fingerprint: str
    public_key: str
    revoked_at: str


class CoordinatorConfig(_Section):
    """``coordinator.yaml``: what ``qanafed coord start`` needs to run the SuperLink.

    Parameters
    ----------
    version : int (default: 1)
        Kit format version.
    project : str
        Project name (Flower federation name).
    name : str
        Coordinator id.
    address : str
        Address the sites connect to (covered by ``server.crt``).
    port : int
        The SuperLink's HTTPS port (Fleet, Control, Runtime APIs).
    bind-host : str
        Interface the SuperLink listens on.
    sites : list[SiteEntry]
        Admitted sites and their key files (``site-keys/<site>.pub``).
    revoked : list[RevokedKey] (default: [])
        Removed sites' keys, to be refused.
    files : CoordinatorFiles
        Kit file names.
    """

    version: Literal[1] = 1
    project: ProjectName
    name: SiteName
    address: Host
    port: Port
    bind_host: Host
    sites: list[SiteEntry] = Field(default_factory=list)
    revoked: list[RevokedKey] = Field(default_factory=list)
    files: CoordinatorFiles = Field(default_factory=CoordinatorFiles)


# --------------------------------------------------------------------------------- parsing


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Return the keys allowed at ``loc`` (a pydantic error location) in ``model``."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = next(
            (f for n, f in current.model_fields.items() if (f.alias or n) == part), None
        )
        current = _model_in(field.annotation) if field is not None else None
    if current is None:
        return []
    return [f.alias or n for n, f in current.model_fields.items()]


def _describe(err: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            key = str(loc[-1])
            allowed = ", ".join(_allowed_keys(model, loc[:-1]))
            hint = f"; it is now {_RENAMED[key]}" if key in _RENAMED else ""
            lines.append(f"{source}: unknown field {key!r} at {where}{hint}; allowed: {allowed}")
            continue
        received = e.get("input")
        shown = "" if isinstance(received, dict) else f" (received {received!r})"
        message = e["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {where}: {message}{shown}")
    return "\n".join(lines)


def parse_model(model: type[M], raw: Any, source: str, example: str) -> M:
    """Validate a parsed YAML document against ``model``.

    Parameters
    ----------
    model : type[BaseModel]
        The schema (:class:`Project`, :class:`SiteConfig`, :class:`CoordinatorConfig`).
    raw : Any
        The parsed document.
    source : str
        The file it came from, named in messages.
    example : str
        Where a complete, valid example can be found (named in the fix).

    Raises
    ------
    ConfigError
        Naming each bad key, the received value and the allowed keys/values.
    """
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping of keys, got {type(raw).__name__}: {raw!r}",
            f"write `key: value` lines at the top level; see {example}",
        )
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(
            _describe(err, model, source),
            f"fix the keys above (kebab-case); devices: {', '.join(DEVICES)}; see {example}",
        ) from None


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file; :class:`ConfigError` names the file and line/column of a syntax error."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"YAML file {str(p)!r} does not exist", "check the path")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{p} is not valid YAML{where}: {getattr(err, 'problem', None) or err}",
            "check indentation and `key: value` syntax on that line",
        ) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p} is not UTF-8 text ({err})", "save it as UTF-8") from None


def load_project(path: str | Path) -> Project:
    """Read and validate PROJECT.yaml.

    Parameters
    ----------
    path : str | Path
        The project file (see ``deploy/example-project.yaml``).

    Raises
    ------
    ConfigError
        Missing file, YAML syntax error (line/column), or invalid keys/values.
    """
    return parse_model(Project, load_yaml(path), str(path), "deploy/example-project.yaml")
