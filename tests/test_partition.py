"""Site partitioning: lesions whole, non-empty sites, seeding, Dirichlet skew, natural sites."""

from __future__ import annotations

import numpy as np
import pytest

from common.dataset import LesionDataset
from common.errors import ConfigError
from common.partition import partition, partition_summary
from common.synthetic import make_synthetic


@pytest.fixture(scope="module")
def ds() -> LesionDataset:
    return make_synthetic(n=900, size=16, num_sites=3, seed=4)


def _hand_made(sites: list[str], lesions: list[str], labels: list[int]) -> LesionDataset:
    n = len(sites)
    return LesionDataset(
        images=tuple(f"img{i}.jpg" for i in range(n)),
        labels=np.array(labels),
        class_names=("a", "b"),
        lesion_ids=np.array(lesions),
        sites=np.array(sites),
        image_ids=np.array([f"IMG_{i}" for i in range(n)]),
        format="test",
    )


def _label_entropy(ds: LesionDataset, parts: dict[str, np.ndarray]) -> float:
    """Mean Shannon entropy (bits) of the per-site label distribution."""
    entropies = []
    for idx in parts.values():
        p = np.bincount(ds.labels[idx], minlength=ds.num_classes) / len(idx)
        p = p[p > 0]
        entropies.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(entropies))


SCHEMES = [
    ("natural", {}),
    ("iid", {"num_sites": 4}),
    ("dirichlet", {"num_sites": 5, "alpha": 0.1}),
    ("dirichlet", {"num_sites": 3, "alpha": 100.0}),
]


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES)
def test_every_scheme_keeps_lesions_whole_and_covers_every_image_once(ds, scheme, kwargs):
    # Execute
    parts = partition(ds, scheme, seed=0, **kwargs)

    # Assert
    every = np.concatenate(list(parts.values()))
    assert np.array_equal(np.sort(every), np.arange(len(ds)))
    owner: dict[str, str] = {}
    for site, idx in parts.items():
        assert idx.size > 0 and np.array_equal(idx, np.sort(idx))
        for lesion in set(ds.lesion_ids[idx].tolist()):
            assert owner.setdefault(lesion, site) == site, f"lesion {lesion} split over sites"
    _, shots = np.unique(ds.lesion_ids, return_counts=True)
    assert np.count_nonzero(shots > 1) > 50  # multi-image lesions are really exercised


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES)
def test_partition_is_deterministic_by_seed(ds, scheme, kwargs):
    # Execute
    a = partition(ds, scheme, seed=1, **kwargs)
    b = partition(ds, scheme, seed=1, **kwargs)

    # Assert
    assert list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_iid_gives_equal_lesion_counts_and_other_seeds_differ(ds):
    # Execute
    a = partition(ds, "iid", num_sites=4, seed=0)
    b = partition(ds, "iid", num_sites=4, seed=1)

    # Assert
    lesions = [len(set(ds.lesion_ids[idx].tolist())) for idx in a.values()]
    assert list(a) == ["site-0", "site-1", "site-2", "site-3"]
    assert max(lesions) - min(lesions) <= 1
    assert not np.array_equal(a["site-0"], b["site-0"])


def test_dirichlet_skew_grows_as_alpha_shrinks(ds):
    # Execute: mean per-site label entropy, averaged over a few seeds
    skewed = np.mean([_label_entropy(ds, partition(ds, "dirichlet", 4, 0.1, s)) for s in range(5)])
    mild = np.mean([_label_entropy(ds, partition(ds, "dirichlet", 4, 100.0, s)) for s in range(5)])
    pooled = _label_entropy(ds, {"all": np.arange(len(ds))})

    # Assert
    assert skewed < mild - 0.3, (skewed, mild)
    assert abs(mild - pooled) < 0.1, (mild, pooled)


