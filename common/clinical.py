"""Clinical report metrics: sensitivity/specificity, AUC, melanoma operating points, ECE, CIs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import ConfigError, DataError
from .log import get_logger
from .metrics import classification_metrics

__all__ = [
    "AGE_BANDS",
    "ECE_BINS",
    "UNKNOWN",
    "age_band",
    "clinical_metrics",
    "softmax",
    "subgroups_from_metadata",
]

log = get_logger("clinical")

#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15

#: The value every empty, missing or "unknown" subgroup entry is mapped to.
UNKNOWN = "unknown"

#: Age bands as (label, lower bound inclusive, upper bound exclusive), in years.
AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<30", 0.0, 30.0),
    ("30-44", 30.0, 45.0),
    ("45-59", 45.0, 60.0),
    ("60-74", 60.0, 75.0),
    ("75+", 75.0, math.inf),
)

#: Metadata columns read per subgroup, first present wins (HAM10000 first, then ISIC names).
_METADATA_COLUMNS: dict[str, tuple[str, ...]] = {
    "sex": ("sex",),
    "age_band": ("age", "age_approx"),
    "localization": ("localization", "anatom_site_general", "anatom_site_general_challenge"),
}

#: Resampled images (resamples x units) held in memory at once by the bootstrap.
_BOOT_CHUNK_CELLS = 4_000_000


def softmax(logits: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Turn logits into probabilities along the last axis (numerically stable).

    Parameters
    ----------
    logits : Sequence[Sequence[float]] | np.ndarray
        Scores of shape ``(..., C)``.

    Returns
    -------
    np.ndarray
        float64 probabilities of the same shape; each row sums to 1.
    """
    z = np.asarray(logits, dtype=np.float64)
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def age_band(age: str | float | None) -> str:
    """Map an age in years onto one of :data:`AGE_BANDS`.

    Parameters
    ----------
    age : str | float | None
        The age, e.g. ``45.0`` or ``"45.0"`` as in the HAM10000 metadata CSV.

    Returns
    -------
    str
        ``"<30"``, ``"30-44"``, ``"45-59"``, ``"60-74"``, ``"75+"``, or ``"unknown"`` when the
        age is missing, empty, not a number or negative.
    """
    if age is None:
        return UNKNOWN
    try:
        years = float(str(age).strip()) if isinstance(age, str) else float(age)
    except (TypeError, ValueError):
        return UNKNOWN
    if not math.isfinite(years) or years < 0:
        return UNKNOWN
    for label, lo, hi in AGE_BANDS:
        if lo <= years < hi:
            return label
    return UNKNOWN  # unreachable: the last band is open-ended


def subgroups_from_metadata(
    sites: Sequence[str] | np.ndarray, metadata: tuple[dict[str, str], ...]
) -> dict[str, np.ndarray]:
    """Build the per-image subgroup arrays of a :class:`common.dataset.LesionDataset`.

    Parameters
    ----------
    sites : Sequence[str] | np.ndarray
        The dataset's ``sites`` (one source site per image).
    metadata : tuple[dict[str, str], ...]
        The dataset's ``metadata`` (one dict per image, or empty). HAM10000 rows carry
        ``age``, ``sex`` and ``localization``; ISIC rows ``age_approx``, ``sex`` and
        ``anatom_site_general``; other formats may carry none of them.

    Returns
    -------
    dict[str, np.ndarray]
        ``site`` always; ``sex``, ``age_band`` and ``localization`` only when at least one row
        has the column. Missing or empty entries become ``"unknown"``.

    Raises
    ------
    DataError
        If ``metadata`` is non-empty and its length differs from that of ``sites``.
    """
    site_arr = np.array([_norm(s) for s in np.asarray(sites, dtype=object).ravel()], dtype=str)
    out: dict[str, np.ndarray] = {"site": site_arr}
    if not metadata:
        return out
    if len(metadata) != len(site_arr):
        raise DataError(
            f"metadata has {len(metadata)} rows but sites has {len(site_arr)} entries",
            "pass the sites and metadata of the same LesionDataset (or subset)",
        )
    for group, columns in _METADATA_COLUMNS.items():
        column = next((c for c in columns if any(c in row for row in metadata)), None)
        if column is None:
            continue
        values = [row.get(column) for row in metadata]
        if group == "age_band":
            out[group] = np.array([age_band(v) for v in values], dtype=str)
        else:
            out[group] = np.array([_norm(v) for v in values], dtype=str)
    return out


