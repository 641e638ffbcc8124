"""``qanafed data`` commands, run through Typer's CliRunner on fixture and real data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from common.errors import DataError
from qanafed.cli import app

HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]
CLASSES = ["nv", "nv", "nv", "mel", "bkl", "bcc"]


def run(*args: str):
    return CliRunner().invoke(app, ["data", *args])


@pytest.fixture
def ham(tmp_path) -> Path:
    """A 12-image HAM10000 folder (10 lesions, 2 sites) with one corrupt JPEG."""
    root = tmp_path / "ham"
    part = root / "HAM10000_images_part_1"
    part.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        lesion = f"HAM_{min(i, 9):02d}"  # images 9, 10, 11 share a lesion
        site = "rosendahl" if i % 3 == 0 else "vidir_modern"
        rows.append([lesion, f"ISIC_{i:02d}", CLASSES[i % 6], "histo", "50", "male", "back", site])
        pixels = rng.integers(30, 220, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(part / f"ISIC_{i:02d}.jpg", quality=90)
    (part / "ISIC_05.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with (root / "HAM10000_metadata.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([HEADER, *rows])
    return root


@pytest.fixture
def ham_many(tmp_path) -> Path:
    """A 60-image HAM10000 folder: 40 lesions (some photographed 2-3 times), 3 sites, tiny JPEGs."""
    root = tmp_path / "ham_many"
    part = root / "HAM10000_images_part_2"
    part.mkdir(parents=True)
    dx = ["nv", "nv", "nv", "mel", "bkl", "bcc", "akiec", "df", "vasc"]
    sites = ["vidir_molemax", "rosendahl", "vienna_dias"]
    rows = []
    for i in range(60):
        lesion = i if i < 40 else 30 + (i - 40) % 5  # lesions 30..34 get re-shots
        rows.append(
            [
                f"HAM_{lesion:03d}",
                f"ISIC_{i:03d}.jpg",
                dx[lesion % 9],
                "histo",
                "50",
                "female",
                "back",
                sites[lesion % 3],
            ]
        )
        Image.new("RGB", (8, 8), (i * 4, 100, 50)).save(part / f"ISIC_{i:03d}.jpg")
    with (root / "HAM10000_metadata.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([HEADER, *rows])
    return root


def test_split_writes_a_lesion_grouped_split_that_loads_back(ham_many, tmp_path):
    # Prepare
    from common.loaders import load_dataset
    from common.splits import Split

    out = tmp_path / "splits" / "ham.json"

    # Execute
    result = run(
        "split",
        str(ham_many),
        "--out",
        str(out),
        "--val",
        "0.2",
        "--test",
        "0.2",
        "--seed",
        "1",
        "--json",
    )

    # Assert
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    ds = load_dataset(ham_many)
    saved = Split.load(out, ds)
    assert report["sizes"] == {name: len(idx) for name, idx in saved.parts.items()}
    assert sum(report["sizes"].values()) == 60
    assert report["splits"] == saved.class_counts(ds)
    lesions = [set(ds.lesion_ids[idx].tolist()) for idx in saved.parts.values()]
    assert [len(s) for s in lesions] == list(report["lesions"].values())
    assert sum(len(s) for s in lesions) == len(set.union(*lesions)) == 40
    for cls, n in ds.class_counts().items():
        assert sum(row[cls] for row in report["splits"].values()) == n


def test_split_prints_a_table_per_split(ham_many, tmp_path):
    # Execute
    result = run("split", str(ham_many), "--out", str(tmp_path / "s.json"))

    # Assert
    assert result.exit_code == 0, result.output
    assert "Images per split and class" in result.stderr
    assert all(name in result.stderr for name in ("train", "val", "test"))
    assert (tmp_path / "s.json").is_file()


def test_partition_natural_uses_the_dataset_sites(ham_many):
    # Prepare
    from common.loaders import load_dataset

    ds = load_dataset(ham_many)
    pairs = Counter(zip(ds.sites.tolist(), ds.labels.tolist(), strict=True))
    expected = {
        site: {name: pairs[(site, k)] for k, name in enumerate(ds.class_names)}
        for site in ds.site_counts()
    }

    # Execute
    result = run("partition", str(ham_many), "--json")

    # Assert
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["scheme"] == "natural" and report["num_sites"] == 3
    assert report["sites"] == expected
    assert report["sizes"] == ds.site_counts()


def test_partition_dirichlet_covers_every_image_once_per_class(ham_many):
    # Prepare
    from common.loaders import load_dataset

    ds = load_dataset(ham_many)

    # Execute
    result = run(
        "partition",
        str(ham_many),
        "--scheme",
        "dirichlet",
        "--sites",
        "4",
        "--alpha",
        "0.3",
        "--seed",
        "2",
        "--json",
    )
    table = run("partition", str(ham_many), "--scheme", "iid", "--sites", "2")

    # Assert
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_sites"] == 4 and sum(report["sizes"].values()) == 60
    for cls, n in ds.class_counts().items():
        assert sum(site[cls] for site in report["sites"].values()) == n
    assert table.exit_code == 0, table.output
    assert "Images per site and class (iid, 2 sites)" in table.stderr


def test_partition_iid_without_sites_is_a_usage_error(ham_many):
    # Execute
    result = run("partition", str(ham_many), "--scheme", "iid")

    # Assert
    assert result.exit_code == 2
    assert "needs --sites" in result.stderr


def test_inspect_json_counts_images_lesions_classes_sites_and_quality_drops(ham):
    # Execute
    result = run("inspect", str(ham), "--json")

    # Assert
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "ham10000"
    assert report["images"] == 12 and report["lesions"] == 10
    assert report["classes"] == {
        "akiec": 0,
        "bcc": 2,
        "bkl": 2,
        "df": 0,
        "mel": 2,
        "nv": 6,
        "vasc": 0,
    }
    assert report["sites"] == {"rosendahl": 4, "vidir_modern": 8}
    assert report["site_classes"]["rosendahl"] == {
        "akiec": 0,
        "bcc": 0,
        "bkl": 0,
        "df": 0,
        "mel": 2,
        "nv": 2,
        "vasc": 0,
    }
    assert report["quality"]["kept"] == 11
    assert report["quality"]["dropped"]["unreadable"] == 1
    assert sum(report["quality"]["dropped"].values()) == 1


def test_inspect_tables_and_no_quality(ham):
    # Execute
    tables = run("inspect", str(ham))
    skipped = run("inspect", str(ham), "--no-quality", "--json")

    # Assert
    assert tables.exit_code == 0, tables.output
    assert "Images per site and class" in tables.stderr and "vidir_modern" in tables.stderr
    assert "dropped: unreadable" in tables.stderr and tables.stdout == ""
    assert json.loads(skipped.stdout)["quality"] is None


def test_inspect_isic_needs_an_extra_classes_choice_and_honours_it(tmp_path):
    # Prepare
    columns = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    labels = {"ISIC_1": "MEL", "ISIC_2": "SCC", "ISIC_3": "NV"}
    (tmp_path / "ISIC_2019_Training_Input").mkdir()
    with (tmp_path / "ISIC_2019_Training_GroundTruth.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", *columns])
        for image, cls in labels.items():
            writer.writerow([image, *("1.0" if c == cls else "0.0" for c in columns)])
            Image.new("RGB", (8, 8)).save(tmp_path / "ISIC_2019_Training_Input" / f"{image}.jpg")

    # Execute
    refused = run("inspect", str(tmp_path), "--json", "--no-quality")
    kept = run("inspect", str(tmp_path), "--json", "--no-quality", "--extra-classes", "keep")

    # Assert
    assert isinstance(refused.exception, DataError)
    assert "--extra-classes drop" in str(refused.exception)
    assert kept.exit_code == 0, kept.output
    assert json.loads(kept.stdout)["classes"]["scc"] == 1


def test_inspect_of_an_unknown_path_is_one_clear_error_with_exit_code_2(tmp_path):
    # Execute
    proc = subprocess.run(
        [sys.executable, "-m", "qanafed", "data", "inspect", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "400"},  # rich folds a long tmp path mid-word at 80
    )

    # Assert
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2
    assert "nowhere' does not exist" in message and "ham10000:" in message
    assert "Traceback" not in message


@pytest.mark.realdata
def test_inspect_real_ham10000_full(ham_dir):
    # Prepare: the expected counts, straight from the CSV
    with (ham_dir / "HAM10000_metadata.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    present = [
        r
        for r in rows
        if (ham_dir / "HAM10000_images_part_1" / f"{r['image_id']}.jpg").is_file()
        or (ham_dir / "HAM10000_images_part_2" / f"{r['image_id']}.jpg").is_file()
    ]

    # Execute
    result = run("inspect", str(ham_dir), "--json")

    # Assert
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == len(present) == 10015
    assert report["lesions"] == len({r["lesion_id"] for r in present})
    assert report["classes"] == dict(sorted(Counter(r["dx"] for r in present).items()))
    assert report["sites"] == dict(sorted(Counter(r["dataset"] for r in present).items()))
    assert len(report["sites"]) == 4
    assert report["quality"]["kept"] + sum(report["quality"]["dropped"].values()) == 10015
