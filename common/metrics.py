"""Classification metrics reported everywhere: balanced accuracy and macro F1, not only top-1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import DataError


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Compute the metric set of every qanafed report.

    Parameters
    ----------
    y_true : Sequence[int] | np.ndarray
        True label indices.
    y_pred : Sequence[int] | np.ndarray
        Predicted label indices.
    class_names : Sequence[str]
        Class names in label-index order; classes absent from ``y_true`` are still listed.

    Returns
    -------
    dict[str, Any]
        ``accuracy``, ``balanced_accuracy`` (mean recall over classes present in ``y_true``),
        ``macro_f1`` (over classes present in ``y_true`` or ``y_pred``), ``per_class``
        (name → precision, recall, f1, support), ``confusion_matrix`` (rows: true, columns:
        predicted) and ``num_examples``.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    yt = np.asarray(y_true, dtype=np.int64).ravel()
    yp = np.asarray(y_pred, dtype=np.int64).ravel()
    if yt.shape != yp.shape:
        raise DataError(f"{len(yt)} true labels but {len(yp)} predictions")
    if len(yt) == 0:
        raise DataError("no examples to score", "evaluate on a non-empty split")
    labels = np.arange(len(class_names))
    cm = confusion_matrix(yt, yp, labels=labels)
    prec, rec, f1, support = precision_recall_fscore_support(
        yt, yp, labels=labels, zero_division=0
    )
    present = support > 0
    predicted_or_present = present | (cm.sum(axis=0) > 0)
    return {
        "num_examples": int(len(yt)),
        "accuracy": float(np.mean(yt == yp)),
        "balanced_accuracy": float(np.mean(rec[present])),
        "macro_f1": float(np.mean(f1[predicted_or_present])),
        "per_class": {
            name: {
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.astype(int).tolist(),
    }


def headline(metrics: dict[str, Any]) -> str:
    """One-line summary: accuracy, balanced accuracy and macro F1."""
    return (
        f"acc {metrics['accuracy']:.3f}  bal-acc {metrics['balanced_accuracy']:.3f}  "
        f"macro-F1 {metrics['macro_f1']:.3f}"
    )
