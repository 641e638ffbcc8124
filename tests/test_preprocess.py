"""Resize/crop loading, the 0-255 pixel guard, and the seeded tf.data augmentation pipelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.augment import AugmentConfig, make_dataset, make_file_dataset
from common.dataset import LesionDataset
from common.errors import ConfigError, DataError
from common.preprocess import check_pixel_range, load_arrays

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def make_ds(images: tuple[str, ...] | np.ndarray) -> LesionDataset:
    n = len(images)
    ids = np.array([f"img{i}" for i in range(n)])
    return LesionDataset(
        images=images,
        labels=np.arange(n) % 2,
        class_names=("a", "b"),
        lesion_ids=ids,
        sites=np.array(["site"] * n),
        image_ids=ids,
    )


def striped(width: int, height: int) -> np.ndarray:
    """Red outer quarters, green centre square region (along the long side), blue marker."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:] = RED
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    img[top:top + side, left:left + side] = GREEN
    return img


def colour_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def files(tmp_path: Path) -> tuple[list[str], np.ndarray]:
    """Four PNG files of different sizes and aspect ratios, plus their decoded pixels."""
    rng = np.random.default_rng(1)
    paths, arrays = [], []
    for i, (w, h) in enumerate([(40, 40), (60, 30), (30, 50), (24, 24)]):
        # Smooth content: decoders and resamplers agree closely on it.
        grid = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BILINEAR))
        path = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(str(path))
        arrays.append(arr)
    return paths, arrays


# --- load_arrays --------------------------------------------------------------------------


def test_load_arrays_shapes_and_dtype_from_files_and_memory(files) -> None:
    # Prepare
    paths, _ = files
    in_memory = make_ds(colour_images(3, 40))

    # Execute
    from_files = load_arrays(make_ds(tuple(paths)), 16)
    from_memory = load_arrays(in_memory, 16)
    picked = load_arrays(make_ds(tuple(paths)), 16, indices=np.array([2, 0]))

    # Assert
    assert from_files.shape == (4, 16, 16, 3) and from_files.dtype == np.uint8
    assert from_memory.shape == (3, 16, 16, 3) and from_memory.dtype == np.uint8
    np.testing.assert_array_equal(picked, from_files[[2, 0]])


@pytest.mark.parametrize("width,height", [(200, 100), (100, 200), (90, 90)])
def test_load_arrays_resizes_shorter_side_then_centre_crops(tmp_path, width, height) -> None:
    # Prepare: only the centred square is green, the rest is red.
    path = tmp_path / "striped.png"
    Image.fromarray(striped(width, height)).save(path)

    # Execute
    out = load_arrays(make_ds((str(path),)), 20)

    # Assert: nothing red survives the crop.
    assert out.shape == (1, 20, 20, 3)
    assert (out[0] == np.array(GREEN, np.uint8)).all()


def test_load_arrays_same_size_in_memory_is_unchanged() -> None:
    images = colour_images(2, 16)
    np.testing.assert_array_equal(load_arrays(make_ds(images), 16), images)


def test_load_arrays_names_the_corrupt_file(tmp_path, files) -> None:
    # Prepare
    paths, _ = files
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")

    # Execute / Assert
    with pytest.raises(DataError, match="bad.jpg"):
        load_arrays(make_ds((paths[0], str(bad))), 16)


# --- check_pixel_range --------------------------------------------------------------------


def test_pixel_range_accepts_raw_pixels() -> None:
    check_pixel_range(colour_images(2, 4))
    check_pixel_range(colour_images(2, 4).astype(np.float32))
    check_pixel_range(np.zeros((1, 4, 4, 3), np.float32))


@pytest.mark.parametrize(
    "batch,match",
    [
        (colour_images(2, 4).astype(np.float32) / 255.0, "0-1 floats"),
        (colour_images(2, 4).astype(np.float32) / 127.5 - 1.0, "negative"),
        (colour_images(2, 4).astype(np.float32) * 2.0 + 1.0, "above 255"),
    ],
)
def test_pixel_range_rejects_rescaled_batches(batch, match) -> None:
    with pytest.raises(DataError, match=match):
        check_pixel_range(batch)


# --- augmentation pipelines ---------------------------------------------------------------


def first_batch(ds) -> tuple[np.ndarray, np.ndarray]:
    x, y = next(iter(ds))
    return x.numpy(), y.numpy()


def test_plain_dataset_yields_the_images_as_float32() -> None:
    # Prepare
    images, labels = colour_images(10, 16), np.arange(10) % 3

    # Execute
    batches = list(make_dataset(images, labels, batch_size=4))

    # Assert
    x = np.concatenate([b[0].numpy() for b in batches])
    y = np.concatenate([b[1].numpy() for b in batches])
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, images.astype(np.float32))
    np.testing.assert_array_equal(y, labels)


