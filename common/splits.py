"""Lesion-grouped, class-stratified train/val/test splits, saved to JSON and reused."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from sklearn.model_selection import train_test_split

from .dataset import LesionDataset
from .errors import ConfigError, DataError
from .log import get_logger

__all__ = [
    "SPLIT_NAMES",
    "Lesions",
    "Split",
    "assert_no_lesion_leak",
    "dataset_fingerprint",
    "grouped_split",
    "lesion_table",
    "load_or_create_split",
]

log = get_logger("data.splits")

#: Split names, in the order they are stored.
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")

#: Version tag written into every split file.
_FILE_VERSION = 1


class Lesions(NamedTuple):
    """Lesion view of a dataset: ids, each image's lesion, and each lesion's class."""

    ids: np.ndarray  # sorted unique lesion ids (str)
    of_image: np.ndarray  # lesion index of every image
    label: np.ndarray  # class index of every lesion (majority of its images)


def lesion_table(ds: LesionDataset) -> Lesions:
    """Group a dataset's images by lesion and give each lesion one class.

    All images of a HAM10000 lesion share a diagnosis; where a dataset disagrees, the lesion takes
    its images' majority class (ties: the lowest class index) and the disagreement is logged.

    Parameters
    ----------
    ds : LesionDataset
        The dataset.

    Returns
    -------
    Lesions
        ``ids`` (sorted unique lesion ids), ``of_image`` (lesion index per image) and ``label``
        (class index per lesion).
    """
    ids, of_image = np.unique(np.asarray(ds.lesion_ids).astype(str), return_inverse=True)
    votes = np.zeros((len(ids), max(ds.num_classes, 1)), dtype=np.int64)
    np.add.at(votes, (of_image, ds.labels), 1)
    label = votes.argmax(axis=1)
    mixed = np.flatnonzero((votes > 0).sum(axis=1) > 1)
    if mixed.size:
        log.warning(
            "%d lesion(s) have images with different classes (e.g. %s); each takes its majority "
            "class for grouping",
            mixed.size,
            ids[mixed[0]],
        )
    return Lesions(ids=ids, of_image=of_image, label=label)


def dataset_fingerprint(ds: LesionDataset) -> str:
    """SHA-256 of the dataset's sorted image ids: identifies the image set, not its order."""
    digest = hashlib.sha256()
    for image_id in sorted(np.asarray(ds.image_ids).astype(str).tolist()):
        digest.update(image_id.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class _Source:
    """What a split was made from, so that it can be saved on its own."""

    image_ids: np.ndarray
    lesion_ids: np.ndarray
    format: str
    fingerprint: str

    @classmethod
    def of(cls, ds: LesionDataset) -> _Source:
        """Record the ids, format and fingerprint of ``ds``."""
        return cls(
            image_ids=np.asarray(ds.image_ids).astype(str),
            lesion_ids=np.asarray(ds.lesion_ids).astype(str),
            format=ds.format,
            fingerprint=dataset_fingerprint(ds),
        )


@dataclass
class Split:
    """Indices of the train, validation and test images of one dataset.

    Parameters
    ----------
    train, val, test : np.ndarray
        Sorted int64 image indices into the dataset; disjoint, and no lesion in two of them.
    seed : int (default: 0)
        Seed the split was drawn with.
    val_fraction : float (default: 0.15)
        Requested fraction of lesions in ``val``.
    test_fraction : float (default: 0.15)
        Requested fraction of lesions in ``test``.

    Splits made by `grouped_split` or `Split.load` remember their dataset's ids, so
    ``save(path)`` needs no dataset; a hand-built one needs ``save(path, ds)``.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    _source: _Source | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in SPLIT_NAMES:
            setattr(self, name, np.sort(np.asarray(getattr(self, name), dtype=np.int64)))

    @property
    def parts(self) -> dict[str, np.ndarray]:
        """Split name to image indices, in ``SPLIT_NAMES`` order."""
        return {name: getattr(self, name) for name in SPLIT_NAMES}

    def sizes(self) -> dict[str, int]:
        """Images per split."""
        return {name: len(idx) for name, idx in self.parts.items()}

    def class_counts(self, ds: LesionDataset) -> dict[str, dict[str, int]]:
        """Images per class in each split (every class of the vocabulary included).

        Parameters
        ----------
        ds : LesionDataset
            The dataset the split indexes.

        Returns
        -------
        dict[str, dict[str, int]]
            Split name to class name to image count.
        """
        out = {}
        for name, idx in self.parts.items():
            counts = np.bincount(ds.labels[idx], minlength=ds.num_classes)
            out[name] = {c: int(counts[i]) for i, c in enumerate(ds.class_names)}
        return out

    def save(self, path: str | Path, ds: LesionDataset | None = None) -> Path:
        """Write the split as JSON: image and lesion ids per split, seed, fractions, dataset id.

        Parameters
        ----------
        path : str | Path
            Destination file; parent folders are created; written atomically.
        ds : LesionDataset | None (default: None)
            The dataset the split indexes; by default the one it was made from or loaded for.

        Returns
        -------
        Path
            The written file.

        Raises
        ------
        ConfigError
            If the split was built by hand and no dataset is given.
        DataError
            If ``ds`` is given and the split does not fit it (index out of range, lesion leak).
        """
        if ds is not None:
            assert_no_lesion_leak(ds, self)
        source = _Source.of(ds) if ds is not None else self._source
        if source is None:
            raise ConfigError(
                "this Split was built by hand and does not know its dataset's image ids",
                "call split.save(path, ds) with the dataset it indexes",
            )
        doc: dict[str, Any] = {
            "qanafed_split": _FILE_VERSION,
            "format": source.format,
            "num_images": len(source.image_ids),
            "fingerprint": source.fingerprint,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "splits": {
                name: {
                    "image_ids": source.image_ids[idx].tolist(),
                    "lesion_ids": sorted(set(source.lesion_ids[idx].tolist())),
                }
                for name, idx in self.parts.items()
            },
        }
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        log.info("saved split %s (%s)", out, self.sizes())
        return out

    @classmethod
    def load(cls, path: str | Path, ds: LesionDataset) -> Split:
        """Read a split file and map its image ids back to indices into ``ds``.

        Parameters
        ----------
        path : str | Path
            A file written by `Split.save`.
        ds : LesionDataset
            The dataset to index; it must hold exactly the image ids the split was made for.

        Returns
        -------
        Split
            The saved split, as indices into ``ds``.

        Raises
        ------
        DataError
            If the file is missing or corrupt, or was made for another dataset.
        """
        p = Path(path)
        if not p.is_file():
            raise DataError(
                f"split file {str(p)!r} does not exist",
                "check the path, or create it with load_or_create_split / `qanafed data split`",
            )
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            if doc.get("qanafed_split") != _FILE_VERSION:
                raise ValueError(f"not a version-{_FILE_VERSION} qanafed split file")
            splits = doc["splits"]
            ids = {name: [str(i) for i in splits[name]["image_ids"]] for name in SPLIT_NAMES}
            fingerprint = str(doc["fingerprint"])
            seed, val = int(doc["seed"]), float(doc["val_fraction"])
            test = float(doc["test_fraction"])
        except (OSError, UnicodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise DataError(
                f"split file {str(p)!r} is corrupt or not a qanafed split ({err})",
                "delete it; load_or_create_split then draws a fresh split",
            ) from err
        source = _Source.of(ds)
        if fingerprint != source.fingerprint:
            raise DataError(
                f"split file {str(p)!r} was made for another dataset (format "
                f"{doc.get('format')!r}, {doc.get('num_images')} images, fingerprint "
                f"{fingerprint[:12]}) than the one given (format {ds.format!r}, {len(ds)} images, "
                f"fingerprint {source.fingerprint[:12]})",
                "load the dataset this split was made for, or delete the file to draw a new split",
            )
        index = {image_id: i for i, image_id in enumerate(source.image_ids.tolist())}
        try:
            parts = {name: [index[i] for i in ids[name]] for name in SPLIT_NAMES}
        except KeyError as err:  # only if the file was edited by hand after saving
            raise DataError(
                f"split file {str(p)!r} lists image id {err.args[0]!r}, which is not in the "
                "dataset",
                "delete the file to draw a new split",
            ) from err
        split = cls(**parts, seed=seed, val_fraction=val, test_fraction=test)
        split._source = source
        assert_no_lesion_leak(ds, split)
        return split


def grouped_split(
    ds: LesionDataset, val: float = 0.15, test: float = 0.15, seed: int = 0
) -> Split:
    """Split images into train/val/test by lesion, stratified by class as far as grouping allows.

    Every lesion has one class (`lesion_table`), so splitting *lesions* with scikit-learn's
    stratified ``train_test_split`` keeps lesions whole and stratifies exactly: first ``test`` of
    the lesions, then ``val / (1 - test)`` of the rest. (`StratifiedGroupKFold` gives the same
    guarantee but its greedy search takes ~30 s on HAM10000's 7.5k lesions.) Fractions therefore
    hold in lesions; image fractions follow closely. Finally every class with at least 3 lesions
    gets a lesion in every non-empty part, moved from the part that has most of that class.

    Parameters
    ----------
    ds : LesionDataset
        The dataset.
    val : float (default: 0.15)
        Fraction of lesions (so roughly of images) for validation, in ``[0, 1)``.
    test : float (default: 0.15)
        Fraction of lesions for testing, in ``[0, 1)``; ``val + test < 1``.
    seed : int (default: 0)
        Seed; the same dataset and arguments give the same split.

    Returns
    -------
    Split
        The split; no lesion has images in two parts.

    Raises
    ------
    ConfigError
        If a fraction is out of range.
    DataError
        If the dataset has too few lesions for the requested parts.
    """
    _check_fractions(val, test)
    lesions = lesion_table(ds)
    wanted = {"train": True, "val": val > 0, "test": test > 0}
    if len(lesions.ids) < sum(wanted.values()):
        raise DataError(
            f"dataset has {len(lesions.ids)} lesion(s), too few for a "
            f"{'/'.join(n for n, w in wanted.items() if w)} split",
            "use a larger dataset, or set val/test to 0",
        )
    lesion_part = _assign_parts(lesions, val, test, seed)
    _cover_classes(lesions, lesion_part, wanted, np.random.default_rng(seed))
    part_of_image = lesion_part[lesions.of_image]
    split = Split(
        *(np.flatnonzero(part_of_image == k) for k in range(len(SPLIT_NAMES))),
        seed=seed,
        val_fraction=float(val),
        test_fraction=float(test),
    )
    split._source = _Source.of(ds)
    assert_no_lesion_leak(ds, split)
    log.info("grouped split (seed %d): %s images", seed, split.sizes())
    return split


def load_or_create_split(
    ds: LesionDataset,
    path: str | Path,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
) -> Split:
    """Reuse the split saved at ``path``, or draw one with `grouped_split` and save it there.

    A saved split always wins, so every later run uses the same images; if it was drawn with other
    fractions or seed a warning says so (delete the file to re-split).

    Parameters
    ----------
    ds : LesionDataset
        The dataset.
    path : str | Path
        Split file (JSON).
    val : float (default: 0.15)
        Validation fraction for a new split.
    test : float (default: 0.15)
        Test fraction for a new split.
    seed : int (default: 0)
        Seed for a new split.

    Returns
    -------
    Split
        The saved or new split.

    Raises
    ------
    DataError
        If the file exists but is corrupt or belongs to another dataset.
    ConfigError
        If a fraction is out of range.
    """
    _check_fractions(val, test)
    p = Path(path)
    if p.exists():
        split = Split.load(p, ds)
        asked, saved = (val, test, seed), (split.val_fraction, split.test_fraction, split.seed)
        if not np.allclose(asked, saved):
            log.warning(
                "reusing split %s (val %.3g, test %.3g, seed %d), not the requested val %.3g, "
                "test %.3g, seed %d; delete the file to draw a new split",
                p, *saved, *asked,
            )
        return split
    split = grouped_split(ds, val=val, test=test, seed=seed)
    split.save(p)
    return split


def assert_no_lesion_leak(ds: LesionDataset, split: Split) -> None:
    """Check that no image and no lesion is in two parts of a split.

    Raises
    ------
    DataError
        Naming an offending lesion (or image) and the two parts it is in.
    """
    lesion_ids = np.asarray(ds.lesion_ids).astype(str)
    parts = split.parts
    for name, idx in parts.items():
        if idx.size and (idx[0] < 0 or idx[-1] >= len(ds)):
            raise DataError(
                f"split part {name!r} has index {int(idx[-1] if idx[-1] >= len(ds) else idx[0])} "
                f"outside the dataset's {len(ds)} images",
                "the split belongs to another dataset; draw a new one with grouped_split",
            )
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = np.intersect1d(lesion_ids[parts[a]], lesion_ids[parts[b]])
            if shared.size:
                raise DataError(
                    f"lesion {shared[0]!r} has images in both {a!r} and {b!r} "
                    f"({shared.size} lesion(s) leak between them)",
                    "draw the split with grouped_split, which keeps every lesion in one part",
                )


# --------------------------------------------------------------------------- internals


def _check_fractions(val: float, test: float) -> None:
    """Raise ConfigError unless ``0 <= val, test < 1`` and ``val + test < 1``."""
    for name, value in (("val", val), ("test", test)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise ConfigError(
                f"split fraction {name}={value!r} is not a number in [0, 1)",
                "use e.g. val=0.15, test=0.15",
            )
    if val + test >= 1:
        raise ConfigError(
            f"split fractions val={val!r} + test={test!r} leave nothing for training",
            "keep val + test well below 1, e.g. 0.15 + 0.15",
        )


def _assign_parts(lesions: Lesions, val: float, test: float, seed: int) -> np.ndarray:
    """Part index (0 train, 1 val, 2 test) of every lesion, stratified by lesion class."""
    rng = np.random.default_rng(seed)
    part = np.zeros(len(lesions.ids), dtype=np.int64)
    pool = np.arange(len(lesions.ids))
    for k, fraction in ((2, test), (1, val / (1 - test))):
        if fraction > 0:
            pool, held = _stratified_take(pool, lesions.label, fraction, rng)
            part[held] = k
    return part


def _stratified_take(
    pool: np.ndarray, label: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``pool`` (lesion indices) into (kept, taken), taking ``fraction`` per class.

    Classes with a single lesion in the pool share one stratum; when the pool is too small to
    stratify at all, the take is a plain random one (``_cover_classes`` repairs coverage).
    """
    take = min(len(pool) - 1, max(1, round(fraction * len(pool))))
    strata = label[pool].copy()
    counts = np.bincount(strata)
    strata[counts[strata] < 2] = -1
    if np.count_nonzero(strata == -1) == 1:
        strata[strata == -1] = np.argmax(counts)
    state = int(rng.integers(2**31 - 1))
    try:
        kept, taken = train_test_split(pool, test_size=take, stratify=strata, random_state=state)
    except ValueError:  # fewer lesions than strata on one side
        kept, taken = train_test_split(pool, test_size=take, random_state=state)
    return np.sort(kept), np.sort(taken)


def _cover_classes(
    lesions: Lesions, part: np.ndarray, wanted: dict[str, bool], rng: np.random.Generator
) -> None:
    """In place: give every wanted part a lesion of each class that has at least 3 lesions."""
    parts = [k for k, name in enumerate(SPLIT_NAMES) if wanted[name]]
    sizes = np.bincount(lesions.of_image, minlength=len(lesions.ids))
    for c in np.flatnonzero(np.bincount(lesions.label) >= 3):
        of_class = np.flatnonzero(lesions.label == c)
        for k in parts:
            if np.any(part[of_class] == k):
                continue
            per_part = np.bincount(part[of_class], minlength=len(SPLIT_NAMES))
            donor = int(np.argmax(per_part))
            if per_part[donor] < 2:
                continue
            candidates = of_class[part[of_class] == donor]
            smallest = candidates[sizes[candidates] == sizes[candidates].min()]
            moved = rng.choice(smallest)
            part[moved] = k
            log.debug(
                "moved lesion %s (class %d) from %s to %s so every part has the class",
                lesions.ids[moved], c, SPLIT_NAMES[donor], SPLIT_NAMES[k],
            )
