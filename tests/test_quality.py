"""Quality filter verdicts on crafted images, in-memory datasets and the real HAM10000 subset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from common.dataset import LesionDataset
from common.errors import ConfigError
from common.quality import REASONS, QualityConfig, check_quality


def make_ds(images: tuple[str, ...] | np.ndarray, ids: list[str]) -> LesionDataset:
    n = len(ids)
    return LesionDataset(
        images=images,
        labels=np.zeros(n, dtype=np.int64),
        class_names=("nv",),
        lesion_ids=np.array(ids),
        sites=np.array(["site"] * n),
        image_ids=np.array(ids),
    )


def textured(size: int = 128, seed: int = 0) -> np.ndarray:
    """A skin-coloured image with pixel noise: mid luminance, coloured, sharp."""
    rng = np.random.default_rng(seed)
    base = np.array([200.0, 150.0, 120.0])
    noise = rng.normal(0.0, 30.0, (size, size, 1))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[LesionDataset, dict[str, str | None]]:
    """One file per verdict; returns the dataset and the expected reason per image id."""
    good = Image.fromarray(textured())
    files: dict[str, tuple[str, str | None]] = {}

    def save(name: str, img: Image.Image, reason: str | None, suffix: str = ".png") -> None:
        path = tmp_path / f"{name}{suffix}"
        img.save(path)
        files[name] = (str(path), reason)

    save("good", good, None, ".jpg")
    save("black", Image.new("RGB", (128, 128), (0, 0, 0)), "too_dark")
    save("white", Image.new("RGB", (128, 128), (255, 255, 255)), "too_bright")
    save("blurred", good.filter(ImageFilter.GaussianBlur(8)), "blurry")
    save("tiny", Image.fromarray(textured(32)), "too_small")
    save("grey_mode", good.convert("L"), "not_rgb")
    save("grey_rgb", good.convert("L").convert("RGB"), "not_rgb")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    files["corrupt"] = (str(corrupt), "unreadable")
    truncated = tmp_path / "truncated.jpg"
    jpeg = (tmp_path / "good.jpg").read_bytes()
    truncated.write_bytes(jpeg[: len(jpeg) // 3])
    files["truncated"] = (str(truncated), "unreadable")
    files["missing"] = (str(tmp_path / "missing.jpg"), "unreadable")
    ids = list(files)
    ds = make_ds(tuple(files[i][0] for i in ids), ids)
    return ds, {i: files[i][1] for i in ids}


def test_each_crafted_image_gets_its_reason(crafted) -> None:
    # Prepare
    ds, expected = crafted
    calls: list[tuple[int, int]] = []

    # Execute
    report = check_quality(ds, progress=lambda done, total: calls.append((done, total)))

    # Assert
    got = {image_id: reason for _, image_id, reason in report.dropped}
    assert got == {k: v for k, v in expected.items() if v is not None}
    assert report.kept.tolist() == [list(expected).index("good")]
    assert report.kept.dtype == np.int64
    assert report.summary() == {
        "unreadable": 3, "too_small": 1, "not_rgb": 2, "too_dark": 1, "too_bright": 1,
        "blurry": 1,
    }
    assert list(report.summary()) == list(REASONS)
    assert calls[-1] == (len(ds), len(ds)) and len(calls) == len(ds)


def test_report_json_is_serialisable_and_names_the_drops(crafted) -> None:
    # Prepare
    ds, _ = crafted

    # Execute
    data = json.loads(json.dumps(check_quality(ds).to_json()))

    # Assert
    assert data["total"] == len(ds) and data["kept"] == 1
    corrupt = next(d for d in data["dropped"] if d["image_id"] == "corrupt")
    assert corrupt["reason"] == "unreadable" and "corrupt.jpg" in corrupt["detail"]
    assert data["config"]["min_side"] == 64
    assert data["measures"]["luminance"]["max"] == pytest.approx(255.0)


def test_policy_off_and_looser_thresholds_keep_more(crafted) -> None:
    # Prepare
    ds, _ = crafted
    loose = QualityConfig(min_side=16, require_rgb="off", blur_threshold=0.0)

    # Execute
    report = check_quality(ds, loose)

    # Assert
    kept_ids = {str(ds.image_ids[i]) for i in report.kept}
    assert kept_ids == {"good", "tiny", "grey_mode", "grey_rgb", "blurred"}


def test_mode_policy_drops_grey_files_but_not_grey_looking_rgb(crafted) -> None:
    # Prepare
    ds, _ = crafted

    # Execute
    report = check_quality(ds, QualityConfig(require_rgb="mode"))

    # Assert
    kept_ids = {str(ds.image_ids[i]) for i in report.kept}
    assert kept_ids == {"good", "grey_rgb"}


def test_in_memory_dataset() -> None:
    # Prepare
    images = np.stack([
        textured(),
        np.zeros((128, 128, 3), np.uint8),
        np.full((128, 128, 3), 128, np.uint8),
    ])
    ds = make_ds(images, ["good", "black", "flat_grey"])

    # Execute
    report = check_quality(ds)

    # Assert
    assert report.kept.tolist() == [0]
    assert [(i, r) for i, _, r in report.dropped] == [(1, "too_dark"), (2, "not_rgb")]
    tiny = make_ds(np.stack([textured(32)]), ["tiny"])
    assert check_quality(tiny).dropped == [(0, "tiny", "too_small")]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dark_threshold": 200.0, "bright_threshold": 100.0},
        {"min_side": 0},
        {"require_rgb": "yes"},
        {"blur_threshold": -1.0},
        {"working_size": 8},
    ],
)
def test_invalid_config_is_rejected(kwargs) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        QualityConfig(**kwargs)


@pytest.mark.realdata
def test_defaults_keep_real_ham10000_images(ham_dir) -> None:
    # Prepare
    from common.loaders import load_ham10000

    ds = load_ham10000(ham_dir).subset(np.arange(400))

    # Execute
    report = check_quality(ds)

    # Assert
    assert report.dropped == []
    assert report.measures["sharpness"].min() > 2 * report.config.blur_threshold
