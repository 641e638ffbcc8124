import json
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.clinical import (
    ECE_BINS,
    age_band,
    clinical_metrics,
    softmax,
    subgroups_from_metadata,
)
from common.dataset import LesionDataset
from common.errors import ConfigError, DataError
from common.metrics import classification_metrics
from common.model_card import MODEL_CARD_NAME, write_model_card

AB = ("a", "b")


def probs_for(pred: np.ndarray, n_classes: int, conf: float = 0.7) -> np.ndarray:
    """Probabilities whose argmax is ``pred``: ``conf`` there, the rest spread evenly."""
    p = np.full((len(pred), n_classes), (1 - conf) / (n_classes - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def half_wrong(n_lesions: int, images_per_lesion: int = 2) -> tuple[np.ndarray, ...]:
    """Two balanced classes; every second lesion of each class is predicted wrong (BA 0.5)."""
    lesion_class = np.arange(n_lesions) % 2
    lesion_wrong = (np.arange(n_lesions) // 2) % 2 == 1
    y = np.repeat(lesion_class, images_per_lesion)
    pred = np.where(np.repeat(lesion_wrong, images_per_lesion), 1 - y, y)
    lesions = np.repeat([f"L{i}" for i in range(n_lesions)], images_per_lesion)
    return y, probs_for(pred, 2), lesions


# ---------------------------------------------------------------- bootstrap CI


def test_perfect_predictions_give_a_point_interval():
    # Prepare
    y = np.array([0, 1, 2, 0, 1, 2, 2, 1])
    p, names = probs_for(y, 3), ("a", "b", "c")
    lesions = np.array(["x", "x", "y", "z", "w", "v", "v", "u"])

    # Execute
    by_lesion = clinical_metrics(y, p, names, lesion_ids=lesions, n_boot=200)
    by_image = clinical_metrics(y, p, names, n_boot=200)

    # Assert
    assert by_lesion["ci95"]["balanced_accuracy"] == [1.0, 1.0]
    assert by_lesion["ci95"]["macro_f1"] == [1.0, 1.0]
    assert by_lesion["ci95"]["unit"] == "lesion" and by_lesion["ci95"]["n_units"] == 6
    assert by_image["ci95"]["unit"] == "image" and by_image["ci95"]["n_units"] == 8
    assert by_image["ci95"]["n_boot"] == 200


def test_ci_contains_the_true_value_and_narrows_with_more_lesions():
    # Prepare: half of the lesions of each class wrong, so balanced accuracy is exactly 0.5
    small = half_wrong(40)
    large = half_wrong(400)

    # Execute
    m_small = clinical_metrics(small[0], small[1], AB, lesion_ids=small[2], seed=1)
    m_large = clinical_metrics(large[0], large[1], AB, lesion_ids=large[2], seed=1)

    # Assert
    for m in (m_small, m_large):
        lo, hi = m["ci95"]["balanced_accuracy"]
        assert m["balanced_accuracy"] == pytest.approx(0.5)
        assert lo < 0.5 < hi
    width_small = np.diff(m_small["ci95"]["balanced_accuracy"])[0]
    width_large = np.diff(m_large["ci95"]["balanced_accuracy"])[0]
    assert width_large < width_small / 2  # ~1/sqrt(10) in theory


def test_lesion_resampling_keeps_the_images_of_a_lesion_together():
    # Prepare: 90 correct single-image lesions and one lesion of 10 identical wrong images
    y = np.array([0, 1] * 45 + [0] * 10)
    pred = np.concatenate([y[:90], np.ones(10, dtype=int)])
    lesions = np.array([f"L{i:03d}" for i in range(90)] + ["BIG"] * 10)

    # Execute
    by_lesion = clinical_metrics(y, probs_for(pred, 2), AB, lesion_ids=lesions, seed=3)
    by_image = clinical_metrics(y, probs_for(pred, 2), AB, seed=3)

    # Assert: the 10 errors move together, so the lesion interval is much wider
    assert by_lesion["balanced_accuracy"] == by_image["balanced_accuracy"]
    lesion_width = np.diff(by_lesion["ci95"]["balanced_accuracy"])[0]
    image_width = np.diff(by_image["ci95"]["balanced_accuracy"])[0]
    assert lesion_width > 1.5 * image_width


def test_one_image_per_lesion_resamples_like_images():
    # Prepare: lesion ids whose sorted order is the image order
    y, p, _ = half_wrong(60, images_per_lesion=1)
    lesions = np.array([f"L{i:03d}" for i in range(60)])

    # Execute
    by_lesion = clinical_metrics(y, p, AB, lesion_ids=lesions, n_boot=300, seed=7)
    by_image = clinical_metrics(y, p, AB, n_boot=300, seed=7)

    # Assert: the same draws, so the same intervals
    assert by_lesion["ci95"]["balanced_accuracy"] == by_image["ci95"]["balanced_accuracy"]
    assert by_lesion["ci95"]["macro_f1"] == by_image["ci95"]["macro_f1"]


def test_bootstrap_is_seeded_and_fast():
    # Prepare: 1,500 images of 7 classes from ~600 lesions
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 1500)
    logits = rng.normal(size=(1500, 7))
    logits[np.arange(1500), y] += 1.5
    p = softmax(logits)
    lesions = rng.integers(0, 600, 1500).astype(str)
    names = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    clinical_metrics(y[:20], p[:20], names, n_boot=5)  # warm-up: sklearn imports

    # Execute: CPU time of this process, which other work on the machine does not stretch
    t0 = time.process_time()
    first = clinical_metrics(y, p, names, lesion_ids=lesions, n_boot=1000, seed=5)
    seconds = time.process_time() - t0
    again = clinical_metrics(y, p, names, lesion_ids=lesions, n_boot=1000, seed=5)
    other = clinical_metrics(y, p, names, lesion_ids=lesions, n_boot=1000, seed=6)

    # Assert
    assert seconds < 2.0
    assert first["ci95"] == again["ci95"]
    assert first["ci95"]["balanced_accuracy"] != other["ci95"]["balanced_accuracy"]
    lo, hi = first["ci95"]["macro_f1"]
    assert lo < first["macro_f1"] < hi


# ---------------------------------------------------------------- per class and melanoma


def test_per_class_sensitivity_specificity_and_auc_match_hand_computation():
    # Prepare: class "d" never occurs
    names = ("a", "b", "c", "d")
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0, 1])
    p = np.zeros((10, 4))
    p[:, :3] = probs_for(pred, 3)

    # Execute
    m = clinical_metrics(y, p, names, n_boot=10)

    # Assert: everything classification_metrics gives is kept
    base = classification_metrics(y, pred, names)
    for key, value in base.items():
        if key != "per_class":
            assert m[key] == value
    pc = m["per_class"]
    assert pc["a"]["precision"] == base["per_class"]["a"]["precision"]
    # specificity = TN / negatives: a 6/7 (image 8 called a), b 6/8 (2 and 9), c 4/5 (4)
    assert pc["a"]["specificity"] == pytest.approx(6 / 7)
    assert pc["b"]["specificity"] == pytest.approx(6 / 8)
    assert pc["c"]["specificity"] == pytest.approx(4 / 5)
    assert pc["d"]["specificity"] == 1.0
    assert [pc[c]["sensitivity"] for c in "abc"] == pytest.approx([2 / 3, 1 / 2, 3 / 5])
    assert pc["d"]["sensitivity"] is None and pc["d"]["roc_auc"] is None
    aucs = [roc_auc_score(y == k, p[:, k]) for k in range(3)]
    assert [pc[c]["roc_auc"] for c in "abc"] == pytest.approx(aucs)
    assert m["roc_auc_macro"] == pytest.approx(np.mean(aucs))


