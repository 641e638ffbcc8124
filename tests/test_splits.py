"""Lesion-grouped splits: grouping, stratification, seeding, save/load, reuse and refusals."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from common.dataset import LesionDataset
from common.errors import ConfigError, DataError
from common.splits import (
    Split,
    assert_no_lesion_leak,
    dataset_fingerprint,
    grouped_split,
    lesion_table,
    load_or_create_split,
)
from common.synthetic import make_synthetic


@pytest.fixture(scope="module")
def ds() -> LesionDataset:
    return make_synthetic(n=900, size=16, seed=2)


def _tiny(labels: list[int], lesions: list[str]) -> LesionDataset:
    n = len(labels)
    return LesionDataset(
        images=tuple(f"img{i}.jpg" for i in range(n)),
        labels=np.array(labels),
        class_names=("a", "b", "c"),
        lesion_ids=np.array(lesions),
        sites=np.array(["unknown"] * n),
        image_ids=np.array([f"IMG_{i}" for i in range(n)]),
        format="test",
    )


def test_split_is_disjoint_complete_and_keeps_every_lesion_whole(ds):
    # Execute
    split = grouped_split(ds, val=0.15, test=0.15, seed=0)

    # Assert
    every = np.concatenate(list(split.parts.values()))
    assert np.array_equal(np.sort(every), np.arange(len(ds)))
    lesion_sets = [set(ds.lesion_ids[idx].tolist()) for idx in split.parts.values()]
    assert not (lesion_sets[0] & lesion_sets[1] or lesion_sets[0] & lesion_sets[2]
                or lesion_sets[1] & lesion_sets[2])
    _, shots = np.unique(ds.lesion_ids, return_counts=True)
    assert np.count_nonzero(shots > 1) > 50  # the property is exercised on real multi-image lesions


def test_fractions_are_close_to_the_request(ds):
    # Execute
    split = grouped_split(ds, val=0.2, test=0.1, seed=0)

    # Assert
    sizes = split.sizes()
    assert abs(sizes["val"] / len(ds) - 0.2) < 0.03
    assert abs(sizes["test"] / len(ds) - 0.1) < 0.03
    assert (split.val_fraction, split.test_fraction, split.seed) == (0.2, 0.1, 0)


def test_every_class_with_three_lesions_is_in_every_split(ds):
    # Prepare
    lesions = lesion_table(ds)
    per_class = np.bincount(lesions.label, minlength=ds.num_classes)

    # Execute
    results = [grouped_split(ds, val=0.15, test=0.15, seed=s) for s in range(5)]

    # Assert
    assert per_class.min() >= 3  # every class is concerned, rare ones included
    for split in results:
        for name, counts in split.class_counts(ds).items():
            missing = [c for c, k in counts.items() if k == 0]
            assert not missing, (split.seed, name, missing)


def test_class_counts_cover_the_vocabulary_and_sum_to_the_split_sizes(ds):
    # Execute
    split = grouped_split(ds, seed=0)
    counts = split.class_counts(ds)

    # Assert
    assert list(counts) == ["train", "val", "test"]
    for name, row in counts.items():
        assert list(row) == list(ds.class_names)
        assert sum(row.values()) == split.sizes()[name]


def test_same_seed_same_split_other_seed_other_split(ds):
    # Execute
    a, b, c = (grouped_split(ds, seed=s) for s in (3, 3, 4))

    # Assert
    assert all(np.array_equal(a.parts[k], b.parts[k]) for k in a.parts)
    assert not np.array_equal(a.test, c.test)


def test_zero_val_gives_an_empty_validation_part(ds):
    # Execute
    split = grouped_split(ds, val=0.0, test=0.2, seed=0)

    # Assert
    assert split.val.size == 0 and split.test.size > 0
    assert split.sizes()["train"] + split.sizes()["test"] == len(ds)


def test_lesion_with_mixed_labels_takes_its_majority_and_is_logged(caplog):
    # Prepare: lesion L0 has two 'b' images and one 'a' image
    tiny = _tiny([1, 1, 0, 0, 2, 2, 0, 1], ["L0", "L0", "L0", "L1", "L2", "L3", "L4", "L5"])

    # Execute
    with caplog.at_level(logging.WARNING, logger="qanafed"):
        lesions = lesion_table(tiny)

    # Assert
    assert lesions.label[list(lesions.ids).index("L0")] == 1
    assert "L0" in caplog.text


def test_save_load_round_trip_and_file_contents(ds, tmp_path):
    # Prepare
    split = grouped_split(ds, val=0.15, test=0.15, seed=5)
    path = tmp_path / "deep" / "split.json"

    # Execute
    split.save(path)
    loaded = Split.load(path, ds)
    doc = json.loads(path.read_text())

    # Assert
    assert all(np.array_equal(split.parts[k], loaded.parts[k]) for k in split.parts)
    assert (loaded.seed, loaded.val_fraction, loaded.test_fraction) == (5, 0.15, 0.15)
    assert doc["format"] == "synthetic" and doc["fingerprint"] == dataset_fingerprint(ds)
    assert doc["splits"]["test"]["image_ids"] == ds.image_ids[split.test].tolist()
    assert doc["splits"]["val"]["lesion_ids"] == sorted(set(ds.lesion_ids[split.val].tolist()))


def test_load_maps_ids_back_when_the_dataset_is_reordered(ds, tmp_path):
    # Prepare
    path = grouped_split(ds, seed=1).save(tmp_path / "split.json")
    order = np.random.default_rng(0).permutation(len(ds))
    shuffled = ds.subset(order)

    # Execute
    loaded = Split.load(path, shuffled)

    # Assert
    original = Split.load(path, ds)
    for name, idx in original.parts.items():
        assert set(shuffled.image_ids[loaded.parts[name]]) == set(ds.image_ids[idx])


def test_load_refuses_a_split_of_another_dataset_naming_file_and_fix(ds, tmp_path):
    # Prepare
    path = grouped_split(ds, seed=0).save(tmp_path / "split.json")
    other = make_synthetic(n=300, size=16, seed=2)

    # Execute / Assert
    with pytest.raises(DataError, match="another dataset") as err:
        Split.load(path, other)
    assert str(path) in str(err.value) and "delete the file" in str(err.value)


@pytest.mark.parametrize(
    "content", ["{not json", '{"qanafed_split": 1}', "[]", '{"qanafed_split": 99}']
)
def test_load_refuses_a_corrupt_file(ds, tmp_path, content):
    # Prepare
    path = tmp_path / "split.json"
    path.write_text(content)

    # Execute / Assert
    with pytest.raises(DataError, match="corrupt") as err:
        Split.load(path, ds)
    assert str(path) in str(err.value)


def test_load_refuses_a_missing_file(ds, tmp_path):
    # Execute / Assert
    with pytest.raises(DataError, match="does not exist") as err:
        Split.load(tmp_path / "nope.json", ds)
    assert "nope.json" in str(err.value)


def test_load_or_create_split_creates_once_then_reuses(ds, tmp_path, caplog):
    # Prepare
    path = tmp_path / "split.json"

    # Execute
    first = load_or_create_split(ds, path, val=0.15, test=0.15, seed=0)
    with caplog.at_level(logging.WARNING, logger="qanafed"):
        again = load_or_create_split(ds, path, val=0.2, test=0.2, seed=9)

    # Assert
    assert path.is_file()
    assert all(np.array_equal(first.parts[k], again.parts[k]) for k in first.parts)
    assert "reusing split" in caplog.text


def test_assert_no_lesion_leak_names_the_offending_lesion():
    # Prepare: lesion L0's two images land in train and test
    tiny = _tiny([0, 0, 1, 2], ["L0", "L0", "L1", "L2"])
    leaky = Split(train=[0, 2], val=[3], test=[1])

    # Execute / Assert
    with pytest.raises(DataError, match="'L0'.*'train'.*'test'"):
        assert_no_lesion_leak(tiny, leaky)
    assert_no_lesion_leak(tiny, Split(train=[0, 1], val=[2], test=[3]))


def test_hand_built_split_saves_only_with_its_dataset(tmp_path):
    # Prepare
    tiny = _tiny([0, 0, 1, 2], ["L0", "L0", "L1", "L2"])
    split = Split(train=[0, 1], val=[2], test=[3])

    # Execute / Assert
    with pytest.raises(ConfigError, match="by hand"):
        split.save(tmp_path / "s.json")
    loaded = Split.load(split.save(tmp_path / "s.json", tiny), tiny)
    assert loaded.test.tolist() == [3]


@pytest.mark.parametrize(
    ("val", "test"), [(-0.1, 0.15), (0.15, 1.0), (0.6, 0.5), ("0.1", 0.1), (0.1, float("nan"))]
)
def test_bad_fractions_raise_config_error(ds, val, test):
    # Execute / Assert
    with pytest.raises(ConfigError, match="fraction"):
        grouped_split(ds, val=val, test=test)


def test_too_few_lesions_is_a_data_error():
    # Prepare
    tiny = _tiny([0, 0], ["L0", "L0"])

    # Execute / Assert
    with pytest.raises(DataError, match="1 lesion"):
        grouped_split(tiny)
