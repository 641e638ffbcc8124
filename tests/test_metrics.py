import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from common.errors import DataError
from common.metrics import classification_metrics


def test_metrics_match_sklearn_and_list_every_class():
    # Prepare: an imbalanced problem where top-1 flatters the model
    names = ("a", "b", "c", "d")
    y_true = np.array([0] * 90 + [1] * 5 + [2] * 5)
    y_pred = np.array([0] * 90 + [0] * 5 + [2, 2, 2, 0, 0])

    # Execute
    m = classification_metrics(y_true, y_pred, names)

    # Assert
    assert m["accuracy"] == pytest.approx(0.93)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert set(m["per_class"]) == set(names)
    assert m["per_class"]["d"]["support"] == 0
    assert np.asarray(m["confusion_matrix"]).shape == (4, 4)
    assert np.asarray(m["confusion_matrix"]).sum() == 100


def test_metrics_refuse_mismatched_or_empty_input():
    with pytest.raises(DataError, match="3 true labels but 2"):
        classification_metrics([0, 1, 1], [0, 1], ("a", "b"))
    with pytest.raises(DataError, match="no examples"):
        classification_metrics([], [], ("a", "b"))
