"""Dataset loaders and format detection, on tiny fixtures written in each real layout."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.classes import HAM_CLASSES
from common.errors import ConfigError, DataError
from common.loaders import (
    detect_format,
    load_dataset,
    load_folders,
    load_ham10000,
    load_isic,
    load_npz,
    parse_synthetic,
)

HAM_HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]


def write_image(path: Path, value: int = 128, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", (size, size), (value, 255 - value, 40)).save(path, fmt)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_ham(root: Path, rows: list[list[str]], header: list[str] = HAM_HEADER) -> Path:
    """Write a HAM10000 folder: the CSV plus every listed image, alternating the two parts."""
    id_col = header.index("image_id")
    for i, row in enumerate(rows):
        part = "HAM10000_images_part_1" if i % 2 == 0 else "HAM10000_images_part_2"
        write_image(root / part / f"{row[id_col].removesuffix('.jpg')}.jpg", value=10 * i)
    write_csv(root / "HAM10000_metadata.csv", header, rows)
    return root


HAM_ROWS = [
    ["HAM_1", "ISIC_1", "nv", "follow_up", "45.0", "male", "trunk", "vidir_molemax"],
    ["HAM_1", "ISIC_2.jpg", "nv", "follow_up", "45.0", "male", "trunk", "vidir_molemax"],
    ["HAM_2", "ISIC_3", "mel", "histo", "60.0", "female", "back", "rosendahl"],
    ["HAM_3", "ISIC_4", "akiec", "histo", "70.0", "male", "face", "rosendahl"],
    ["HAM_4", "ISIC_5.jpg", "vasc", "consensus", "", "unknown", "", "vienna_dias"],
]


def make_isic(
    root: Path,
    name: str,
    columns: list[str],
    rows: dict[str, str],
    metadata: list[list[str]] | None = None,
    meta_header: list[str] | None = None,
) -> Path:
    """Write ``<name>_GroundTruth.csv`` (one-hot floats) and the images in ``<name>_Input/``."""
    body = [[img] + [("1.0" if c == cls else "0.0") for c in columns] for img, cls in rows.items()]
    for img in rows:
        write_image(root / f"{name}_Input" / f"{img}.jpg")
    if metadata is not None:
        write_csv(root / f"{name}_Metadata.csv", meta_header or [], metadata)
    return write_csv(root / f"{name}_GroundTruth.csv", ["image", *columns], body)


ISIC18 = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
ISIC19 = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def make_npz(path: Path, keys: dict[str, np.ndarray]) -> Path:
    np.savez(path, **keys)
    return path


def derma_arrays(rng: np.random.Generator, sizes=(10, 4, 6), hw: int = 28) -> dict:
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 7).astype(np.uint8)[:, None]
    return arrays


# --- HAM10000 -----------------------------------------------------------------------------


def test_ham_official_layout_reads_both_parts_ids_sites_and_metadata(tmp_path):
    # Prepare
    root = make_ham(tmp_path / "ham", HAM_ROWS)

    # Execute
    ds = load_ham10000(root)

    # Assert
    assert ds.format == "ham10000" and ds.class_names == HAM_CLASSES
    assert ds.image_ids.tolist() == ["ISIC_1", "ISIC_2", "ISIC_3", "ISIC_4", "ISIC_5"]
    assert {Path(p).parent.name for p in ds.images} == {
        "HAM10000_images_part_1",
        "HAM10000_images_part_2",
    }
    assert [HAM_CLASSES[i] for i in ds.labels] == ["nv", "nv", "mel", "akiec", "vasc"]
    assert ds.lesion_ids.tolist()[:2] == ["HAM_1", "HAM_1"] and ds.num_lesions == 4
    assert ds.site_counts() == {"rosendahl": 2, "vidir_molemax": 2, "vienna_dias": 1}
    assert ds.metadata[2] == {
        "dx_type": "histo",
        "age": "60.0",
        "sex": "female",
        "localization": "back",
    }
    assert ds.read_image(0).shape == (8, 8, 3)


def test_ham_accepts_the_csv_path_and_missing_dataset_column_gives_unknown_site(tmp_path):
    # Prepare
    header = HAM_HEADER[:-1] + ["extra_note"]
    rows = [[*r[:-1], f"note{i}"] for i, r in enumerate(HAM_ROWS)]
    root = make_ham(tmp_path / "ham", rows, header)

    # Execute
    ds = load_dataset(root / "HAM10000_metadata.csv")

    # Assert
    assert ds.format == "ham10000" and len(ds) == 5
    assert set(ds.sites.tolist()) == {"unknown"}
    assert ds.metadata[0]["extra_note"] == "note0"


def test_ham_missing_columns_names_file_missing_and_found_columns(tmp_path):
    # Prepare
    header = ["lesion_id", "image", "diagnosis", "age"]
    root = tmp_path / "ham"
    write_csv(root / "HAM10000_metadata.csv", header, [["HAM_1", "ISIC_1", "nv", "40"]])

    # Execute
    with pytest.raises(DataError) as err:
        load_ham10000(root)

    # Assert
    message = str(err.value)
    assert "HAM10000_metadata.csv" in message
    assert "missing column(s) image_id, dx" in message
    assert "found columns: lesion_id, image, diagnosis, age" in message


def test_ham_unknown_dx_names_the_line_and_value(tmp_path):
    # Prepare
    rows = [*HAM_ROWS[:2], ["HAM_9", "ISIC_9", "melanoma?", "histo", "", "", "", "rosendahl"]]
    root = make_ham(tmp_path / "ham", rows)

    # Execute
    with pytest.raises(DataError) as err:
        load_ham10000(root)

    # Assert
    assert "line 4" in str(err.value) and "'melanoma?'" in str(err.value)
    assert "ISIC_9" in str(err.value)


def test_ham_absent_images_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    # Prepare
    root = make_ham(tmp_path / "ham", HAM_ROWS)
    (root / "HAM10000_images_part_1" / "ISIC_3.jpg").unlink()
    (root / "HAM10000_images_part_2" / "ISIC_4.jpg").unlink()

    # Execute
    with caplog.at_level(logging.WARNING, logger="qanafed"):
        ds = load_ham10000(root)

    # Assert
    assert ds.image_ids.tolist() == ["ISIC_1", "ISIC_2", "ISIC_5"]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "2 of 5 images" in warning and "ISIC_3" in warning and "ISIC_4" in warning


def test_ham_with_no_image_present_is_an_error(tmp_path):
    # Prepare
    root = tmp_path / "ham"
    write_csv(root / "HAM10000_metadata.csv", HAM_HEADER, HAM_ROWS)

    # Execute
    with pytest.raises(DataError) as err:
        load_ham10000(root)

    # Assert
    assert "none of the 5 images" in str(err.value) and "ISIC_1" in str(err.value)


def test_corrupt_jpeg_is_kept_by_the_loader_but_read_image_raises(tmp_path):
    # Prepare
    root = make_ham(tmp_path / "ham", HAM_ROWS)
    bad = root / "HAM10000_images_part_1" / "ISIC_3.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")

    # Execute
    ds = load_ham10000(root)
    index = ds.image_ids.tolist().index("ISIC_3")

    # Assert
    assert len(ds) == 5
    with pytest.raises(DataError, match="ISIC_3.jpg"):
        ds.read_image(index)


# --- ISIC ---------------------------------------------------------------------------------


def test_isic_2018_layout_maps_classes_and_each_image_is_its_own_lesion(tmp_path):
    # Prepare
    rows = {"ISIC_0001": "MEL", "ISIC_0002": "NV", "ISIC_0003": "AKIEC", "ISIC_0004": "VASC"}
    make_isic(tmp_path, "ISIC2018_Task3_Training", ISIC18, rows)

    # Execute
    ds = load_isic(tmp_path)

    # Assert
    assert ds.format == "isic" and ds.class_names == HAM_CLASSES
    assert [HAM_CLASSES[i] for i in ds.labels] == ["mel", "nv", "akiec", "vasc"]
    assert ds.lesion_ids.tolist() == ds.image_ids.tolist() == list(rows)
    assert set(ds.sites.tolist()) == {"unknown"}


def test_isic_2019_with_metadata_gives_lesions_sites_and_ak_as_akiec(tmp_path):
    # Prepare
    rows = {"ISIC_1": "AK", "ISIC_2": "NV", "ISIC_3": "NV", "ISIC_4": "BCC", "ISIC_5": "DF"}
    meta_header = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
    meta = [
        ["ISIC_1", "55", "head/neck", "BCN_0000001", "male"],
        ["ISIC_2", "30", "posterior torso", "MSK4_0000002", "female"],
        ["ISIC_3", "30", "posterior torso", "MSK4_0000002", "female"],
        ["ISIC_4", "70", "", "HAM_0000003", "male"],
        ["ISIC_5", "", "", "", ""],
    ]
    gt = make_isic(tmp_path, "ISIC_2019_Training", ISIC19, rows, meta, meta_header)

    # Execute
    ds = load_dataset(gt)

    # Assert
    assert [HAM_CLASSES[i] for i in ds.labels] == ["akiec", "nv", "nv", "bcc", "df"]
    assert ds.lesion_ids.tolist() == [
        "BCN_0000001",
        "MSK4_0000002",
        "MSK4_0000002",
        "HAM_0000003",
        "ISIC_5",
    ]
    assert ds.sites.tolist() == ["BCN", "MSK4", "MSK4", "HAM", "unknown"]
    assert ds.metadata[0] == {"age_approx": "55", "anatom_site_general": "head/neck", "sex": "male"}


@pytest.fixture
def isic_with_extras(tmp_path) -> Path:
    rows = {"ISIC_1": "MEL", "ISIC_2": "SCC", "ISIC_3": "NV", "ISIC_4": "SCC", "ISIC_5": "UNK"}
    make_isic(tmp_path, "ISIC_2019_Training", ISIC19, rows)
    return tmp_path


def test_isic_scc_unk_default_is_an_error_telling_which_option_to_pass(isic_with_extras):
    # Execute
    with pytest.raises(DataError) as err:
        load_isic(isic_with_extras)

    # Assert
    message = str(err.value)
    assert "2 SCC" in message and "1 UNK" in message
    assert "extra_classes='drop'" in message and "extra_classes='keep'" in message


def test_isic_scc_unk_drop_skips_them_and_warns_with_the_count(isic_with_extras, caplog):
    # Execute
    with caplog.at_level(logging.WARNING, logger="qanafed"):
        ds = load_dataset(isic_with_extras, extra_classes="drop")

    # Assert
    assert ds.image_ids.tolist() == ["ISIC_1", "ISIC_3"] and ds.class_names == HAM_CLASSES
    assert any("2 SCC, 1 UNK" in r.getMessage() for r in caplog.records)


def test_isic_scc_unk_keep_extends_the_vocabulary(isic_with_extras):
    # Execute
    ds = load_isic(isic_with_extras, extra_classes="keep")

    # Assert
    assert ds.class_names == (*HAM_CLASSES, "scc", "unk")
    assert [ds.class_names[i] for i in ds.labels] == ["mel", "scc", "nv", "scc", "unk"]
    assert ds.class_counts()["scc"] == 2


def test_isic_bad_extra_classes_mode_is_a_config_error(isic_with_extras):
    with pytest.raises(ConfigError, match="'ignore'"):
        load_isic(isic_with_extras, extra_classes="ignore")


@pytest.mark.parametrize("hot", [[], ["MEL", "NV"]])
def test_isic_row_not_one_hot_names_the_image(tmp_path, hot):
    # Prepare
    gt = make_isic(tmp_path, "ISIC2018_Task3_Training", ISIC18, {"ISIC_1": "MEL"})
    bad = ["ISIC_7"] + [("1.0" if c in hot else "0.0") for c in ISIC18]
    with gt.open("a", newline="") as fh:
        csv.writer(fh).writerow(bad)

    # Execute
    with pytest.raises(DataError) as err:
        load_isic(gt)

    # Assert
    assert "'ISIC_7'" in str(err.value) and f"has {len(hot)} classes set to 1" in str(err.value)


def test_isic_2019_test_ground_truth_keeps_score_weight_as_metadata(tmp_path):
    # Prepare
    gt = make_isic(tmp_path, "ISIC_2019_Test", ISIC19, {"ISIC_1": "MEL", "ISIC_2": "BKL"})
    lines = gt.read_text().splitlines()
    weighted = [lines[0] + ",score_weight"] + [line + ",0.5" for line in lines[1:]]
    gt.write_text("\n".join(weighted) + "\n")

    # Execute
    ds = load_isic(gt)

    # Assert
    assert [HAM_CLASSES[i] for i in ds.labels] == ["mel", "bkl"]
    assert ds.metadata[1] == {"score_weight": "0.5"}


def test_isic_unknown_class_column_is_an_error(tmp_path):
    make_isic(tmp_path, "X", ["MEL", "NV", "MELANOMA"], {"ISIC_1": "MEL"})
    with pytest.raises(DataError, match="unknown class column.*MELANOMA"):
        load_isic(tmp_path)


# --- MedMNIST .npz ------------------------------------------------------------------------


def test_dermamnist_npz_keeps_splits_and_uses_ham_classes(tmp_path):
    # Prepare
    arrays = derma_arrays(np.random.default_rng(0))
    path = make_npz(tmp_path / "dermamnist.npz", arrays)

    # Execute
    ds = load_dataset(path)

    # Assert
    assert ds.format == "npz" and ds.in_memory and ds.images.shape == (20, 28, 28, 3)
    assert ds.class_names == HAM_CLASSES
    assert np.array_equal(ds.images[10], arrays["val_images"][0])
    assert ds.labels[10] == arrays["val_labels"][0, 0]
    assert [m["split"] for m in ds.metadata].count("test") == 6
    assert ds.metadata[10] == {"split": "val"} and ds.image_ids[10] == "val_00000"
    assert ds.num_lesions == 20 and set(ds.sites.tolist()) == {"unknown"}


def test_other_medmnist_npz_gets_generic_class_names_and_grayscale_becomes_rgb(tmp_path):
    # Prepare
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (6, 16, 16), dtype=np.uint8)
    path = make_npz(
        tmp_path / "pneumoniamnist.npz",
        {"train_images": gray, "train_labels": np.array([0, 1, 2, 0, 1, 2])},
    )

    # Execute
    ds = load_npz(path)

    # Assert
    assert ds.class_names == ("class_0", "class_1", "class_2")
    assert ds.images.shape == (6, 16, 16, 3)
    assert np.array_equal(ds.images[..., 2], gray)


def test_npz_with_wrong_keys_lists_expected_and_found(tmp_path):
    # Prepare
    path = make_npz(
        tmp_path / "x.npz", {"x_train": np.zeros((2, 4, 4, 3), np.uint8), "y": np.zeros(2)}
    )

    # Execute
    with pytest.raises(DataError) as err:
        load_npz(path)

    # Assert
    assert "has keys x_train, y" in str(err.value) and "expected train_images" in str(err.value)


@pytest.mark.parametrize("kind", ["npy", "text"])
def test_npz_that_is_not_an_archive_is_a_data_error(tmp_path, kind):
    # Prepare
    path = tmp_path / "dermamnist.npz"
    if kind == "npy":
        with path.open("wb") as fh:
            np.save(fh, np.zeros((2, 4, 4, 3), np.uint8))
    else:
        path.write_text("not numpy at all")

    # Execute / Assert
    with pytest.raises(DataError, match="dermamnist.npz"):
        load_npz(path)


def test_npz_multilabel_labels_are_rejected(tmp_path):
    path = make_npz(
        tmp_path / "chestmnist.npz",
        {
            "train_images": np.zeros((3, 4, 4, 3), np.uint8),
            "train_labels": np.zeros((3, 14), np.uint8),
        },
    )
    with pytest.raises(DataError, match=r"shape \(3, 14\)"):
        load_npz(path)


# --- class-per-folder ---------------------------------------------------------------------


def test_class_folders_keep_their_own_vocabulary_and_warn_on_an_empty_class(tmp_path, caplog):
    # Prepare
    write_image(tmp_path / "polyps" / "a.jpg")
    write_image(tmp_path / "polyps" / "b.JPEG")
    write_image(tmp_path / "esophagitis" / "a.png")
    (tmp_path / "normal-cecum").mkdir()
    write_image(tmp_path / ".cache" / "z.jpg")
    (tmp_path / "README.txt").write_text("Kvasir")
    (tmp_path / "polyps" / "notes.txt").write_text("x")

    # Execute
    with caplog.at_level(logging.WARNING, logger="qanafed"):
        ds = load_dataset(tmp_path)

    # Assert
    assert ds.format == "folders"
    assert ds.class_names == ("esophagitis", "normal-cecum", "polyps")
    assert ds.class_counts() == {"esophagitis": 1, "normal-cecum": 0, "polyps": 2}
    assert ds.image_ids.tolist() == ["esophagitis/a", "polyps/a", "polyps/b"]
    assert ds.lesion_ids.tolist() == ds.image_ids.tolist()
    assert any("normal-cecum" in r.getMessage() for r in caplog.records)


def test_class_folders_all_empty_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="none of the class folders"):
        load_folders(tmp_path)


# --- detection and dispatch ---------------------------------------------------------------


def test_detect_format_recognises_every_layout_and_its_csv(tmp_path):
    # Prepare
    ham = make_ham(tmp_path / "ham", HAM_ROWS[:2])
    gt = make_isic(tmp_path / "isic", "ISIC2018_Task3_Training", ISIC18, {"ISIC_1": "MEL"})
    npz = make_npz(tmp_path / "dermamnist.npz", derma_arrays(np.random.default_rng(0)))
    write_image(tmp_path / "kvasir" / "polyps" / "a.jpg")
    write_image(tmp_path / "kvasir" / "ulcerative-colitis" / "b.jpg")

    # Execute
    found = {
        "ham dir": detect_format(ham),
        "ham csv": detect_format(ham / "HAM10000_metadata.csv"),
        "isic dir": detect_format(gt.parent),
        "isic csv": detect_format(str(gt)),
        "npz": detect_format(npz),
        "folders": detect_format(tmp_path / "kvasir"),
        "synthetic": detect_format("synthetic"),
        "synthetic spec": detect_format("synthetic:n=10,seed=2"),
    }

    # Assert
    assert found == {
        "ham dir": "ham10000",
        "ham csv": "ham10000",
        "isic dir": "isic",
        "isic csv": "isic",
        "npz": "npz",
        "folders": "folders",
        "synthetic": "synthetic",
        "synthetic spec": "synthetic",
    }


@pytest.mark.parametrize("case", ["missing", "stray files", "images without csv"])
def test_detect_failure_lists_what_each_format_expects(tmp_path, case):
    # Prepare
    path = tmp_path / "data"
    if case == "stray files":
        path.mkdir()
        (path / "labels.csv").write_text("a,b\n")
        write_image(path / "one" / "x.jpg")
    elif case == "images without csv":
        write_image(path / "HAM10000_images_part_1" / "ISIC_1.jpg")
        write_image(path / "HAM10000_images_part_2" / "ISIC_2.jpg")

    # Execute
    with pytest.raises(DataError) as err:
        detect_format(path)

    # Assert
    message = str(err.value)
    assert str(path) in message
    for fmt in ("ham10000:", "isic:", "npz:", "folders:", "synthetic:"):
        assert fmt in message
    if case == "images without csv":
        assert "no HAM10000_metadata.csv" in message


def test_load_dataset_rejects_unknown_format_and_options_that_do_not_apply(tmp_path):
    # Prepare
    ham = make_ham(tmp_path / "ham", HAM_ROWS[:2])

    # Execute / Assert
    with pytest.raises(ConfigError, match="'csv'"):
        load_dataset(ham, format="csv")
    with pytest.raises(ConfigError, match="extra_classes do not apply to the 'ham10000'"):
        load_dataset(ham, extra_classes="drop")
    assert len(load_dataset(ham, format="ham10000")) == 2


def test_parse_synthetic_spec_maps_keys_and_rejects_bad_ones():
    # Execute / Assert
    assert parse_synthetic("synthetic") == {}
    assert parse_synthetic("synthetic:n=300,size=32,sites=3,seed=1,mode=dermoscopy") == {
        "n": 300,
        "size": 32,
        "num_sites": 3,
        "seed": 1,
        "mode": "dermoscopy",
    }
    with pytest.raises(ConfigError, match="unknown synthetic spec key 'colour'"):
        parse_synthetic("synthetic:n=3,colour=red")
    with pytest.raises(ConfigError, match="not an integer"):
        parse_synthetic("synthetic:n=many")
    with pytest.raises(ConfigError, match="not key=value"):
        parse_synthetic("synthetic:n")


def test_load_dataset_synthetic_spec_dispatches_to_the_generator():
    # Execute
    ds = load_dataset("synthetic:n=40,size=16,sites=2,seed=1")
    same = load_dataset("synthetic:size=16,seed=1", sites="2", n=40)

    # Assert
    assert ds.format == "synthetic" and len(ds) == 40
    assert ds.images.shape[1:] == (16, 16, 3) and len(ds.site_counts()) == 2
    assert np.array_equal(ds.images, same.images)


def test_load_dataset_synthetic_rejects_bad_options():
    with pytest.raises(ConfigError, match="'seed' is given twice"):
        load_dataset("synthetic:seed=1", seed=2)
    with pytest.raises(ConfigError, match="do not apply to the 'synthetic'"):
        load_dataset("synthetic", extra_classes="drop")
    with pytest.raises(ConfigError, match="needs a synthetic spec"):
        load_dataset("data/ham", format="synthetic")
