"""`qanafed model train/evaluate/map/learn` end to end on real HAM10000 images (a small subset)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qanafed.cli import app

#: Images per class taken from the real set (df and vasc have fewer lesions than others).
PER_CLASS = 40


@pytest.fixture(scope="module")
def ham_subset(ham_dir: Path, tmp_path_factory) -> Path:
    """The official HAM10000 layout holding PER_CLASS real images per class (links, no copies)."""
    out = tmp_path_factory.mktemp("ham-subset")
    images = out / "HAM10000_images_part_1"
    images.mkdir()
    with (ham_dir / "HAM10000_metadata.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    taken: dict[str, int] = {}
    keep = []
    for row in rows:
        if taken.get(row["dx"], 0) < PER_CLASS:
            src = next(ham_dir.glob(f"HAM10000_images_part_*/{row['image_id']}.jpg"))
            (images / src.name).symlink_to(src)
            taken[row["dx"]] = taken.get(row["dx"], 0) + 1
            keep.append(row)
    with (out / "HAM10000_metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)
    return out


@pytest.fixture(scope="module")
def trained(ham_subset: Path, tmp_path_factory) -> Path:
    # 3 epochs at lr 1e-3 (27 steps) leave the model untrained on these 280 images: every
    # pre-spike value sits at the 0.5 threshold, the 4-bit model emits no spikes and on-chip
    # learning has nothing to learn from (a clear error, but not what this test is for);
    # 12 epochs at 3e-3 learn (Akida balanced accuracy ~0.5, 49-78 spikes per image)
    out = tmp_path_factory.mktemp("runs") / "ham48"
    result = CliRunner().invoke(app, [
        "model", "train", "--data", str(ham_subset), "--variant", "qana-akd1000",
        "--size", "48", "--width", "0.5", "--epochs", "12", "--lr", "3e-3", "--qat-epochs", "1",
        "--balance", "sampler", "--loss", "logit-adjusted", "--colour", "shades-of-gray",
        "--distill", "--tta", "2", "--min-agreement", "0.99", "--out", str(out), "--json",
    ])
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_a_bit_exact_akida_model_and_all_metrics(trained: Path):
    # Execute
    payload = json.loads((trained / "metrics.json").read_text())
    # Assert
    assert sorted(p.name for p in trained.iterdir()) == [
        "float.h5", "metrics.json", "model.fbz", "model.fbz.meta.json", "model_card.md",
        "quantized.h5", "split.json"]
    assert payload["class_names"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    meta = json.loads((trained / "model.fbz.meta.json").read_text())
    assert meta["preprocessing"]["colour_constancy"] == "shades-of-gray"
    akida = payload["akida"]
    lo, hi = akida["ci95"]["balanced_accuracy"]
    assert lo <= akida["balanced_accuracy"] <= hi and akida["ci95"]["unit"] == "lesion"
    assert akida["tta"]["views"] == ["identity", "flip-lr"]
    assert {"sensitivity", "specificity", "roc_auc"} <= set(akida["per_class"]["mel"])
    assert {"ece", "melanoma", "subgroups", "roc_auc_macro"} <= set(akida)
    assert "site" in akida["subgroups"]
    card = (trained / "model_card.md").read_text()
    assert "not for diagnosis" in card.lower() and "Tschandl" in card
    assert payload["parity"]["top1_agreement"] == 1.0
    assert payload["akida"]["confusion_matrix"] == payload["quantized"]["confusion_matrix"]
    for kind in ("float", "quantized", "akida"):
        assert {"accuracy", "balanced_accuracy", "macro_f1", "per_class"} <= set(payload[kind])


def test_evaluate_map_and_learn_on_the_real_images(trained: Path, ham_subset: Path, tmp_path):
    # Prepare
    runner = CliRunner()
    payload = json.loads((trained / "metrics.json").read_text())
    # Execute
    scored = runner.invoke(app, [
        "model", "evaluate", "--model", str(trained / "model.fbz"), "--data", str(ham_subset),
        "--split", str(trained / "split.json"), "--part", "test", "--tta", "2", "--json",
    ])
    mapped = runner.invoke(app, [
        "model", "map", "--model", str(trained / "model.fbz"), "--device", "akd1000", "--json"])
    learned = runner.invoke(app, [
        "model", "learn", "--model", str(trained / "model.fbz"), "--data", str(ham_subset),
        "--shots", "5", "--out", str(tmp_path / "learned"), "--json",
    ])
    wrong_colour = runner.invoke(app, [
        "model", "evaluate", "--model", str(trained / "model.fbz"), "--data", str(ham_subset),
        "--colour", "none",
    ])
    # Assert: scored with the model's own colour constancy and TTA count, the same figures
    assert scored.exit_code == 0, scored.output
    result = json.loads(scored.stdout)
    assert result["confusion_matrix"] == payload["akida"]["confusion_matrix"]
    assert result["preprocessing"] == {"colour_constancy": "shades-of-gray", "source": "metadata"}
    assert result["ci95"]["balanced_accuracy"] == payload["akida"]["ci95"]["balanced_accuracy"]
    assert wrong_colour.exit_code != 0 and "shades-of-gray" in str(wrong_colour.exception)
    assert mapped.exit_code == 0, mapped.output
    report = json.loads(mapped.stdout)
    assert report["passes"] >= 1 and 0 < report["nps_used"] <= report["nps_available"]
    assert learned.exit_code == 0, learned.output
    record = json.loads(learned.stdout)
    assert record["learning"]["num_classes"] == 7
    assert 0.0 <= record["metrics"]["after"]["old"]["balanced_accuracy"] <= 1.0