def clinical_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: Sequence[Sequence[float]] | np.ndarray,
    class_names: Sequence[str],
    *,
    lesion_ids: Sequence[str] | np.ndarray | None = None,
    subgroups: Mapping[str, Sequence[str] | np.ndarray] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    min_subgroup: int = 30,
    positive_class: str = "mel",
) -> dict[str, Any]:
    """Compute the clinical report of one model on one labelled split.

    Parameters
    ----------
    y_true : Sequence[int] | np.ndarray
        True label indices, shape ``(N,)``.
    probs : Sequence[Sequence[float]] | np.ndarray
        Class probabilities, shape ``(N, C)`` with ``C == len(class_names)``; rows in [0, 1]
        summing to 1 (apply :func:`softmax` to logits first). Predictions are the argmax.
    class_names : Sequence[str]
        Class names in label-index order.
    lesion_ids : Sequence[str] | np.ndarray | None (default: None)
        Lesion id per image. When given the bootstrap resamples lesions (all images of a drawn
        lesion together); otherwise it resamples images.
    subgroups : Mapping[str, Sequence[str] | np.ndarray] | None (default: None)
        Group name to per-image values, e.g. from :func:`subgroups_from_metadata`.
    n_boot : int (default: 1000)
        Bootstrap resamples of the 95% confidence intervals; >= 1.
    seed : int (default: 0)
        Seed of ``numpy.random.default_rng`` for the bootstrap.
    min_subgroup : int (default: 30)
        Fewest images a subgroup value needs to be scored; smaller ones are listed as skipped.
    positive_class : str (default: "mel")
        The class whose operating points are reported under ``melanoma``.

    Returns
    -------
    dict[str, Any]
        Every key of :func:`common.metrics.classification_metrics` (``num_examples``,
        ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``per_class``,
        ``confusion_matrix``), each ``per_class[name]`` extended with ``sensitivity`` (the
        recall; None when the class is absent), ``specificity`` (None when every image is of
        the class) and ``roc_auc`` (one-vs-rest; None when the class is absent or the only
        one), plus:

        - ``roc_auc_macro``: mean of the defined one-vs-rest AUCs (None if none is).
        - ``melanoma``: ``positive_class``, ``sensitivity_at_80_specificity``,
          ``sensitivity_at_90_specificity``, ``threshold_at_80_specificity``,
          ``threshold_at_90_specificity``, ``auc`` and ``reason`` (None when computed;
          otherwise why, and the other values are None). Sensitivity at X% specificity is the
          highest one of the ROC curve of ``probs[:, positive]`` whose specificity is >= X%;
          its threshold means "positive when the score is >= threshold" (None when only
          "never positive" reaches X%, i.e. sensitivity 0).
        - ``ece`` and ``ece_bins``: expected calibration error of the top-1 confidence.
        - ``ci95``: ``balanced_accuracy`` and ``macro_f1`` as ``[lo, hi]`` (percentile
          bootstrap), ``n_boot``, ``unit`` (``"lesion"`` or ``"image"``), ``n_units``, ``seed``.
        - ``subgroups``: group name to ``{"values": {value: {"n", "balanced_accuracy",
          "macro_f1"}}, "skipped": {value: {"n", "reason"}}}`` (empty without ``subgroups``).

    Raises
    ------
    DataError
        If shapes disagree, probabilities are not finite or not in [0, 1] rows summing to 1,
        labels are out of range, or a lesion/subgroup array has the wrong length.
    ConfigError
        If ``n_boot`` or ``min_subgroup`` is below 1.
    """
    names = tuple(class_names)
    yt, p = _check_inputs(y_true, probs, names)
    n, c = p.shape
    if int(n_boot) != n_boot or n_boot < 1:
        raise ConfigError(f"n_boot={n_boot!r} is not a whole number >= 1", "use e.g. n_boot=1000")
    if int(min_subgroup) != min_subgroup or min_subgroup < 1:
        raise ConfigError(
            f"min_subgroup={min_subgroup!r} is not a whole number >= 1", "use e.g. min_subgroup=30"
        )
    yp = np.argmax(p, axis=1)
    out = classification_metrics(yt, yp, names)

    aucs = []
    for k, name in enumerate(names):
        pos = yt == k
        n_pos = int(pos.sum())
        cm_k = out["per_class"][name]
        fp = int(np.sum(~pos & (yp == k)))
        cm_k["sensitivity"] = cm_k["recall"] if n_pos else None
        cm_k["specificity"] = (n - n_pos - fp) / (n - n_pos) if n > n_pos else None
        cm_k["roc_auc"] = _auc(pos, p[:, k]) if 0 < n_pos < n else None
        if cm_k["roc_auc"] is not None:
            aucs.append(cm_k["roc_auc"])
    out["roc_auc_macro"] = float(np.mean(aucs)) if aucs else None
    out["melanoma"] = _operating_points(yt, p, names, positive_class)
    out["ece"] = _ece(yt, p)
    out["ece_bins"] = ECE_BINS

    cells = yt * c + yp
    if lesion_ids is None:
        unit, units = "image", np.arange(n)
    else:
        lid = np.asarray(lesion_ids).ravel()
        if len(lid) != n:
            raise DataError(
                f"lesion_ids has {len(lid)} entries for {n} images",
                "pass one lesion id per image (the dataset's lesion_ids indexed like y_true)",
            )
        unit, units = "lesion", np.unique(lid.astype(str), return_inverse=True)[1].ravel()
    ba, f1 = _bootstrap(cells, units, c, int(n_boot), seed)
    out["ci95"] = {
        "balanced_accuracy": _percentile_ci(ba),
        "macro_f1": _percentile_ci(f1),
        "n_boot": int(n_boot),
        "unit": unit,
        "n_units": int(units.max()) + 1,
        "seed": int(seed),
    }
    out["subgroups"] = _subgroups(cells, c, subgroups or {}, n, int(min_subgroup))
    return out


