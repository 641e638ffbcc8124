"""PTQ vs QAT study: every arm on one split, the table, the targets, `qanafed model study`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from common.errors import ConfigError, DataError
from common.study import ARMS, run_study, study_targets
from common.train import SplitArrays, TrainConfig
from qanafed.cli import app

DATA = "synthetic:n=120,size=48,sites=2,seed=1"
ROW_KEYS = {"arm", "bits", "float_stage", "convertible", "scored", "balanced_accuracy",
            "macro_f1", "delta_vs_float", "size_bytes", "size_kind", "latency_ms",
            "saliency_stability", "seconds"}


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """`qanafed model study` of every arm on a tiny synthetic set (48 px, 1 + 1 epochs)."""
    out = tmp_path_factory.mktemp("study") / "out"
    result = CliRunner().invoke(app, [
        "model", "study", "--data", DATA, "--out", str(out), "--size", "48", "--width", "0.25",
        "--epochs", "1", "--qat-epochs", "1", "--bits", "8,4", "--qat-bits", "4",
        "--balance", "none", "--saliency-images", "8", "--json",
    ])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_study_cli_writes_json_and_table_atomically(study_run):
    out, printed = study_run
    assert sorted(p.name for p in out.iterdir()) == ["split.json", "study.json", "study.md"]
    assert json.loads((out / "study.json").read_text())["rows"] == printed["rows"]
    md = (out / "study.md").read_text()
    assert "| arm | bits |" in md and "Targets:" in md
    for arm in ARMS:
        assert f"| {arm} |" in md
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_study_has_every_arm_with_the_expected_keys(study_run):
    _, study = study_run
    rows = {(r["arm"], r["bits"]): r for r in study["rows"]}
    expected = {("float", 32), ("float+pact", 32), ("float+sgt", 32), ("float+pact+sgt", 32),
                ("ptq", 8), ("ptq", 4), ("qat", 4), ("qat+pact", 4), ("qat+sgt", 4),
                ("qat+pact+sgt", 4)}
    assert set(rows) == expected
    for key, row in rows.items():
        assert "error" not in row, (key, row.get("error"))
        assert ROW_KEYS <= set(row), key
        assert 0.0 <= row["balanced_accuracy"] <= 1.0 and row["size_bytes"] > 0
        assert row["latency_ms"]["keras"]["1"] > 0 and row["latency_ms"]["keras"]["32"] > 0
    assert rows[("float", 32)]["delta_vs_float"] == 0.0
    assert rows[("float", 32)]["saliency_stability"] is None
    # 8-bit weights do not convert for Akida 1.0: scored as the quantized Keras model
    assert rows[("ptq", 8)]["convertible"] is False
    assert rows[("ptq", 8)]["scored"] == "keras-quantized" and "1, 2, 4" in rows[("ptq", 8)]["note"]
    for arm in ("ptq", "qat", "qat+pact", "qat+sgt", "qat+pact+sgt"):
        row = rows[(arm, 4)]
        assert row["convertible"] is True and row["scored"] == "akida", arm
        assert row["size_kind"] == "akida-fbz" and row["latency_ms"]["akida"]["1"] > 0
        rho = row["saliency_stability"]["spearman"]
        assert rho is None or -1.0 <= rho <= 1.0
    # float stages are shared: PTQ and plain QAT build on the plain float model
    assert rows[("ptq", 4)]["float_stage"] == rows[("qat", 4)]["float_stage"] == "float"
    assert rows[("qat+pact+sgt", 4)]["float_stage"] == "float+pact+sgt"
    assert "pact_alphas" in rows[("float+pact", 32)]["training"]["float"]
    assert rows[("qat+pact", 4)]["quantized_weight_bytes"] < rows[("ptq", 8)][
        "quantized_weight_bytes"]
    assert set(study["targets"]) == {"qat_pact_loss", "sgt_stability"}
    assert isinstance(study["targets"]["qat_pact_loss"]["met"], bool)


def _arrays(size: int = 48) -> SplitArrays:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, size, size, 3)).astype(np.uint8)
    y = np.arange(6) % 2
    return SplitArrays(x, y, x, y, x, y, class_names=("a", "b"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [({"arms": ("qat+magic",)}, ConfigError, "qat\\+magic"),
     ({"bits": (16,)}, ConfigError, "bits=16"),
     ({"bits": ()}, ConfigError, "no bit widths")],
)
def test_bad_study_options_are_refused_before_training(kwargs, error, match):
    with pytest.raises(error, match=match):
        run_study(_arrays(), TrainConfig(size=48, width=0.25), **kwargs)


def test_images_of_the_wrong_size_are_refused():
    with pytest.raises(DataError, match=r"x_train images have shape \(6, 64, 64, 3\).*size=48"):
        run_study(_arrays(64), TrainConfig(size=48, width=0.25))


def test_targets_are_judged_on_the_4_bit_rows():
    def row(arm, delta, rho):
        return {"arm": arm, "bits": 4, "delta_vs_float": delta,
                "saliency_stability": {"spearman": rho, "top_k_overlap": 0.5}}

    rows = [row("qat", -3.0, 0.40), row("qat+pact", -0.8, 0.50), row("qat+sgt", -2.0, 0.45),
            row("qat+pact+sgt", -1.5, 0.48)]
    targets = study_targets(rows)
    assert targets["qat_pact_loss"] == {"bits": 4, "max_loss_points": 1.0,
                                        "delta_vs_float": -0.8, "met": True}
    # qat+sgt beats qat, but qat+pact+sgt does not beat qat+pact: not met
    assert [p["improved"] for p in targets["sgt_stability"]["pairs"]] == [True, False]
    assert targets["sgt_stability"]["met"] is False
    assert study_targets(rows[:1])["qat_pact_loss"]["met"] is None
