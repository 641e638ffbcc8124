"""Spread a dataset over federated sites (natural, IID or Dirichlet label skew), lesions whole."""

from __future__ import annotations

import math

import numpy as np

from .dataset import LesionDataset
from .errors import ConfigError, DataError
from .log import get_logger
from .splits import Lesions, lesion_table

__all__ = ["PARTITION_SCHEMES", "UNKNOWN_SITE", "partition", "partition_summary"]

log = get_logger("data.partition")

#: Partition schemes `partition` understands.
PARTITION_SCHEMES: tuple[str, ...] = ("natural", "iid", "dirichlet")

#: Site value loaders use when a format carries no site.
UNKNOWN_SITE = "unknown"

#: Dirichlet re-draws before empty sites are filled by moving lesions.
_REDRAWS = 100


def partition(
    ds: LesionDataset,
    scheme: str = "natural",
    num_sites: int | None = None,
    alpha: float = 0.5,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Assign every lesion (with all its images) to one site.

    Parameters
    ----------
    ds : LesionDataset
        The dataset.
    scheme : str (default: "natural")
        ``"natural"``: the sites in ``ds.sites`` (HAM10000's ``dataset`` column, ISIC 2019's
        lesion-id prefixes, synthetic ``site-k``); ``"iid"``: lesions shuffled into ``num_sites``
        sites of equal lesion count; ``"dirichlet"``: per class, lesions spread over ``num_sites``
        sites with proportions drawn from Dirichlet(``alpha``) (label skew, smaller is stronger).
    num_sites : int | None (default: None)
        Number of sites; required for ``"iid"`` and ``"dirichlet"``. For ``"natural"`` it may be
        left out, or must equal the number of natural sites.
    alpha : float (default: 0.5)
        Dirichlet concentration (> 0), used by ``"dirichlet"`` only.
    seed : int (default: 0)
        Seed; the same dataset and arguments give the same partition.

    Returns
    -------
    dict[str, np.ndarray]
        Site name (``"site-0"`` ... for iid/dirichlet) to sorted int64 image indices into ``ds``.
        Every site has at least one lesion; no lesion is in two sites.

    Raises
    ------
    ConfigError
        If the scheme, ``num_sites`` or ``alpha`` is invalid, or a natural partition is asked of a
        dataset without site information.
    DataError
        If the dataset is empty.
    """
    if scheme not in PARTITION_SCHEMES:
        raise ConfigError(
            f"unknown partition scheme {scheme!r}", f"use one of {', '.join(PARTITION_SCHEMES)}"
        )
    if len(ds) == 0:
        raise DataError("cannot partition an empty dataset", "check the data path and filters")
    lesions = lesion_table(ds)
    if scheme == "natural":
        names, lesion_site = _natural(ds, lesions, num_sites)
    else:
        k = _check_num_sites(num_sites, scheme, len(lesions.ids))
        rng = np.random.default_rng(seed)
        if scheme == "iid":
            lesion_site = _iid(len(lesions.ids), k, rng)
        else:
            lesion_site = _dirichlet(lesions.label, k, _check_alpha(alpha), rng)
        names = [f"site-{i}" for i in range(k)]
    image_site = lesion_site[lesions.of_image]
    parts = {name: np.flatnonzero(image_site == i) for i, name in enumerate(names)}
    log.info(
        "%s partition (seed %d): %s images per site",
        scheme, seed, {name: len(idx) for name, idx in parts.items()},
    )
    return parts


def partition_summary(ds: LesionDataset, parts: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Images per class at every site (every class of the vocabulary included).

    Parameters
    ----------
    ds : LesionDataset
        The partitioned dataset.
    parts : dict[str, np.ndarray]
        Output of `partition`.

    Returns
    -------
    dict[str, dict[str, int]]
        Site name to class name to image count.
    """
    out = {}
    for site, idx in parts.items():
        counts = np.bincount(ds.labels[np.asarray(idx, dtype=np.int64)], minlength=ds.num_classes)
        out[site] = {c: int(counts[i]) for i, c in enumerate(ds.class_names)}
    return out


# --------------------------------------------------------------------------- schemes


def _natural(
    ds: LesionDataset, lesions: Lesions, num_sites: int | None
) -> tuple[list[str], np.ndarray]:
    """Site names and site index per lesion (the majority site of its images)."""
    names, image_site = np.unique(np.asarray(ds.sites).astype(str), return_inverse=True)
    if names.tolist() == [UNKNOWN_SITE]:
        raise ConfigError(
            f"dataset format {ds.format!r} carries no site information (every site is "
            f"{UNKNOWN_SITE!r}), so there is no natural partition",
            "use scheme 'iid' or 'dirichlet' with num_sites",
        )
    if UNKNOWN_SITE in names:
        log.warning(
            "%d image(s) have no site; they form their own site %r",
            int(np.count_nonzero(image_site == names.tolist().index(UNKNOWN_SITE))), UNKNOWN_SITE,
        )
    if num_sites is not None and num_sites != len(names):
        raise ConfigError(
            f"num_sites={num_sites!r} but the natural partition of this dataset has "
            f"{len(names)} sites ({', '.join(names)})",
            "leave num_sites out for 'natural', or use 'iid'/'dirichlet' to choose the count",
        )
    votes = np.zeros((len(lesions.ids), len(names)), dtype=np.int64)
    np.add.at(votes, (lesions.of_image, image_site), 1)
    split = np.flatnonzero((votes > 0).sum(axis=1) > 1)
    if split.size:
        log.warning(
            "%d lesion(s) have images from several sites (e.g. %s); each goes to its majority site",
            split.size, lesions.ids[split[0]],
        )
    lesion_site = votes.argmax(axis=1)
    return names.tolist(), lesion_site


def _iid(num_lesions: int, num_sites: int, rng: np.random.Generator) -> np.ndarray:
    """Site per lesion: a random permutation cut into ``num_sites`` equal-count chunks."""
    site = np.empty(num_lesions, dtype=np.int64)
    for k, chunk in enumerate(np.array_split(rng.permutation(num_lesions), num_sites)):
        site[chunk] = k
    return site


def _dirichlet(
    label: np.ndarray, num_sites: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """Site per lesion with per-class Dirichlet(alpha) proportions; every site gets a lesion."""
    site = np.empty(len(label), dtype=np.int64)
    for _ in range(_REDRAWS):
        for c in np.unique(label):
            members = rng.permutation(np.flatnonzero(label == c))
            share = rng.dirichlet(np.full(num_sites, alpha))
            cuts = np.round(np.cumsum(share)[:-1] * len(members)).astype(np.int64)
            for k, chunk in enumerate(np.split(members, cuts)):
                site[chunk] = k
        if np.bincount(site, minlength=num_sites).min() > 0:
            return site
    # Very small alpha or few lesions: move lesions from the fullest site into empty ones.
    for k in np.flatnonzero(np.bincount(site, minlength=num_sites) == 0):
        fullest = np.argmax(np.bincount(site, minlength=num_sites))
        site[rng.choice(np.flatnonzero(site == fullest))] = k
    log.debug("dirichlet(alpha=%g): filled empty sites after %d re-draws", alpha, _REDRAWS)
    return site


# --------------------------------------------------------------------------- validation


def _check_num_sites(num_sites: int | None, scheme: str, num_lesions: int) -> int:
    """Return ``num_sites`` if it is an int in ``[1, num_lesions]``, else raise ConfigError."""
    if num_sites is None:
        raise ConfigError(
            f"partition scheme {scheme!r} needs num_sites (got None)", "pass e.g. num_sites=3"
        )
    if isinstance(num_sites, bool) or not isinstance(num_sites, int | np.integer) or not (
        1 <= num_sites <= num_lesions
    ):
        raise ConfigError(
            f"num_sites={num_sites!r} is not between 1 and the dataset's {num_lesions} lesions",
            "use a small positive number of sites, e.g. 3",
        )
    return int(num_sites)


def _check_alpha(alpha: float) -> float:
    """Return ``alpha`` if it is a finite number > 0, else raise ConfigError."""
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float | np.floating)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ConfigError(
            f"dirichlet alpha={alpha!r} is not a finite number > 0",
            "use e.g. alpha=0.5 (smaller is more skewed, 100 is close to IID)",
        )
    return float(alpha)
