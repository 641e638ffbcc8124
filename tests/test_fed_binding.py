"""A node is the site of the SuperNode key it authenticated with, never the site it claims."""

from __future__ import annotations

import json
import logging

import pytest

from common.errors import SecurityError
from server.binding import bind_sites, registered_sites

REGISTERED = {101: "site-a", 202: "site-b"}


def test_a_node_claiming_another_sites_name_is_refused_and_logged(caplog):
    # Prepare: node 202 holds site-b's key but its kit says site-a
    claims = {101: "site-a", 202: "site-a"}
    # Execute
    with caplog.at_level(logging.ERROR, logger="qanafed"):
        admitted, refused = bind_sites(claims, REGISTERED)
    # Assert: the genuine site-a stays; the poser is refused, naming both site ids
    assert admitted == {101: "site-a"}
    assert refused == {202: "node 202 claims site 'site-a' but authenticated with the key of "
                            "site 'site-b'"}
    assert refused[202] in caplog.text


def test_an_unregistered_node_is_refused():
    # Execute
    admitted, refused = bind_sites({101: "site-a", 303: "site-c"}, REGISTERED)
    # Assert
    assert admitted == {101: "site-a"}
    assert "node 303 claims site 'site-c' but is no registered SuperNode key" in refused[303]


def test_without_keys_a_duplicate_site_id_refuses_every_claimant(caplog):
    # Prepare: simulation (no keys): nodes 7 and 9 both say they are site-0
    claims = {7: "site-0", 8: "site-1", 9: "site-0"}
    # Execute
    with caplog.at_level(logging.ERROR, logger="qanafed"):
        admitted, refused = bind_sites(claims)
    # Assert: neither can be told to be the real one; each reason names both node ids
    assert admitted == {8: "site-1"}
    assert refused == {7: "node 7 claims site 'site-0', as does node 9",
                       9: "node 9 claims site 'site-0', as does node 7"}
    assert all(why in caplog.text for why in refused.values())


def test_registered_sites_reads_the_coordinators_nodes_file(tmp_path):
    # Prepare: run/nodes.json as deploy.coord.register_sites writes it
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps({"SHA256:x": {"site": "site-a", "node-id": "101"},
                                 "SHA256:y": {"site": "site-b", "node-id": "202"}}))
    # Execute / Assert
    assert registered_sites(nodes) == REGISTERED
    with pytest.raises(SecurityError, match="cannot read the registered SuperNode keys"):
        registered_sites(tmp_path / "missing.json")
