"""Lesion masks (common.masks), saliency-in-lesion scores, their `data inspect`/`explain` use."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from common.errors import DataError
from common.loaders import detect_format, load_dataset
from common.masks import MASK_DIR, load_masks, mask_paths
from common.preprocess import load_arrays
from common.saliency import saliency_in_lesion, saliency_in_lesion_batch
from qanafed.cli import app

HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]
#: Image size of the synthetic folder: landscape, so the centre crop drops 5 columns each side.
WIDTH, HEIGHT = 40, 30


def _lesion(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """Lesion = left half of the centred square (columns 5..19 of a 40×30 image)."""
    mask = np.zeros((height, width), dtype=bool)
    left = (width - height) // 2
    mask[:, left : left + height // 2] = True
    return mask


def _make_ham(root: Path, size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    """A 5-image HAM10000 folder with masks: 0–2 good, 3 without mask, 4 with a 20×20 mask."""
    part = root / "HAM10000_images_part_1"
    masks = root / MASK_DIR
    part.mkdir(parents=True)
    masks.mkdir()
    width, height = size
    lesion = _lesion(width, height)
    rows = []
    for i in range(5):
        image_id = f"ISIC_{i:07d}"
        rows.append([f"HAM_{i}", image_id, ["nv", "mel", "bkl", "nv", "bcc"][i], "histo", "50",
                     "male", "back", "rosendahl"])
        pixels = np.full((height, width, 3), 60, dtype=np.uint8)
        pixels[lesion, 0] = 250  # the lesion is red: its image and mask must stay aligned
        Image.fromarray(pixels).save(part / f"{image_id}.jpg", quality=100)
        if i == 3:
            continue
        mask = lesion if i != 4 else np.ones((20, 20), dtype=bool)
        Image.fromarray(mask).save(masks / f"{image_id}_segmentation.png")
    with (root / "HAM10000_metadata.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([HEADER, *rows])
    return root


@pytest.fixture
def ham(tmp_path) -> Path:
    return _make_ham(tmp_path / "ham")


def test_saliency_in_lesion_known_answers():
    # Prepare: a 10×10 lesion mask of 30 pixels
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, :] = True
    inside = np.where(mask, 3.0, 0.0)
    signed_inside = np.where(mask, -2.0, 0.0)
    half = np.where(mask, 1.0, 0.0) + np.where(~mask, 30 / 70, 0.0)

    # Execute
    all_inside = saliency_in_lesion(inside, mask)
    signed = saliency_in_lesion(signed_inside, mask)
    uniform = saliency_in_lesion(np.ones((10, 10)), mask)
    halves = saliency_in_lesion(half, mask)
    outside = saliency_in_lesion(np.where(mask, 0.0, 1.0), mask)
    flat = saliency_in_lesion(np.zeros((10, 10)), mask)

    # Assert
    assert all_inside == 1.0 and signed == 1.0
    assert uniform == pytest.approx(0.3)  # the mask's area fraction
    assert halves == pytest.approx(0.5)
    assert outside == 0.0
    assert math.isnan(flat)


def test_saliency_in_lesion_refuses_a_mask_of_another_shape():
    # Execute / Assert
    with pytest.raises(DataError, match=r"\(10, 10\) and mask \(8, 8\)"):
        saliency_in_lesion(np.ones((10, 10)), np.ones((8, 8), dtype=bool))


def test_batch_ignores_and_counts_images_without_mask_or_saliency():
    # Prepare: image 0 all inside, 1 uniform (area 0.25), 2 no mask, 3 a zero map
    masks = np.zeros((4, 4, 4), dtype=bool)
    masks[:, :2, :2] = True
    sal = np.ones((4, 4, 4))
    sal[0] = np.where(masks[0], 1.0, 0.0)
    sal[3] = 0.0
    present = np.array([True, True, False, True])

    # Execute
    result = saliency_in_lesion_batch(sal, masks, present)

    # Assert
    assert result["per_image"] == [1.0, 0.25, None, None]
    assert result["mean"] == pytest.approx(0.625)
    assert result["n"] == 2 and result["skipped_no_mask"] == 1
    assert result["skipped_flat_map"] == 1
    assert result["lesion_area"] == pytest.approx(0.25)
    with pytest.raises(DataError, match="do not match"):
        saliency_in_lesion_batch(sal, masks[:3], present)


def test_masks_folder_does_not_change_what_the_loader_reads(ham):
    # Execute
    ds = load_dataset(ham)

    # Assert
    assert detect_format(ham) == "ham10000"
    assert len(ds) == 5 and ds.format == "ham10000"
    assert all(Path(p).suffix == ".jpg" and Path(p).parent.name == "HAM10000_images_part_1"
               for p in ds.images)
    assert list(ds.image_ids) == [f"ISIC_{i:07d}" for i in range(5)]


def test_mask_paths_and_load_masks_crop_like_images_and_skip_wrong_sizes(ham, caplog):
    # Prepare
    ds = load_dataset(ham)
    expected = np.zeros((10, 10), dtype=bool)
    expected[:, :5] = True  # the left half of the centred square

    # Execute
    paths = mask_paths(ds)
    with caplog.at_level(logging.INFO, logger="qanafed"):
        masks, present = load_masks(ds, 10)
    images = load_arrays(ds, 10)
    subset, subset_present = load_masks(ds, 10, np.array([4, 0]))

    # Assert
    assert [bool(p) for p in paths] == [True, True, True, False, True]
    assert paths[0].endswith(f"{MASK_DIR}/ISIC_0000000_segmentation.png")
    assert masks.shape == (5, 10, 10) and masks.dtype == bool
    assert present.tolist() == [True, True, True, False, False]
    for k in range(3):
        np.testing.assert_array_equal(masks[k], expected)
        assert np.mean((images[k, ..., 0] > 155) == masks[k]) >= 0.95  # aligned with the image
    assert not masks[3].any() and not masks[4].any()  # never the wrong-size mask
    assert "1 of 5 masks skipped" in caplog.text and "ISIC_0000004" in caplog.text
    assert "mask 20x20, image 40x30" in caplog.text
    assert "1 of 5 images have no mask file" in caplog.text
    assert subset_present.tolist() == [False, True]
    np.testing.assert_array_equal(subset[1], expected)


def test_load_masks_refuses_bad_size_and_indices(ham):
    # Prepare
    ds = load_dataset(ham)

    # Execute / Assert
    with pytest.raises(DataError, match="got 0"):
        load_masks(ds, 0)
    with pytest.raises(DataError, match="indices span 0..7"):
        load_masks(ds, 8, np.array([0, 7]))


def test_datasets_without_the_masks_folder_have_no_masks(tmp_path):
    # Prepare
    root = _make_ham(tmp_path / "ham")
    for f in (root / MASK_DIR).iterdir():
        f.unlink()
    (root / MASK_DIR).rmdir()

    # Execute
    on_disk = mask_paths(load_dataset(root))
    in_memory, present = load_masks(load_dataset("synthetic:n=20,size=16"), 8)

    # Assert
    assert on_disk.tolist() == [""] * 5
    assert in_memory.shape == (20, 8, 8) and not present.any()


def test_data_inspect_json_counts_mask_files(ham):
    # Execute
    result = CliRunner().invoke(app, ["data", "inspect", str(ham), "--json", "--no-quality"])
    synthetic = CliRunner().invoke(app, ["data", "inspect", "synthetic:n=20", "--json",
                                         "--no-quality"])
    table = CliRunner().invoke(app, ["data", "inspect", str(ham), "--no-quality"])

    # Assert
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["masks"] == 4  # the wrong-size one has a file too
    assert json.loads(synthetic.stdout)["masks"] == 0
    assert "4 lesion masks" in table.stderr


def test_explain_scores_saliency_in_lesion_per_model_and_method(tmp_path, tiny_run):
    # Prepare: the tiny run's 48 px models on a HAM-like folder with masks
    root = _make_ham(tmp_path / "ham", size=(64, 48))
    out = tmp_path / "explain"

    # Execute
    result = CliRunner().invoke(app, [
        "model", "explain", "--model", str(tiny_run.out), "--data", str(root), "--out",
        str(out), "--n", "5", "--methods", "vanilla",
    ])

    # Assert
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    scores = summary["saliency_in_lesion"]["vanilla"]
    for kind in ("float", "quantized"):
        assert scores[kind]["n"] == 3 and scores[kind]["skipped_no_mask"] == 2
        assert 0.0 <= scores[kind]["mean"] <= 1.0
        assert scores[kind]["lesion_area"] == pytest.approx(0.5)
        values = [img[f"vanilla_in_lesion_{kind}"] for img in summary["images"]]
        assert sum(v is not None for v in values) == 3
        assert np.mean([v for v in values if v is not None]) == pytest.approx(
            scores[kind]["mean"])
    assert "saliency in lesion" in result.stderr and "skin around the lesion" in result.stderr


def test_explain_without_usable_masks_has_no_in_lesion_key(tmp_path, tiny_run):
    # Prepare
    from common.runio import load_run
    from common.saliency import explain

    float_model, qmodel, _ = load_run(tiny_run.out)
    images = load_arrays(load_dataset(tiny_run.data), 48, np.arange(2))

    # Execute
    none = explain(float_model, qmodel, images, ["a", "b"], tmp_path / "none", ["vanilla"])
    absent = explain(float_model, qmodel, images, ["a", "b"], tmp_path / "absent", ["vanilla"],
                     masks=np.ones((2, 48, 48), bool), mask_present=np.zeros(2, bool))

    # Assert
    assert "saliency_in_lesion" not in none and "saliency_in_lesion" not in absent
    with pytest.raises(DataError, match=r"masks have shape \(2, 8, 8\)"):
        explain(float_model, qmodel, images, ["a", "b"], tmp_path / "bad", ["vanilla"],
                masks=np.ones((2, 8, 8), bool))


def test_study_refuses_test_masks_that_do_not_fit_before_training():
    # Prepare
    from common.study import run_study
    from common.train import SplitArrays, TrainConfig

    x = np.random.default_rng(0).integers(0, 256, (6, 48, 48, 3)).astype(np.uint8)
    y = np.arange(6) % 2
    arrays = SplitArrays(x, y, x, y, x, y, class_names=("a", "b"))
    wrong = (np.zeros((6, 32, 32), dtype=bool), np.ones(6, dtype=bool))

    # Execute / Assert
    with pytest.raises(DataError, match=r"test masks \(6, 32, 32\).*6 test images of 48 px"):
        run_study(arrays, TrainConfig(size=48, width=0.25), test_masks=wrong)


def test_study_in_lesion_summary_and_sentence():
    # Prepare: two rows scored on the same 3 masked images, one float stage without masks
    from common.study import _in_lesion, _in_lesion_summary, in_lesion_sentence

    masks = np.zeros((4, 4, 4), dtype=bool)
    masks[:, :2, :] = True  # half of each image
    present = np.array([True, True, True, False])
    inside = np.where(masks, 1.0, 0.0)
    rows = [
        {"arm": "float", "bits": 32, "saliency_in_lesion": _in_lesion(inside, (masks, present))},
        {"arm": "ptq", "bits": 4,
         "saliency_in_lesion": _in_lesion(np.ones((4, 4, 4)), (masks, present))},
    ]

    # Execute
    summary = _in_lesion_summary(rows, (masks, present))
    sentence = in_lesion_sentence({"saliency_in_lesion": summary})

    # Assert
    assert summary == {"images": 3, "skipped_no_mask": 1, "lesion_area": 0.5,
                       "by_row": {"float@32": 1.0, "ptq@4": 0.5}}
    assert "float@32 1.00, ptq@4 0.50" in sentence and "(0.50)" in sentence
    assert "skin around the lesion" in sentence
    assert _in_lesion(inside, None) is None and _in_lesion_summary(rows, None) is None
    assert in_lesion_sentence({"saliency_in_lesion": None}) is None


@pytest.mark.realdata
def test_data_inspect_counts_every_mask_of_the_real_ham10000(ham_dir):
    # Execute
    result = CliRunner().invoke(app, ["data", "inspect", str(ham_dir), "--json",
                                      "--no-quality"])

    # Assert
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 10015 and report["masks"] == 10015
