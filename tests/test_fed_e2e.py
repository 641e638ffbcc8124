"""End to end: 3 simulated sites train a tiny QANA with PACT and the accuracy recipe
(square-root balanced sampler, logit-adjusted loss with each site's prior, 2-view TTA scores;
warm-up, federated calibration, 2 QAT rounds), convert it to Akida, learn on-chip (incl. a
class held out of the federation), write saliency overlays to their own folders and report
sealed metrics that the coordinator decrypts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.fedconfig import parse_config
from common.metrics_crypto import save_metrics_keypair
from common.release import generate_release_keypair, verify_release

pytestmark = pytest.mark.slow


def test_three_sites_reach_identical_akida_models_with_sealed_reports(tmp_path):
    # Prepare
    from client.client_app import app as client_app
    from server.server_app import make_server_app
    from server.simulation import simulate

    keys = tmp_path / "keys"
    save_metrics_keypair(keys / "metrics.key", keys / "metrics.pub")
    generate_release_keypair(keys / "release.key", keys / "release.pub")
    cfg = parse_config({
        "name": "e2e", "data": "synthetic:n=240,size=48,sites=3,seed=1",
        "partition": {"scheme": "natural", "sites": 3},
        "model": {"variant": "qana-akd1000", "size": 48, "width": 0.25, "depth": 1},
        "rounds": {"warmup": 3, "qat": 2}, "local-epochs": 2,
        "batch-size": 16, "lr": 0.003, "qat-lr": 0.0003,
        "calibration-samples": 32, "quorum": {"min-sites": 3, "min-replies": 3},
        "timeouts": {"connect": 300, "round": 900},
        "balance": "sampler", "sampling-power": 0.5, "loss": "logit-adjusted", "tta": 2,
        "edge": {"shots": 3, "neurons-per-class": 1, "new-class": "mel"},
        "metrics-key": str(keys / "metrics.pub"), "seed": 3,
        # SGT is tested per site (test_fed_pact_sgt): with it, this 1-round backbone emitted
        # no spikes for on-chip learning on any site (measured), which the checks below need.
        "pact": {"enabled": True},
        "explain-images": 2,
    })
    out = tmp_path / "run"

    # Execute
    simulate(make_server_app({"scenario-config": cfg, "out-dir": str(out),
                              "metrics-private-key": str(keys / "metrics.key"),
                              "release-private-key": str(keys / "release.key")}),
             client_app, num_sites=3, parallel=2)

    # Assert
    report = json.loads((out / "report.json").read_text())
    assert report["complete"]
    assert [r["phase"] for r in report["rounds"]] == ["warmup"] * 3 + [
        "calibrate", "qat", "qat", "finalize"]
    sites = {"site-0", "site-1", "site-2"}
    for r in report["rounds"]:
        assert set(r["sites"]) == sites, r["phase"]  # every sealed report was decrypted
        assert r["dropped"] == {}
    mel = report["sites"]["site-0"]["class_names"].index("mel")
    for r in report["rounds"]:
        if r["phase"] in ("warmup", "qat"):
            for m in r["sites"].values():
                assert 0.0 <= m["test"]["balanced_accuracy"] <= 1.0
                assert m["train_examples"] > 0
                assert sum(m["test"]["confusion_matrix"][mel]) == 0  # held out of the rounds
                assert "confusion_matrix" in m["local_after_training"]  # labelled apart
            assert r["bytes_received"] > 0 and r["bytes_sent"] > 0
            assert r["global"]["test.pooled"] is True and r["refused"] == {}
    assert set(report["phase_seconds"]) == {"warmup", "calibrate", "qat", "finalize"}
    final = report["final"]
    server_hash = final["server_hash"]
    assert server_hash and (out / "global_model.fbz").is_file()
    meta = json.loads((out / "global_model.fbz.meta.json").read_text())
    assert meta["akida_hash"] == server_hash and len(meta["class_names"]) >= 2
    assert meta["preprocessing"]["colour_constancy"] == "none"
    assert meta["tta"] == 2  # `model evaluate` scores the global model as the sites did
    # The global Akida model learned something: on the union of the sites' test images its
    # balanced accuracy is above chance (1 / classes present).
    union = np.sum([m["akida"]["confusion_matrix"] for m in final["sites"].values()], axis=0)
    present = union.sum(axis=1) > 0
    union_ba = float(np.mean(np.diag(union)[present] / union.sum(axis=1)[present]))
    assert union_ba > 1.0 / present.sum(), (union_ba, union.tolist())
    pooled = report["global"]["akida"]  # the report's global figure is that union's
    assert pooled["balanced_accuracy"] == pytest.approx(union_ba)
    assert pooled["worst_site"]["site"] in sites and pooled["balanced_accuracy_ci"]
    for site, m in final["sites"].items():
        assert m["akida_hash"] == server_hash, site
        assert m["hash_matches"] and m["hash_matches_server"]
        assert m["tta"] == 2
        assert 0.0 <= m["akida"]["balanced_accuracy"] <= 1.0
        assert m["akida"]["num_examples"] > 0
        assert m["akida_agreement"] == 1.0  # conversion is bit-exact
        edge = m["akida_after_edge"]
        assert edge is not None and ("balanced_accuracy" in edge or "error" in edge)
        if "error" in edge:
            continue
        new = m["new_class"]
        assert new["name"] == "mel"
        has_mel_test = report["sites"][site]["test_class_counts"][mel] > 0
        assert new["learned"] == (new["shots"] > 0)
        assert (new["after"]["new"] is not None) == has_mel_test
        assert new["before"]["old"]["num_examples"] == new["after"]["old"]["num_examples"] > 0
    assert any(m["new_class"]["learned"] for m in final["sites"].values()
               if "new_class" in m)
    md = (out / "report.md").read_text()
    assert md.count("site-") >= 3 and "new class" in md.lower()

    # PACT: the global α, trained in warm-up, went through calibration into QAT and finalize
    # with the global arrays (the hashes above match: every site rebuilt the same baked model)
    from common.checkpoint import load_latest

    alphas = {k: float(v) for k, v in load_latest(out / "checkpoints").arrays.items()
              if k.endswith("/alpha")}
    assert alphas and all(a != 6.0 for a in alphas.values()), alphas

    # Saliency: overlays on every site's own disk, linked from report.md, never sent
    for site in sites:
        sal = report["saliency"][site]
        assert sal["images"] == 2 and len(sal["files"]) == 8, sal
        for rel in sal["files"]:
            assert rel.startswith(f"sites/{site}/saliency/") and (out / rel).is_file()
            assert f"({rel})" in md
        assert set(final["sites"][site]["saliency"]) == {"images", "files", "stability"}
        assert len(json.dumps(final["sites"][site]["saliency"])) < 4000
    assert "## Saliency" in md and "## Global model" in md
    # The published global model is signed: its manifest names the run, round and hash
    release = verify_release(out / "global_model.fbz", keys / "release.pub")
    assert release["run_id"] == report["run_id"] and release["round"] == final["step"]
    assert release["akida_hash"] == final["server_hash"] and release["sites"] == sorted(sites)
    model_bytes = max(r["bytes_sent"] for r in report["rounds"]) // 3
    for r in report["rounds"]:  # replies carry at most one model each, overlays never
        assert r["bytes_received"] <= 3 * model_bytes, r["phase"]
    assert final["bytes_received"] == 0
