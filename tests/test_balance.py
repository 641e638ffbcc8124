"""Class balancing of the training split only, and class weights."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from common.balance import balance, balance_train, class_weights
from common.errors import ConfigError, DataError


def split_arrays(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train/val/test arrays like a lesion-level split gives: 8x8 images, imbalanced train."""
    rng = np.random.default_rng(seed)

    def arrays(counts: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        y = np.concatenate([np.full(n, c) for c, n in counts.items()]).astype(np.int64)
        x = rng.integers(0, 256, (len(y), 8, 8, 3), dtype=np.uint8)
        return x, y

    return {
        "train": arrays({0: 20, 1: 6, 2: 3, 3: 1}),
        "val": arrays({0: 5, 1: 2, 2: 1}),
        "test": arrays({0: 5, 1: 1, 3: 1}),
    }


def test_smote_balances_train_only_and_keeps_originals() -> None:
    # Prepare
    split = split_arrays()
    frozen = {name: (x.copy(), y.copy()) for name, (x, y) in split.items()}
    train_x, train_y = split["train"]

    # Execute
    x, y = balance_train(train_x, train_y, method="smote", seed=0)

    # Assert: every class now has the majority count.
    assert Counter(y.tolist()) == {0: 20, 1: 20, 2: 20, 3: 20}
    assert x.dtype == np.uint8 and x.shape == (80, 8, 8, 3) and y.dtype == train_y.dtype
    # Originals first and unchanged, then exactly the missing number of synthetic samples.
    np.testing.assert_array_equal(x[: len(train_x)], train_x)
    np.testing.assert_array_equal(y[: len(train_y)], train_y)
    needed = sum(20 - n for n in Counter(train_y.tolist()).values())
    assert len(x) - len(train_x) == needed == 14 + 17 + 19
    # SMOTE samples are new images (interpolations), not copies of originals ...
    synthetic = x[len(train_x):][y[len(train_y):] == 1]
    originals = {img.tobytes() for img in train_x}
    assert sum(img.tobytes() not in originals for img in synthetic) == len(synthetic) == 14
    # ... except the single-sample class, which can only be duplicated.
    assert all((img == train_x[train_y == 3][0]).all() for img in x[y == 3])
    # Validation and test arrays are untouched.
    for name in ("val", "test"):
        np.testing.assert_array_equal(split[name][0], frozen[name][0])
        np.testing.assert_array_equal(split[name][1], frozen[name][1])
    np.testing.assert_array_equal(train_x, frozen["train"][0])


def test_smote_samples_lie_between_same_class_images() -> None:
    # Prepare: class 1 images are all dark (0-20), class 0 all bright (200-255).
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.integers(200, 256, (10, 4, 4, 3)), rng.integers(0, 21, (3, 4, 4, 3))])
    y = np.array([0] * 10 + [1] * 3)

    # Execute
    xb, yb = balance(x.astype(np.uint8), y, method="smote", seed=1)

    # Assert
    assert xb[13:].max() <= 20 and (yb[13:] == 1).all()


def test_smote_is_seeded() -> None:
    x, y = split_arrays()["train"]
    a, b, c = (balance(x, y, "smote", seed=s)[0] for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_oversample_duplicates_to_balance() -> None:
    # Prepare
    x, y = split_arrays()["train"]

    # Execute
    xb, yb = balance(x, y, method="oversample", seed=0)

    # Assert
    assert Counter(yb.tolist()) == {0: 20, 1: 20, 2: 20, 3: 20}
    np.testing.assert_array_equal(xb[: len(x)], x)
    originals = {img.tobytes() for img in x}
    assert all(img.tobytes() in originals for img in xb)


def test_none_is_identity() -> None:
    x, y = split_arrays()["train"]
    xb, yb = balance_train(x, y, method="none")
    assert xb is x and yb is y


def test_errors() -> None:
    x, y = split_arrays()["train"]
    with pytest.raises(ConfigError, match="'adasyn'"):
        balance(x, y, method="adasyn")
    with pytest.raises(DataError, match="uint8"):
        balance(x.astype(np.float32), y)
    with pytest.raises(DataError, match="labels"):
        balance(x, y[:-1])


def test_class_weights_balanced_with_absent_class() -> None:
    # Prepare: 6 of class 0, 2 of class 2, none of 1 and 3.
    y = np.array([0] * 6 + [2] * 2)

    # Execute
    weights = class_weights(y, num_classes=4)

    # Assert: n / (present_classes * count); absent classes neutral.
    assert weights == pytest.approx({0: 8 / (2 * 6), 1: 1.0, 2: 8 / (2 * 2), 3: 1.0})
    with pytest.raises(DataError, match="num_classes"):
        class_weights(np.array([0, 5]), num_classes=4)