def test_a_class_that_is_the_only_one_has_no_specificity_or_auc():
    # Execute
    m = clinical_metrics([0, 0, 0], probs_for(np.array([0, 0, 1]), 2), AB, n_boot=5)

    # Assert
    assert m["per_class"]["a"]["specificity"] is None
    assert m["per_class"]["a"]["roc_auc"] is None
    assert m["roc_auc_macro"] is None


def test_melanoma_sensitivity_at_fixed_specificity():
    # Prepare: mel score of 10 melanomas and 20 nevi
    mel = [0.95, 0.85, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.165, 0.05]
    nv = [0.01 * i for i in range(1, 19)] + [0.9, 0.55]
    score = np.array(mel + nv)
    y = np.array([0] * 10 + [1] * 20)
    p = np.stack([score, 1 - score], axis=1)

    # Execute
    m = clinical_metrics(y, p, ("mel", "nv"), n_boot=10)

    # Assert: 90% spec allows 2 false positives (0.9, 0.55): mel >= 0.2 is 8 of 10;
    # 80% spec allows 4 (adds 0.18, 0.17): mel >= 0.165 is 9 of 10
    op = m["melanoma"]
    assert op["reason"] is None and op["positive_class"] == "mel"
    assert op["sensitivity_at_90_specificity"] == pytest.approx(0.8)
    assert op["threshold_at_90_specificity"] == pytest.approx(0.2)
    assert op["sensitivity_at_80_specificity"] == pytest.approx(0.9)
    assert op["threshold_at_80_specificity"] == pytest.approx(0.165)
    assert op["auc"] == pytest.approx(roc_auc_score(y == 0, score))


