"""Which site a node is: its claim in ``hello`` checked against the key it authenticated with."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from common.errors import SecurityError
from common.log import get_logger

log = get_logger("server.binding")


def registered_sites(nodes_file: str | Path) -> dict[int, str]:
    """Return node id → site of the SuperNode keys the coordinator registered.

    Parameters
    ----------
    nodes_file : str | Path
        The coordinator's ``run/nodes.json`` (key fingerprint → ``{"site", "node-id"}``),
        written from what ``flwr supernode register`` returned for each site's key.

    Raises
    ------
    SecurityError
        If the file is missing or unreadable: without it no site can be told from another.
    """
    path = Path(nodes_file)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return {int(e["node-id"]): str(e["site"]) for e in entries.values()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise SecurityError(
            f"cannot read the registered SuperNode keys from {path}: {err}",
            "restart the coordinator (qanafed coordinator start) so it registers every "
            "site key again",
        ) from err


def bind_sites(
    claims: Mapping[int, str], registered: Mapping[int, str] | None = None
) -> tuple[dict[int, str], dict[int, str]]:
    """Split the nodes that said hello into admitted (node → site) and refused (node → why).

    Parameters
    ----------
    claims : Mapping[int, str]
        Node id → site id the node claims in ``hello``.
    registered : Mapping[int, str] | None (default: None)
        Node id → site of each registered SuperNode key (deployment: the SuperLink lets a node
        act only as the node id of the key it authenticated with). None in simulation, where
        the Simulation Engine gives each node its partition (hence its site): then only
        claims shared by several nodes are refused.

    Returns
    -------
    tuple[dict[int, str], dict[int, str]]
        Admitted node → site, and refused node → reason (each reason names the node ids and
        site ids involved; also logged).
    """
    refused: dict[int, str] = {}
    for node, site in claims.items():
        if registered is None:
            continue
        if node not in registered:
            refused[node] = (f"node {node} claims site {site!r} but is no registered SuperNode "
                             "key of this coordinator")
        elif registered[node] != site:
            refused[node] = (f"node {node} claims site {site!r} but authenticated with the key "
                             f"of site {registered[node]!r}")
    owners: dict[str, list[int]] = {}
    for node, site in claims.items():
        if node not in refused:
            owners.setdefault(site, []).append(node)
    for site, nodes in owners.items():
        if len(nodes) > 1:
            for node in nodes:
                others = ", ".join(str(n) for n in sorted(nodes) if n != node)
                refused[node] = f"node {node} claims site {site!r}, as does node {others}"
    for _, why in sorted(refused.items()):
        log.error("hello refused: %s", why)
    admitted = {node: site for node, site in claims.items() if node not in refused}
    return admitted, refused