def _norm(value: Any) -> str:
    """Return ``value`` as a stripped string, ``"unknown"`` when missing or empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return UNKNOWN
    s = str(value).strip()
    return UNKNOWN if not s or s.lower() in (UNKNOWN, "nan", "none") else s


def _check_inputs(
    y_true: Sequence[int] | np.ndarray, probs: Any, names: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and probabilities; return them as int64 and float64 arrays."""
    p = np.asarray(probs, dtype=np.float64)
    c = len(names)
    if p.ndim != 2 or p.shape[1] != c:
        raise DataError(
            f"probs has shape {p.shape}, expected (N, {c}) for classes {list(names)}",
            "pass one row of class probabilities per image, columns in class_names order",
        )
    bad = ~np.isfinite(p).all(axis=1)
    if bad.any():
        raise DataError(
            f"probs has {int(bad.sum())} rows with NaN/inf (first at row {int(np.argmax(bad))})",
            "check the model outputs; a diverged or broken model cannot be scored",
        )
    sums = p.sum(axis=1)
    if p.size and (p.min() < -1e-6 or p.max() > 1 + 1e-6 or np.abs(sums - 1).max() > 1e-3):
        raise DataError(
            f"probs are not probabilities (min {p.min():.4g}, max {p.max():.4g}, row sums "
            f"{sums.min():.4g}..{sums.max():.4g})",
            "apply common.clinical.softmax to logits first",
        )
    y = np.asarray(y_true)
    if y.ndim != 1 or len(y) != len(p):
        raise DataError(
            f"y_true has shape {y.shape} but probs has {len(p)} rows",
            "pass one true label per row of probs",
        )
    if len(y) == 0:
        raise DataError("no examples to score", "evaluate on a non-empty split")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.number) or not np.all(np.mod(y, 1) == 0):
            raise DataError(
                f"y_true has non-integer labels (dtype {y.dtype}, e.g. {y[0]!r})",
                "pass label indices into class_names",
            )
    yt = y.astype(np.int64)
    if yt.min() < 0 or yt.max() >= c:
        raise DataError(
            f"y_true has labels in {yt.min()}..{yt.max()} but only {c} classes {list(names)}",
            "pass label indices into class_names",
        )
    return yt, p