def test_melanoma_block_says_why_it_is_missing():
    # Prepare
    y = np.array([0, 1, 0, 1])
    p = probs_for(y, 2)

    # Execute
    no_class = clinical_metrics(y, p, AB, n_boot=5)["melanoma"]
    absent = clinical_metrics(y, np.c_[p, np.zeros(4)], ("a", "b", "mel"), n_boot=5)["melanoma"]

    # Assert
    assert "'mel' is not among the classes" in no_class["reason"]
    assert "no 'mel' image" in absent["reason"]
    assert absent["sensitivity_at_90_specificity"] is None and absent["auc"] is None


# ---------------------------------------------------------------- calibration


def test_ece_matches_hand_computation():
    # Prepare: confidences 0.9 (right), 0.9 (wrong), 0.7 (right), 0.7 (right)
    y = np.array([0, 1, 0, 1])
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.7, 0.3], [0.3, 0.7]])

    # Execute
    m = clinical_metrics(y, p, AB, n_boot=5)

    # Assert: bin of 0.9: |0.5 - 0.9| * 2/4 = 0.2; bin of 0.7: |1 - 0.7| * 2/4 = 0.15
    assert m["ece"] == pytest.approx(0.35)
    assert m["ece_bins"] == ECE_BINS == 15


def test_ece_is_zero_when_confidence_equals_accuracy():
    # Prepare: 4 images at confidence 0.75, 3 of them right
    y = np.array([0, 0, 0, 1])
    p = np.tile([0.75, 0.25], (4, 1))

    # Execute / Assert
    assert clinical_metrics(y, p, AB, n_boot=5)["ece"] == pytest.approx(0.0)


# ---------------------------------------------------------------- subgroups


def test_subgroup_metrics_and_skip_rule():
    # Prepare: sites a (40), b (35), c (10) and 5 unknown spelled three ways
    rng = np.random.default_rng(2)
    sites = np.array(["a"] * 40 + ["b"] * 35 + ["c"] * 10 + ["", "unknown", None, "", " "], object)
    y = rng.integers(0, 3, len(sites))
    pred = np.where(rng.random(len(sites)) < 0.7, y, (y + 1) % 3)
    names = ("x", "y", "z")

    # Execute
    m = clinical_metrics(y, probs_for(pred, 3), names, subgroups={"site": sites}, n_boot=5)

    # Assert
    site = m["subgroups"]["site"]
    assert set(site["values"]) == {"a", "b"}
    for value in ("a", "b"):
        mask = sites == value
        ref = classification_metrics(y[mask], pred[mask], names)
        assert site["values"][value]["n"] == int(mask.sum())
        assert site["values"][value]["balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"])
        assert site["values"][value]["macro_f1"] == pytest.approx(ref["macro_f1"])
    assert site["skipped"] == {
        "c": {"n": 10, "reason": "fewer than 30 images"},
        "unknown": {"n": 5, "reason": "fewer than 30 images"},
    }


def test_subgroup_threshold_is_configurable_and_absent_subgroups_give_empty_dict():
    # Prepare
    y = np.array([0, 1] * 5)
    sex = np.array(["male"] * 6 + ["female"] * 4)

    # Execute
    m = clinical_metrics(y, probs_for(y, 2), AB, subgroups={"sex": sex}, min_subgroup=5, n_boot=5)
    none = clinical_metrics(y, probs_for(y, 2), AB, n_boot=5)

    # Assert
    assert m["subgroups"]["sex"]["values"]["male"] == {
        "n": 6,
        "balanced_accuracy": 1.0,
        "macro_f1": 1.0,
    }
    assert m["subgroups"]["sex"]["skipped"]["female"] == {"n": 4, "reason": "fewer than 5 images"}
    assert none["subgroups"] == {}