def test_dirichlet_fills_every_site_even_with_tiny_alpha_and_few_lesions():
    # Prepare: 6 lesions, 6 sites, alpha so small that draws put everything in one site
    small = _hand_made(["unknown"] * 6, [f"L{i}" for i in range(6)], [0, 0, 0, 1, 1, 1])

    # Execute
    parts = partition(small, "dirichlet", num_sites=6, alpha=1e-3, seed=0)

    # Assert
    assert len(parts) == 6 and all(len(idx) == 1 for idx in parts.values())


def test_natural_partition_follows_the_dataset_sites():
    # Prepare: lesion L1 has two images at 'north'
    ds = _hand_made(
        ["north", "north", "south", "south", "east"],
        ["L1", "L1", "L2", "L3", "L4"],
        [0, 0, 1, 0, 1],
    )

    # Execute
    parts = partition(ds, "natural")

    # Assert
    assert {k: v.tolist() for k, v in parts.items()} == {
        "east": [4],
        "north": [0, 1],
        "south": [2, 3],
    }
    assert partition_summary(ds, parts) == {
        "east": {"a": 0, "b": 1},
        "north": {"a": 2, "b": 0},
        "south": {"a": 1, "b": 1},
    }


def test_natural_partition_puts_a_lesion_spread_over_sites_at_its_majority_site():
    # Prepare
    ds = _hand_made(["x", "x", "y", "y"], ["L1", "L1", "L1", "L2"], [0, 0, 0, 1])

    # Execute
    parts = partition(ds, "natural")

    # Assert
    assert parts["x"].tolist() == [0, 1, 2] and parts["y"].tolist() == [3]


def test_natural_partition_without_sites_suggests_iid_or_dirichlet():
    # Prepare
    ds = _hand_made(["unknown"] * 3, ["L1", "L2", "L3"], [0, 1, 0])

    # Execute / Assert
    with pytest.raises(ConfigError, match="no site information") as err:
        partition(ds, "natural")
    assert "iid" in str(err.value) and "dirichlet" in str(err.value)


def test_natural_partition_refuses_a_different_site_count(ds):
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"num_sites=5 .* 3 sites \(site-0, site-1, site-2\)"):
        partition(ds, "natural", num_sites=5)


@pytest.mark.parametrize(
    ("kwargs", "echo"),
    [
        ({"scheme": "random"}, "'random'"),
        ({"scheme": "iid"}, "num_sites (got None)"),
        ({"scheme": "iid", "num_sites": 0}, "num_sites=0"),
        ({"scheme": "iid", "num_sites": 10**6}, "num_sites=1000000"),
        ({"scheme": "dirichlet", "num_sites": 3, "alpha": 0.0}, "alpha=0.0"),
        ({"scheme": "dirichlet", "num_sites": 3, "alpha": float("inf")}, "alpha=inf"),
    ],
)
def test_bad_arguments_raise_config_error_echoing_the_value(ds, kwargs, echo):
    # Execute / Assert
    with pytest.raises(ConfigError) as err:
        partition(ds, **kwargs)
    assert echo in str(err.value)


def test_summary_counts_every_image_once(ds):
    # Prepare
    parts = partition(ds, "dirichlet", num_sites=3, alpha=0.5, seed=0)

    # Execute
    summary = partition_summary(ds, parts)

    # Assert
    assert list(summary) == list(parts)
    assert sum(sum(row.values()) for row in summary.values()) == len(ds)
    assert all(list(row) == list(ds.class_names) for row in summary.values())


@pytest.mark.realdata
def test_real_ham10000_natural_partition_gives_its_four_sites(ham_dir):
    # Prepare
    from common.loaders import load_dataset

    ds = load_dataset(ham_dir)

    # Execute
    parts = partition(ds, "natural")
    summary = partition_summary(ds, parts)

    # Assert
    assert sorted(parts) == ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]
    assert sum(len(idx) for idx in parts.values()) == len(ds)
    molemax = summary["vidir_molemax"]
    assert molemax["nv"] / sum(molemax.values()) > 0.85  # the nevus-heavy follow-up site