def test_augmentation_is_seeded_and_changes_images_within_range() -> None:
    # Prepare
    images, labels = colour_images(16, 16), np.arange(16) % 4

    # Execute
    a = first_batch(make_dataset(images, labels, 8, augment=True, shuffle=True, seed=5))
    b = first_batch(make_dataset(images, labels, 8, augment=True, shuffle=True, seed=5))
    c = first_batch(make_dataset(images, labels, 8, augment=True, shuffle=True, seed=6))
    plain = first_batch(make_dataset(images, labels, 8, augment=False, shuffle=True, seed=5))

    # Assert
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    np.testing.assert_array_equal(a[1], plain[1])  # augmentation does not change the order
    assert a[0].shape == (8, 16, 16, 3) and a[0].dtype == np.float32
    assert a[0].min() >= 0.0 and a[0].max() <= 255.0 and a[0].max() > 1.0
    assert np.abs(a[0] - plain[0]).mean() > 10.0


def test_epochs_draw_new_augmentations() -> None:
    # Prepare
    ds = make_dataset(colour_images(8, 16), np.zeros(8, int), 8, augment=True, seed=0)

    # Execute
    epoch1, epoch2 = first_batch(ds)[0], first_batch(ds)[0]

    # Assert
    assert not np.array_equal(epoch1, epoch2)


def test_rot90_and_flips_are_exact() -> None:
    # Prepare: only lossless geometric ops switched on.
    images = colour_images(16, 12)
    config = AugmentConfig(flip=True, rot90=True, max_rotation=0.0, scale=(1.0, 1.0),
                           translate=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)

    # Execute
    out = first_batch(make_dataset(images, np.zeros(16, int), 16, augment=True, config=config))[0]

    # Assert: every output is one of the 8 symmetries of its input, to float precision.
    for img, got in zip(images, out, strict=True):
        variants = [np.rot90(v, k) for v in (img, img[:, ::-1]) for k in range(4)]
        assert min(np.abs(got - v).max() for v in variants) < 1e-3


def test_hue_and_saturation_jitter_keep_luma() -> None:
    # Prepare: mid-range colours, so nothing is clipped.
    rng = np.random.default_rng(4)
    images = rng.integers(90, 160, (8, 8, 8, 3), dtype=np.uint8)
    config = AugmentConfig(flip=False, rot90=False, max_rotation=0.0, scale=(1.0, 1.0),
                           translate=0.0, brightness=0.0, contrast=0.0, saturation=0.2, hue=0.1)
    luma = np.array([0.299, 0.587, 0.114], np.float32)

    # Execute
    out = first_batch(make_dataset(images, np.zeros(8, int), 8, augment=True, config=config))[0]

    # Assert: colours changed, brightness (luma) did not.
    assert np.abs(out - images).mean() > 1.0
    np.testing.assert_allclose(out @ luma, images.astype(np.float32) @ luma, atol=0.05)


def test_file_dataset_matches_load_arrays(files) -> None:
    # Prepare
    paths, _ = files
    labels = np.array([0, 1, 0, 1])

    # Execute
    x, y = first_batch(make_file_dataset(paths, labels, size=16, batch_size=4))
    reference = load_arrays(make_ds(tuple(paths)), 16).astype(np.float32)

    # Assert
    assert x.shape == (4, 16, 16, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(y, labels)
    assert np.abs(x - reference).mean() < 1.0


def test_file_dataset_augments_seeded(files) -> None:
    # Prepare
    paths, _ = files
    labels = np.zeros(4, int)

    # Execute
    a = first_batch(make_file_dataset(paths, labels, 16, 4, augment=True, shuffle=True, seed=2))
    b = first_batch(make_file_dataset(paths, labels, 16, 4, augment=True, shuffle=True, seed=2))

    # Assert
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].min() >= 0.0 and a[0].max() <= 255.0


def test_file_dataset_rejects_missing_files(tmp_path, files) -> None:
    paths, _ = files
    with pytest.raises(DataError, match="missing.jpg"):
        make_file_dataset([*paths, str(tmp_path / "missing.jpg")], np.zeros(5, int), 16)


def test_dataset_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="0-1 floats"):
        make_dataset(colour_images(2, 8) / 255.0, np.zeros(2, int))
    with pytest.raises(DataError, match="labels"):
        make_dataset(colour_images(2, 8), np.zeros(3, int))
    with pytest.raises(ConfigError, match="scale"):
        AugmentConfig(scale=(1.2, 1.0))
    with pytest.raises(ConfigError, match="fill_mode"):
        AugmentConfig(fill_mode="mirror")