@pytest.mark.parametrize(
    ("age", "band"),
    [
        (None, "unknown"),
        ("", "unknown"),
        ("nan", "unknown"),
        (float("nan"), "unknown"),
        ("abc", "unknown"),
        (-5, "unknown"),
        (0, "<30"),
        ("29.9", "<30"),
        ("30", "30-44"),
        (44.0, "30-44"),
        ("45.0", "45-59"),
        (59, "45-59"),
        (60, "60-74"),
        (74.5, "60-74"),
        (75, "75+"),
        (" 85.0 ", "75+"),
    ],
)
def test_age_band(age, band):
    assert age_band(age) == band


def test_subgroups_from_ham10000_metadata():
    # Prepare: a LesionDataset as the HAM10000 loader builds it
    ds = LesionDataset(
        images=("i0.jpg", "i1.jpg", "i2.jpg"),
        labels=np.array([0, 1, 0]),
        class_names=AB,
        lesion_ids=np.array(["L0", "L0", "L1"]),
        sites=np.array(["rosendahl", "vidir_modern", ""]),
        image_ids=np.array(["i0", "i1", "i2"]),
        metadata=(
            {"dx_type": "histo", "age": "45.0", "sex": "male", "localization": "back"},
            {"dx_type": "histo", "age": "", "sex": "unknown", "localization": "face"},
            {"dx_type": "histo", "age": "80.0", "sex": "female", "localization": ""},
        ),
        format="ham10000",
    )

    # Execute
    groups = subgroups_from_metadata(ds.sites, ds.metadata)

    # Assert
    assert set(groups) == {"site", "sex", "age_band", "localization"}
    assert groups["site"].tolist() == ["rosendahl", "vidir_modern", "unknown"]
    assert groups["sex"].tolist() == ["male", "unknown", "female"]
    assert groups["age_band"].tolist() == ["45-59", "unknown", "75+"]
    assert groups["localization"].tolist() == ["back", "face", "unknown"]


def test_subgroups_from_metadata_include_only_existing_columns():
    # Execute
    folders = subgroups_from_metadata(np.array(["unknown", "unknown"]), ())
    isic = subgroups_from_metadata(
        ["s", "s"], ({"age_approx": "35", "anatom_site_general": "torso"}, {"score_weight": "1"})
    )

    # Assert
    assert list(folders) == ["site"]
    assert set(isic) == {"site", "age_band", "localization"}
    assert isic["age_band"].tolist() == ["30-44", "unknown"]
    assert isic["localization"].tolist() == ["torso", "unknown"]
    with pytest.raises(DataError, match="metadata has 1 rows but sites has 2"):
        subgroups_from_metadata(["s", "s"], ({"sex": "male"},))


# ---------------------------------------------------------------- softmax and bad input


def test_softmax_is_stable_and_normalised():
    # Execute
    p = softmax([[1000.0, 1000.0, -1000.0], [0.0, np.log(3.0), 0.0]])

    # Assert
    assert p[0] == pytest.approx([0.5, 0.5, 0.0])
    assert p[1] == pytest.approx([0.2, 0.6, 0.2])
    assert np.allclose(p.sum(axis=1), 1.0)


def test_bad_input_is_refused_with_a_fix():
    y = np.array([0, 1, 1])
    p = probs_for(y, 2)
    with pytest.raises(DataError, match=r"shape \(3, 3\), expected \(N, 2\)"):
        clinical_metrics(y, probs_for(y, 3), AB)
    with pytest.raises(DataError, match="1 rows with NaN"):
        clinical_metrics(y, np.r_[p[:2], [[np.nan, 0.5]]], AB)
    with pytest.raises(DataError, match="y_true has shape \\(2,\\) but probs has 3 rows"):
        clinical_metrics(y[:2], p, AB)
    with pytest.raises(DataError, match="lesion_ids has 2 entries for 3 images"):
        clinical_metrics(y, p, AB, lesion_ids=["a", "b"])
    with pytest.raises(ConfigError, match="n_boot=0"):
        clinical_metrics(y, p, AB, n_boot=0)
    with pytest.raises(ConfigError, match="min_subgroup=0"):
        clinical_metrics(y, p, AB, min_subgroup=0)
    with pytest.raises(DataError, match="softmax") as err:
        clinical_metrics(y, np.array([[2.0, -1.0], [0.5, 3.0], [1.0, 1.0]]), AB)
    assert err.value.fix is not None
    with pytest.raises(DataError, match="labels in 0..2 but only 2 classes"):
        clinical_metrics([0, 1, 2], p, AB)
    with pytest.raises(DataError, match="subgroup 'site' has 1 values for 3 images"):
        clinical_metrics(y, p, AB, subgroups={"site": ["a"]})
    with pytest.raises(DataError, match="no examples"):
        clinical_metrics([], np.zeros((0, 2)), AB)


