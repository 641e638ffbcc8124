"""Saliency maps of float and quantized models, stability scores, overlays, `model explain`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from common.errors import ConfigError, DataError, ModelError
from common.saliency import (
    explain,
    overlay_png,
    saliency_stability,
    smoothgrad,
    vanilla_gradients,
)
from qanafed.cli import model_explain

DATA = "synthetic:n=240,size=48,sites=3,seed=3"  # = conftest.TINY_RUN_DATA
SIZE = 48


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """The session's tiny `qanafed model train` output folder (qana-akd1000, 48 px)."""
    return tiny_run.out


@pytest.fixture(scope="module")
def models(run_dir):
    float_model, qmodel, meta = model_explain.load_run(run_dir)
    return float_model, qmodel, meta


@pytest.fixture(scope="module")
def images():
    from common.loaders import load_dataset
    from common.preprocess import load_arrays

    ds = load_dataset(DATA)
    return load_arrays(ds, SIZE, np.arange(4)), ds.image_ids[:4]


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test root (keeps `explain` a subcommand)."""

    model_explain.register(app)
    return app


def test_vanilla_and_smoothgrad_maps_for_float_and_quantized_models(models, images):
    # Prepare
    float_model, qmodel, _ = models
    x = images[0][:2]
    # Execute
    maps = {
        (kind, method): fn(model, x)
        for kind, model in (("float", float_model), ("quantized", qmodel))
        for method, fn in (("vanilla", vanilla_gradients),
                           ("smoothgrad", lambda m, a: smoothgrad(m, a, n=2)))
    }
    # Assert: one finite, non-negative, non-trivial map per image, for both models
    for key, sal in maps.items():
        assert sal.shape == (2, SIZE, SIZE), key
        assert np.all(np.isfinite(sal)) and sal.min() >= 0, key
        assert np.mean(sal > 0) > 0.5, key  # quantized: straight-through gradients reach input
    assert not np.allclose(maps["float", "vanilla"], maps["float", "smoothgrad"])


def test_smoothgrad_is_seeded(models, images):
    float_model, _, _ = models
    x, _ = images
    a = smoothgrad(float_model, x[:2], n=2, seed=1)
    b = smoothgrad(float_model, x[:2], n=2, seed=1)
    np.testing.assert_array_equal(a, b)


def test_stability_scores_identical_reversed_and_random_maps():
    # Prepare
    rng = np.random.default_rng(0)
    a = rng.random((3, 10, 10))
    # Execute
    same = saliency_stability(a, a, top_k=0.1)
    reverse = saliency_stability(a, -a, top_k=0.1)
    noise = saliency_stability(a, rng.random((3, 10, 10)), top_k=0.5)
    flat = saliency_stability(a, np.ones_like(a))
    # Assert
    assert same["spearman"]["mean"] == pytest.approx(1.0)
    assert same["top_k_overlap"]["median"] == 1.0 and same["n_images"] == 3
    assert reverse["spearman"]["mean"] == pytest.approx(-1.0)
    assert reverse["top_k_overlap"]["mean"] == 0.0
    assert abs(noise["spearman"]["mean"]) < 0.3 and 0.3 < noise["top_k_overlap"]["mean"] < 0.7
    assert flat["spearman"]["per_image"] == [None] * 3 and flat["spearman"]["mean"] is None


def test_overlay_png_is_written_upscaled(tmp_path):
    # Prepare
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    sal = np.zeros((16, 16))
    sal[4:8, 4:8] = 1.0
    # Execute
    path = overlay_png(image, sal, tmp_path / "o.png")
    # Assert: salient pixels coloured, the rest untouched
    out = np.asarray(Image.open(path))
    assert out.shape == (192, 192, 3)
    assert np.any(out[5 * 12, 5 * 12] != 128) and np.all(out[0, 0] == 128)


def test_explain_writes_overlays_and_summary(tmp_path, models, images):
    # Prepare
    float_model, qmodel, meta = models
    x, ids = images
    out = tmp_path / "explained"
    # Execute
    summary = explain(float_model, qmodel, x, ids, out, ("vanilla",),
                      class_names=meta["class_names"])
    # Assert
    pngs = sorted(p.name for p in (out / "vanilla").iterdir())
    assert pngs == sorted(f"{i}_{k}.png" for i in ids for k in ("float", "quantized"))
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    stats = summary["stability"]["vanilla"]
    assert -1.0 <= stats["spearman"]["mean"] <= 1.0
    assert 0.0 <= stats["top_k_overlap"]["mean"] <= 1.0
    assert summary["gradients"]["vanilla"]["quantized"]["finite"]
    assert {row["float_pred"] for row in summary["images"]} <= set(meta["class_names"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_wrong_image_size_is_refused_naming_the_expected_size(models):
    float_model, qmodel, _ = models
    small = np.zeros((2, 32, 32, 3), dtype=np.float32)
    with pytest.raises(DataError, match="48×48"):
        vanilla_gradients(float_model, small)
    with pytest.raises(DataError, match="48×48"):
        explain(float_model, qmodel, small, ["a", "b"], "unused")


def test_cli_explain_writes_overlays_and_stability_json(tmp_path, run_dir):
    # Execute
    out = tmp_path / "cli"
    result = CliRunner().invoke(_cli(), [
        "explain", "--model", str(run_dir), "--data", DATA, "--out", str(out), "--n", "2",
        "--methods", "vanilla,smoothgrad", "--smoothgrad-n", "1", "--json",
    ])
    # Assert
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_images"] == 2 and set(summary["stability"]) == {"vanilla", "smoothgrad"}
    for method in ("vanilla", "smoothgrad"):
        assert len(list((out / method).glob("*_float.png"))) == 2
        assert len(list((out / method).glob("*_quantized.png"))) == 2
    assert json.loads((out / "summary.json").read_text()) == summary


def test_cli_refuses_a_folder_with_only_the_akida_model(tmp_path, run_dir):
    # Prepare
    only_fbz = tmp_path / "akida_only"
    only_fbz.mkdir()
    (only_fbz / "model.fbz").write_bytes((run_dir / "model.fbz").read_bytes())
    (only_fbz / "metrics.json").write_text((run_dir / "metrics.json").read_text())
    # Execute
    result = CliRunner().invoke(_cli(), [
        "explain", "--model", str(only_fbz), "--data", DATA, "--out", str(tmp_path / "o"),
    ])
    # Assert
    assert isinstance(result.exception, ModelError)
    assert "float.h5" in str(result.exception) and "model.fbz alone" in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_cli_refuses_unknown_method(tmp_path, run_dir):
    result = CliRunner().invoke(_cli(), [
        "explain", "--model", str(run_dir), "--data", DATA, "--out", str(tmp_path / "o"),
        "--methods", "vanilla,gradcam",
    ])
    assert isinstance(result.exception, ConfigError)