def _auc(pos: np.ndarray, score: np.ndarray) -> float:
    """One-vs-rest ROC AUC of ``score`` for the boolean targets ``pos`` (both present)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(pos, score))


def _operating_points(
    yt: np.ndarray, p: np.ndarray, names: tuple[str, ...], positive: str
) -> dict[str, Any]:
    """Sensitivity of ``positive`` at 80% and 90% specificity, thresholds and AUC."""
    out: dict[str, Any] = {
        "positive_class": positive,
        "sensitivity_at_80_specificity": None,
        "sensitivity_at_90_specificity": None,
        "threshold_at_80_specificity": None,
        "threshold_at_90_specificity": None,
        "auc": None,
        "reason": None,
    }
    if positive not in names:
        out["reason"] = f"class {positive!r} is not among the classes {list(names)}"
        return out
    k = names.index(positive)
    pos = yt == k
    if not pos.any():
        out["reason"] = f"no {positive!r} image in the evaluated split"
        return out
    if pos.all():
        out["reason"] = f"every image is {positive!r}; specificity is undefined"
        return out
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(pos, p[:, k], drop_intermediate=False)
    for spec in (80, 90):
        ok = fpr <= 1.0 - spec / 100 + 1e-9  # fpr[0] == 0, so at least one point qualifies
        best = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])
        out[f"sensitivity_at_{spec}_specificity"] = float(tpr[best])
        # Call positive when the score is >= threshold; None: only "never positive" qualifies.
        out[f"threshold_at_{spec}_specificity"] = (
            float(thr[best]) if np.isfinite(thr[best]) else None
        )
    out["auc"] = _auc(pos, p[:, k])
    return out


def _ece(yt: np.ndarray, p: np.ndarray) -> float:
    """Return the expected calibration error of the top-1 confidence (:data:`ECE_BINS` bins)."""
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == yt).astype(np.float64)
    # Bins (0, 1/B], (1/B, 2/B], ... as in Guo et al. 2017; a confidence of 0 joins the first.
    b = np.clip(np.ceil(conf * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
    count = np.bincount(b, minlength=ECE_BINS)
    gap = np.abs(
        np.bincount(b, weights=correct, minlength=ECE_BINS)
        - np.bincount(b, weights=conf, minlength=ECE_BINS)
    )
    return float(gap.sum() / count.sum())


def _ba_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Balanced accuracy and macro F1 of confusion matrices ``(..., C, C)``.

    The same definitions as :func:`common.metrics.classification_metrics`: recall averaged
    over classes present in the true labels; F1 over classes present or predicted.
    """
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    support = cm.sum(axis=-1).astype(np.float64)
    predicted = cm.sum(axis=-2).astype(np.float64)
    present = support > 0
    scored = present | (predicted > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, tp / support, 0.0)
        f1 = np.where(scored, 2 * tp / (support + predicted), 0.0)
    ba = recall.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)
    mf1 = f1.sum(axis=-1) / np.maximum(scored.sum(axis=-1), 1)
    return ba, mf1


def _bootstrap(
    cells: np.ndarray, units: np.ndarray, c: int, n_boot: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced accuracy and macro F1 of ``n_boot`` resamples of the units (lesions/images).

    ``cells`` is each image's confusion-matrix cell ``true * C + pred`` and ``units`` its unit
    index. Each resample draws as many units as there are, with replacement; its confusion
    matrix is the draw counts times the per-unit cell counts (one matrix product).
    """
    n_units = int(units.max()) + 1
    per_unit = np.zeros((n_units, c * c))
    np.add.at(per_unit, (units, cells), 1.0)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_CELLS // n_units)
    ba, f1 = [], []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n_units, size=(b, n_units))
        draws += np.arange(b)[:, None] * n_units
        counts = np.bincount(draws.ravel(), minlength=b * n_units).reshape(b, n_units)
        cms = (counts.astype(np.float64) @ per_unit).reshape(b, c, c)
        ba_b, f1_b = _ba_f1(cms)
        ba.append(ba_b)
        f1.append(f1_b)
    return np.concatenate(ba), np.concatenate(f1)


def _percentile_ci(values: np.ndarray) -> list[float]:
    """Return the 2.5th and 97.5th percentiles of ``values``."""
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _subgroups(
    cells: np.ndarray,
    c: int,
    subgroups: Mapping[str, Sequence[str] | np.ndarray],
    n: int,
    min_subgroup: int,
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Balanced accuracy and macro F1 per subgroup value with at least ``min_subgroup`` images."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for group, raw in subgroups.items():
        values = np.asarray(raw, dtype=object).ravel()
        if len(values) != n:
            raise DataError(
                f"subgroup {group!r} has {len(values)} values for {n} images",
                "pass one value per image, indexed like y_true",
            )
        values = np.array([_norm(v) for v in values], dtype=str)
        scored: dict[str, dict[str, Any]] = {}
        skipped: dict[str, dict[str, Any]] = {}
        for value in np.unique(values).tolist():
            mask = values == value
            count = int(mask.sum())
            if count < min_subgroup:
                skipped[value] = {"n": count, "reason": f"fewer than {min_subgroup} images"}
                continue
            cm = np.bincount(cells[mask], minlength=c * c).reshape(c, c)
            ba, f1 = _ba_f1(cm)
            scored[value] = {"n": count, "balanced_accuracy": float(ba), "macro_f1": float(f1)}
        if skipped:
            log.info(
                "subgroup %r: %d value(s) with fewer than %d images not scored: %s",
                group,
                len(skipped),
                min_subgroup,
                {v: s["n"] for v, s in skipped.items()},
            )
        out[str(group)] = {"values": scored, "skipped": skipped}
    return out
