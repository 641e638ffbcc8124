"""A site's connection to the SuperLink, read from its SuperNode's log (``run/site.log``).

flwr 1.42's SuperNode logs ``Starting Flower SuperNode`` at each (re)start, ``SuperNode ID: N``
once the SuperLink registered and activated it (the first successful connection), and on a
fatal connection error ``Exit Code: 305`` followed by the cause: ``CERTIFICATE_VERIFY_FAILED``
(TLS: the SuperLink's certificate does not chain to the kit's ``ca.crt``, or does not name its
address) or ``Failed to activate SuperNode`` (SuperNode authentication: the key is not
registered, or a previous session of it is still counted online). While the SuperLink does not
answer it logs ``Connection attempt failed, retrying``. Only the part of the log after the last
``Starting Flower SuperNode`` is read: it describes the current SuperNode process.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["Connection", "connection_of", "read_log"]

Status = Literal["connected", "failing", "connecting", "starting", "unknown"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = "Starting Flower SuperNode"
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_RETRY = "Connection attempt failed"


@dataclass(frozen=True)
class Connection:
    """The state of a SuperNode's connection to the SuperLink.

    Attributes
    ----------
    status : str
        ``connected`` (registered and activated), ``failing`` (a connection error the
        SuperNode exits on), ``connecting`` (the SuperLink does not answer yet, retrying),
        ``starting`` (no attempt logged yet) or ``unknown`` (no log).
    reason : str
        What is wrong, in the site operator's terms (empty when connected).
    fix : str
        What to do about it (empty when connected).
    node_id : str | None
        The SuperNode id the SuperLink gave (connected only).
    detail : str
        The log line the verdict comes from.
    cause : str
        ``tls`` (retrying cannot help without another kit), ``unregistered`` (the SuperLink
        refused the key), ``unreachable``, ``exited`` (another fatal error), or empty.
    """

    status: Status
    reason: str = ""
    fix: str = ""
    node_id: str | None = None
    detail: str = ""
    cause: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return the state as a JSON-ready dict."""
        return asdict(self)


def read_log(log_file: Path, offset: int = 0, tail: int = 65536) -> str:
    """Return ``log_file`` from ``offset`` (at most its last ``tail`` bytes), ANSI codes removed."""
    if not log_file.is_file():
        return ""
    with open(log_file, "rb") as fh:
        fh.seek(max(offset, log_file.stat().st_size - tail, 0))
        return _ANSI.sub("", fh.read().decode("utf-8", "replace"))


def _line_with(text: str, needle: str) -> str:
    return next((line.strip() for line in text.splitlines() if needle in line), "")


def connection_of(log_text: str, superlink: str, fingerprint: str, kit_dir: Path) -> Connection:
    """Return the connection state the SuperNode's log shows.

    Parameters
    ----------
    log_text : str
        The site log (or what was written since the start being watched), ANSI-free.
    superlink : str
        The SuperLink address of the kit, for the messages.
    fingerprint : str
        The site's SuperNode key fingerprint, for the messages.
    kit_dir : Path
        The kit folder, for the messages.
    """
    if not log_text:
        return Connection("unknown")
    cut = log_text.rfind(_START)
    current = log_text[cut:] if cut >= 0 else log_text
    if "CERTIFICATE_VERIFY_FAILED" in current:
        detail = _line_with(current, "CERTIFICATE_VERIFY_FAILED")
        if "mismatch" in detail:
            return Connection(
                "failing",
                f"the coordinator's certificate at {superlink} does not name that address "
                f"(TLS: {detail})",
                "ask the coordinator to re-run qanafed provision with the address the sites "
                "use, and install the new kits",
                detail=detail, cause="tls",
            )
        return Connection(
            "failing",
            f"the coordinator's certificate at {superlink} is not signed by this kit's CA "
            f"({kit_dir / 'ca.crt'}; TLS: {detail})",
            "use the kit from the same provisioning as the coordinator's (its ca.crt), or ask "
            "the coordinator for this site's kit from its current provisioning",
            detail=detail, cause="tls",
        )
    if "Failed to activate SuperNode" in current:
        return Connection(
            "failing",
            f"the SuperLink at {superlink} refused this site's key {fingerprint}: it is not "
            "registered there (or a killed session of it is still counted online, for about "
            "a minute)",
            "ask the coordinator to admit this site: add it to PROJECT.yaml, run `qanafed "
            "provision`, then `qanafed coord stop` and `qanafed coord start` (which registers "
            "the keys); a revoked site needs a new kit. The supervisor keeps retrying for a "
            "few minutes",
            detail=_line_with(current, "Failed to activate SuperNode"), cause="unregistered",
        )
    node = _NODE_ID.search(current)
    if node:
        return Connection("connected", node_id=node.group(1), detail=node.group(0))
    if exit_line := _line_with(current, "Exit Code:"):
        return Connection("failing", f"the SuperNode exited: {exit_line}",
                          f"read {kit_dir / 'run' / 'site.log'} for the reason",
                          detail=exit_line, cause="exited")
    if _RETRY in current:
        return Connection(
            "connecting",
            f"no answer from the SuperLink at {superlink} yet (the SuperNode keeps retrying)",
            "start the coordinator (qanafed coord start), or check the address in site.yaml "
            "and that the coordinator's port is reachable from this machine",
            detail=_line_with(current, _RETRY), cause="unreachable",
        )
    return Connection("starting")
