"""A federation's global scores from the sites' confusion matrices: the union, worst site, spread.

The global balanced accuracy and macro F1 of a federated model are those of its predictions on
the union of the sites' test images. Balanced accuracy is a mean of per-class recalls, so it is
computed from the summed confusion matrix; an example-weighted mean of per-site balanced
accuracies is another number, dominated by the largest site (a site with only one class
scores its recall of that class). Each site sends its confusion matrix inside its sealed
report; no per-image result leaves a site.

95 % intervals: per-image predictions cannot travel, so the bootstrap resamples each site's
test images from its confusion matrix (a multinomial draw of as many images as it has, with
its cell frequencies), sums the sites' resampled matrices and scores the sum — a bootstrap
over images, stratified by site. It treats images as independent; with several images per
lesion the intervals are somewhat too narrow (one image per lesion: exact units).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .clinical import _ba_f1, _percentile_ci

#: Bootstrap resamples of the intervals.
N_BOOT = 1000


def _matrix(cm: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    m = np.asarray(cm, dtype=np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or np.any(m < 0):
        raise ValueError(f"not a confusion matrix: shape {m.shape}")
    return m


def _resampled(cm: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` multinomial resamples of a confusion matrix's images, ``(n_boot, C, C)``."""
    n = int(cm.sum())
    if n == 0:
        return np.zeros((n_boot, *cm.shape))
    draws = rng.multinomial(n, cm.ravel() / n, size=n_boot)
    return draws.reshape(n_boot, *cm.shape).astype(np.float64)


def _scores(cm: np.ndarray) -> dict[str, Any]:
    ba, f1 = _ba_f1(cm.astype(np.float64))
    n = int(cm.sum())
    return {"num_examples": n, "accuracy": float(np.trace(cm) / n) if n else None,
            "balanced_accuracy": float(ba), "macro_f1": float(f1)}


def pooled_scores(
    site_cms: Mapping[str, Sequence[Sequence[int]] | np.ndarray],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """Score the union of the sites' test predictions; name the worst site and the spread.

    Parameters
    ----------
    site_cms : Mapping[str, Sequence[Sequence[int]] | np.ndarray]
        Site → confusion matrix (rows: true class, columns: predicted), same classes.
    n_boot : int (default: 1000)
        Bootstrap resamples for the 95 % intervals (0: none).
    seed : int (default: 0)
        Bootstrap seed (fixed: a resumed run reports the same intervals).

    Returns
    -------
    dict[str, Any]
        ``num_examples``, ``accuracy``, ``balanced_accuracy``, ``macro_f1`` of the summed
        matrix, ``balanced_accuracy_ci`` and ``macro_f1_ci`` ([low, high] or None),
        ``confusion_matrix`` (the sum), ``sites`` (site → its ``balanced_accuracy``,
        ``balanced_accuracy_ci``, ``macro_f1``, ``num_examples``), ``worst_site``
        (``{"site", "balanced_accuracy", "balanced_accuracy_ci"}``) and ``spread``
        (``{"min", "max", "range"}`` of the sites' balanced accuracies).

    Raises
    ------
    ValueError
        If there is no site, or the matrices differ in shape.
    """
    cms = {site: _matrix(cm) for site, cm in sorted(site_cms.items())}
    if not cms or len({m.shape for m in cms.values()}) != 1:
        raise ValueError(f"need confusion matrices of one shape, got "
                         f"{ {s: m.shape for s, m in cms.items()} }")
    cms = {s: m for s, m in cms.items() if m.sum() > 0}
    if not cms:
        raise ValueError("every confusion matrix is empty")
    total = sum(cms.values())
    out = {**_scores(total), "balanced_accuracy_ci": None, "macro_f1_ci": None,
           "confusion_matrix": total.astype(int).tolist()}
    rng = np.random.default_rng(seed)
    boots = {s: _resampled(m, n_boot, rng) for s, m in cms.items()} if n_boot > 0 else {}
    if boots:
        ba, f1 = _ba_f1(sum(boots.values()))
        out["balanced_accuracy_ci"] = _percentile_ci(ba)
        out["macro_f1_ci"] = _percentile_ci(f1)
    sites: dict[str, dict[str, Any]] = {}
    for site, m in cms.items():
        scores = _scores(m)
        ci = _percentile_ci(_ba_f1(boots[site])[0]) if boots else None
        sites[site] = {"balanced_accuracy": scores["balanced_accuracy"],
                       "balanced_accuracy_ci": ci, "macro_f1": scores["macro_f1"],
                       "num_examples": scores["num_examples"]}
    worst = min(sites, key=lambda s: (sites[s]["balanced_accuracy"], s))
    values = [v["balanced_accuracy"] for v in sites.values()]
    out["sites"] = sites
    out["worst_site"] = {"site": worst, "balanced_accuracy": sites[worst]["balanced_accuracy"],
                         "balanced_accuracy_ci": sites[worst]["balanced_accuracy_ci"]}
    out["spread"] = {"min": min(values), "max": max(values), "range": max(values) - min(values)}
    return out