# ---------------------------------------------------------------- model card


def full_payload() -> dict:
    """A run payload as run_training writes it, with clinical metrics for all three models."""
    rng = np.random.default_rng(4)
    names = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    y = rng.choice(7, 300, p=[0.03, 0.05, 0.11, 0.01, 0.11, 0.68, 0.01])
    lesions = rng.integers(0, 200, 300).astype(str)
    groups = {"site": rng.choice(["rosendahl", "vidir_modern", "vidir_molemax", "x"], 300)}
    groups["site"][:5] = "tiny"
    metrics = {}
    for model, boost in (("float", 2.0), ("quantized", 1.8), ("akida", 1.7)):
        logits = rng.normal(size=(300, 7))
        logits[np.arange(300), y] += boost
        metrics[model] = clinical_metrics(
            y, softmax(logits), names, lesion_ids=lesions, subgroups=groups, n_boot=200
        )
    counts = {s: {c: 10 for c in names} for s in ("train", "val", "test")}
    return {
        "variant": "qana-akd1000",
        "size": 64,
        "class_names": list(names),
        "config": {"variant": "qana-akd1000", "epochs": 20, "balance": "smote", "lr": 1e-3},
        "data": {"format": "ham10000", "images_in": 10015, "split_counts": counts},
        "split": {"train": 7000, "val": 1500, "test": 1515},
        "preprocessing": {"colour_constancy": "shades of grey (p=6)", "size": "64x64 px"},
        "tta": 4,
        **metrics,
    }


def test_model_card_from_a_full_payload(tmp_path):
    # Prepare: through JSON, as metrics.json is read back
    payload = json.loads(json.dumps(full_payload(), allow_nan=False))

    # Execute
    path = write_model_card(tmp_path / "run", payload)

    # Assert
    text = path.read_text()
    assert path == tmp_path / "run" / MODEL_CARD_NAME
    assert text.startswith("# Model card: qana-akd1000 (64x64 px)")
    assert "research only, not for diagnosis; not a medical device" in text
    assert "Tschandl" in text and "CC BY-NC 4.0" in text
    assert "shades of grey (p=6)" in text and "4 views" in text
    assert "| epochs | 20 |" in text
    ba = payload["akida"]["balanced_accuracy"]
    lo, hi = payload["akida"]["ci95"]["balanced_accuracy"]
    assert f"| Akida | {ba:.3f} [{lo:.3f}, {hi:.3f}] |" in text
    for label in ("float (Keras)", "quantized (QuantizeML)"):
        assert f"| {label} |" in text
    assert "4-bit weights and activations" in text
    assert "percentile bootstrap over lesions, 200 resamples" in text
    assert "## Per-class metrics (Akida)" in text and "specificity" in text
    assert "### site" in text and "tiny (5 images: fewer than 30 images)" in text
    assert "## Known limits" in text and "external data" in text
    assert [p.name for p in path.parent.iterdir()] == [MODEL_CARD_NAME]  # no temporary left


def test_model_card_from_a_minimal_payload_says_na(tmp_path):
    # Prepare: only Akida metrics, without CI or clinical keys; a card already there
    target = tmp_path / "card.md"
    target.write_text("old")
    payload = {"akida": {"balanced_accuracy": 0.61, "macro_f1": 0.5, "accuracy": 0.7}}

    # Execute
    path = write_model_card(target, payload)
    empty = write_model_card(tmp_path / "empty", {})

    # Assert
    text = path.read_text()
    assert path == target and text != "old"
    assert "# Model card: n/a (input size n/a)" in text
    assert "| Akida | 0.610 [CI n/a] | 0.500 [CI n/a] | 0.700 | n/a | n/a | n/a | n/a |" in text
    assert "Not evaluated: float (Keras), quantized (QuantizeML)." in text
    assert "low-bit quantized weights" in text
    assert "Tschandl" not in text
    assert "not a medical device" in empty.read_text()
    assert "n/a (no float, quantized or Akida metrics in this run)" in empty.read_text()
