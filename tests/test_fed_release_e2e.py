"""End to end on a tiny QANA simulation: sites refuse a global model whose release does not verify.

The coordinator signs the model it sends in the finalize round; every site trusts the run's
release key (given as node config, as ``qanafed sim`` does). On its way to three of the four
sites the release goes wrong: another federation's key is trusted, the weights are changed,
the release is stripped (unsigned). Those sites refuse before converting, the coordinator
records each refusal reason, the site that verified the model converts it and learns, and
nothing the run saved is lost.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import ray.cloudpickle

from client.client_app import QANA_PHASES, SitePhases, make_client_app
from common.checkpoint import load_latest
from common.fedconfig import parse_config
from common.metrics_crypto import save_metrics_keypair
from common.received_release import arrays_sha256
from common.release import generate_release_keypair, verify_release

pytestmark = pytest.mark.slow

# Ray workers cannot import this test module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _tampering_phases(wrong_key: str) -> SitePhases:
    """QANA site phases whose finalize message went wrong on its way to sites 1-3."""

    def finalize(cfg, data, arrays, config):
        if data.site_id == "site-1":  # the site trusts another federation's key
            config = {**config, "site-release-key": wrong_key}
        elif data.site_id == "site-2":  # one weight changed on the way
            name = sorted(k for k in arrays if k.endswith("kernel"))[0]
            arrays = {**arrays, name: arrays[name] + np.float32(0.01)}
        elif data.site_id == "site-3":  # the release was stripped: an unsigned model
            config = {k: v for k, v in config.items() if k != "release"}
        return QANA_PHASES.finalize(cfg, data, arrays, config)

    return SitePhases(QANA_PHASES.load, QANA_PHASES.hello, QANA_PHASES.warmup,
                      QANA_PHASES.calibrate, QANA_PHASES.qat, finalize)


def test_sites_refuse_a_wrongly_signed_altered_or_unsigned_model_and_the_coordinator_says_why(
    tmp_path,
):
    # Prepare
    from server.server_app import make_server_app
    from server.simulation import simulate

    keys, other = tmp_path / "keys", tmp_path / "other"
    save_metrics_keypair(keys / "metrics.key", keys / "metrics.pub")
    generate_release_keypair(keys / "release.key", keys / "release.pub")
    generate_release_keypair(other / "release.key", other / "release.pub")
    cfg = parse_config({
        "name": "release", "data": "synthetic:n=160,size=48,sites=4,seed=1",
        "partition": {"scheme": "natural", "sites": 4},
        "model": {"variant": "qana-akd1000", "size": 48, "width": 0.25, "depth": 1},
        "rounds": {"warmup": 1, "qat": 0}, "local-epochs": 1, "batch-size": 16,
        "calibration-samples": 16, "quorum": {"min-sites": 4, "min-replies": 1},
        "timeouts": {"connect": 300, "round": 900}, "balance": "oversample",
        "edge": {"shots": 2, "neurons-per-class": 1},
        "metrics-key": str(keys / "metrics.pub"), "seed": 3,
    })
    out = tmp_path / "run"
    client_app = make_client_app(_tampering_phases(str(other / "release.pub")),
                                 node_defaults={"release-public-key": str(keys / "release.pub")})

    # Execute
    simulate(make_server_app({"scenario-config": cfg, "out-dir": str(out),
                              "metrics-private-key": str(keys / "metrics.key"),
                              "release-private-key": str(keys / "release.key")}),
             client_app, num_sites=4, parallel=2)

    # Assert
    report = json.loads((out / "report.json").read_text())
    assert report["complete"]
    assert [r["phase"] for r in report["rounds"]] == ["warmup", "calibrate", "finalize"]
    assert all(r["dropped"] == {} for r in report["rounds"][:-1])
    final = report["final"]
    dropped = final["dropped"]
    assert set(dropped) == {"site-1", "site-2", "site-3"}, dropped
    for site, why in {"site-1": "not the trusted key", "site-2": "are not the signed ones",
                      "site-3": "unsigned"}.items():
        assert f"site {site} refuses the global model of round 3" in dropped[site], dropped[site]
        assert why in dropped[site], dropped[site]
    # The site that verified the release converted the signed model and learnt on-chip
    ok = final["sites"]["site-0"]
    assert set(final["sites"]) == {"site-0"}
    assert ok["akida_hash"] == final["server_hash"] and ok["hash_matches"]
    assert ok["akida_after_edge"] is not None
    # Nothing saved is lost: every round checkpointed, the published model signed and valid
    ckpt = load_latest(out / "checkpoints")
    assert ckpt.step == 3
    release = verify_release(out / "global_model.fbz", keys / "release.pub")
    assert release["weights_sha256"] == final["weights_sha256"] == arrays_sha256(ckpt.arrays)
    assert release["akida_hash"] == final["server_hash"] and release["sites"] == ["site-0"]
