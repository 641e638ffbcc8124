"""Global figures are those of the union of the sites' test images (summed confusion matrices),
never a mean of site scores; every report names the worst site and the spread, with intervals."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics import classification_metrics
from common.pooled import pooled_scores
from server.reports import build_report, global_summary, report_markdown

NAMES = ("akiec", "bcc", "nv")


def _block(y_true: list[int], y_pred: list[int]) -> dict:
    return classification_metrics(y_true, y_pred, NAMES)


def _sites() -> dict[str, dict]:
    """A big nv-only site scoring 0.9, a small mixed site scoring 1/3 (from predictions)."""
    big = _block([2] * 90, [2] * 81 + [0] * 9)  # recall nv 0.9; balanced accuracy 0.9
    small = _block([0] * 4 + [1] * 4 + [2] * 2, [2] * 4 + [2] * 4 + [2] * 2)  # 1/3
    return {"big": {"test": big, "train_loss": 1.0, "train_examples": 10},
            "small": {"test": small, "train_loss": 2.0, "train_examples": 10}}


def test_global_balanced_accuracy_is_the_pooled_confusion_matrix_not_the_site_mean():
    # Prepare
    sites = _sites()
    union = classification_metrics(
        [2] * 90 + [0] * 4 + [1] * 4 + [2] * 2,
        [2] * 81 + [0] * 9 + [2] * 4 + [2] * 4 + [2] * 2, NAMES)

    # Execute
    g = global_summary(sites)

    # Assert: the union's figures, by hand: recalls akiec 0, bcc 0, nv 83/92
    assert g["test.balanced_accuracy"] == pytest.approx(union["balanced_accuracy"])
    assert g["test.balanced_accuracy"] == pytest.approx((0 + 0 + 83 / 92) / 3)
    assert g["test.macro_f1"] == pytest.approx(union["macro_f1"])
    assert g["test.accuracy"] == pytest.approx(83 / 100)
    weighted_mean = (0.9 * 90 + (1 / 3) * 10) / 100
    assert abs(g["test.balanced_accuracy"] - weighted_mean) > 0.5
    assert g["test.pooled"] is True
    # the worst site, the spread and 95 % intervals come with it
    assert g["test.worst_site"] == "small"
    assert g["test.worst_site_balanced_accuracy"] == pytest.approx(1 / 3)
    assert g["test.spread"] == pytest.approx(0.9 - 1 / 3)
    lo, hi = g["test.balanced_accuracy_ci"]
    assert lo <= g["test.balanced_accuracy"] <= hi and hi - lo > 0
    lo, hi = g["test.worst_site_balanced_accuracy_ci"]
    assert lo <= 1 / 3 <= hi
    assert g["train_loss"] == pytest.approx(1.5)


def test_pooled_scores_are_reproducible_and_per_site():
    cms = {s: m["test"]["confusion_matrix"] for s, m in _sites().items()}
    a, b = pooled_scores(cms), pooled_scores(cms)
    assert a == b  # fixed seed: a resumed run reports the same intervals
    assert a["confusion_matrix"] == np.sum(list(cms.values()), axis=0).tolist()
    assert a["sites"]["big"]["balanced_accuracy"] == pytest.approx(0.9)
    assert a["spread"] == {"min": pytest.approx(1 / 3), "max": pytest.approx(0.9),
                           "range": pytest.approx(0.9 - 1 / 3)}
    with pytest.raises(ValueError, match="one shape"):
        pooled_scores({"a": np.eye(2, dtype=int), "b": np.eye(3, dtype=int)})


def test_every_report_shows_the_union_worst_site_and_spread():
    # Prepare: a run whose final round scored the Akida model at two sites
    sites = _sites()
    final_sites = {s: {"akida": m["test"], "akida_hash": "h", "hash_matches": True}
                   for s, m in sites.items()}
    rounds = [
        {"step": 1, "phase": "warmup", "index": 1, "seconds": 1.0, "bytes_sent": 1,
         "bytes_received": 1, "sites": sites, "dropped": {}, "global": global_summary(sites)},
        {"step": 2, "phase": "finalize", "index": 1, "seconds": 1.0, "bytes_sent": 1,
         "bytes_received": 0, "sites": final_sites, "dropped": {},
         "global": global_summary(final_sites), "server_hash": "h"},
    ]
    state = {"run-id": "r", "scenario": {"name": "s", "model": {}, "strategy": {}},
             "rounds": rounds, "sites": {}, "phase-seconds": {}}

    # Execute
    report = build_report(state)
    md = report_markdown(report)

    # Assert: report.json keeps its keys and adds the pooled final model
    assert {"run_id", "scenario", "complete", "sites", "rounds", "final", "phase_seconds",
            "wall_seconds", "saliency", "global"} <= set(report)
    akida = report["global"]["akida"]
    assert akida["balanced_accuracy"] == pytest.approx((83 / 92) / 3)
    assert akida["worst_site"]["site"] == "small" and akida["spread"]["range"] > 0.5
    assert report["final"]["global"]["akida.worst_site"] == "small"
    # ... and report.md shows them next to the global figure
    assert "## Global model" in md
    row = next(line for line in md.splitlines() if line.startswith("| Akida model |"))
    assert f"{akida['balanced_accuracy']:.3f} [" in row and "| small | 0.333 [" in row
    assert "0.567 (0.333–0.900)" in row
    round_row = next(line for line in md.splitlines() if line.startswith("| 1 | warmup |"))
    assert "small 0.333" in round_row and "| 0.567 |" in round_row


def test_matrices_that_cannot_be_summed_fall_back_to_the_site_mean_without_losing_the_round():
    sites = _sites()
    sites["other"] = {"test": classification_metrics([0, 1], [0, 1], ("a", "b"))}
    g = global_summary(sites)
    assert g["test.pooled"] is False and "test.worst_site" not in g
    assert 0 < g["test.balanced_accuracy"] < 1
