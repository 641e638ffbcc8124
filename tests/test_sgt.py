"""Saliency-guided training: exact loss (CE + weighted KL), masking, training, quantized models."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from common.errors import ConfigError
from common.sgt import SaliencyGuidedModel, mask_lowest, sgt_fit

L = keras.layers
SIZE = 16


def _tiny(num_classes: int = 3, seed: int = 0) -> keras.Model:
    """A BatchNorm-free CNN, so training and inference forward passes are identical."""
    keras.utils.set_random_seed(seed)
    inputs = L.Input((SIZE, SIZE, 3), name="input")
    x = L.Rescaling(1 / 255, name="t_rescale")(inputs)
    x = L.Conv2D(8, 3, strides=2, padding="same", name="t_conv1")(x)
    x = L.ReLU(6.0, name="t_relu1")(x)
    x = L.Conv2D(8, 3, strides=2, padding="same", name="t_conv2")(x)
    x = L.ReLU(6.0, name="t_relu2")(x)
    x = L.GlobalAveragePooling2D(name="t_pool")(x)
    return keras.Model(inputs, L.Dense(num_classes, name="t_dense")(x), name="tiny")


def _batch(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.float32), rng.integers(0, 3, n)


def _expected_losses(model: keras.Model, x: np.ndarray, y: np.ndarray, k: float) -> tuple:
    """CE and KL computed independently: per-image saliency, numpy masking and softmax."""
    masked = x.copy()
    for i in range(len(x)):
        xi = tf.constant(x[i : i + 1])
        with tf.GradientTape() as tape:
            tape.watch(xi)
            logit = model(xi)[0, int(y[i])]
        sal = np.abs(tape.gradient(logit, xi).numpy()[0]).sum(-1).ravel()
        lowest = np.argsort(sal, kind="stable")[: int(np.floor(k * sal.size))]
        rows, cols = np.unravel_index(lowest, (SIZE, SIZE))
        masked[i, rows, cols, :] = x[i].mean(axis=(0, 1))

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    log_p = log_softmax(model.predict(x, verbose=0))
    log_q = log_softmax(model.predict(masked, verbose=0))
    ce = -log_p[np.arange(len(y)), y].mean()
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()
    return ce, kl


def test_sgt_loss_is_cross_entropy_plus_weighted_kl():
    # Prepare
    model = _tiny()
    x, y = _batch()
    ce_expected, kl_expected = _expected_losses(model, x, y, k=0.25)
    sgt = SaliencyGuidedModel(model, mask_fraction=0.25, kl_weight=0.5)
    sgt.compile(optimizer=keras.optimizers.SGD(0.0))
    # Execute
    direct = {k: float(v) for k, v in sgt.sgt_losses(x, y).items()}
    step = sgt.train_on_batch(x, y, return_dict=True)  # the fit path, learning rate 0
    # Assert
    assert kl_expected > 1e-6  # masking changed the outputs: the term is not trivially 0
    assert direct["ce"] == pytest.approx(ce_expected, rel=1e-4)
    assert direct["kl"] == pytest.approx(kl_expected, rel=1e-3, abs=1e-7)
    assert direct["loss"] - direct["ce"] == pytest.approx(0.5 * kl_expected, rel=1e-3, abs=1e-7)
    assert step["loss"] == pytest.approx(ce_expected + 0.5 * kl_expected, rel=1e-4)
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, model(x))
    assert step["ce"] == pytest.approx(float(plain), rel=1e-5)


def test_mask_lowest_replaces_exactly_the_least_salient_pixels():
    # Prepare
    x = np.full((1, 4, 4, 3), 200.0, dtype=np.float32)
    x[0, 0, 0] = 0.0
    saliency = np.arange(16, dtype=np.float32).reshape(1, 4, 4)[:, ::-1, :].copy()
    # Execute: 25 % of 16 pixels = the 4 lowest (bottom row, saliency 0..3)
    out = mask_lowest(tf.constant(x), tf.constant(saliency), 0.25, mask_value=7.0).numpy()
    # Assert
    changed = np.any(out != x, axis=-1)[0]
    assert changed.sum() == 4 and changed[3].all()
    np.testing.assert_array_equal(out[0, 3], 7.0)


def test_sgt_fit_trains_a_tiny_model():
    # Prepare
    from common.augment import make_dataset
    from common.loaders import load_dataset
    from common.preprocess import load_arrays

    ds = load_dataset(f"synthetic:n=120,size={SIZE}")
    x, y = load_arrays(ds, SIZE), ds.labels
    model = _tiny(num_classes=ds.num_classes)
    data = make_dataset(x, y, batch_size=16, augment=False, shuffle=True, seed=0)
    before = [w.copy() for w in model.get_weights()]
    # Execute
    history = sgt_fit(model, data, epochs=6, lr=1e-2, mask_fraction=0.2)
    # Assert: the wrapped model itself was trained, and the SGT loss went down
    assert history["loss"][-1] < history["loss"][0]
    assert all(np.isfinite(history["kl"])) and min(history["kl"]) >= 0
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_sgt_step_on_a_quantized_qana_model():
    # Prepare
    from common.models import create_model
    from common.quantize import quantize_model

    size = 48
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, size, size, 3)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    qmodel = quantize_model(create_model("qana-akd1000", input_size=size, num_classes=3,
                                         width=0.25), "qana-akd1000", x)
    before = [w.copy() for w in qmodel.get_weights()]
    sgt = SaliencyGuidedModel(qmodel, mask_fraction=0.1)
    sgt.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)  # one step: no tracing
    # Execute
    step = sgt.train_on_batch(x, y, return_dict=True)
    # Assert: straight-through gradients give a finite loss, a KL >= 0 and updated weights
    assert np.isfinite(step["loss"]) and step["kl"] >= 0
    assert step["loss"] == pytest.approx(step["ce"] + step["kl"], rel=1e-5)
    assert any(not np.array_equal(a, b) for a, b in zip(before, qmodel.get_weights(),
                                                        strict=True))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_mask_fraction_outside_open_unit_interval_is_refused(fraction):
    with pytest.raises(ConfigError, match="mask_fraction"):
        SaliencyGuidedModel(_tiny(), mask_fraction=fraction)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"kl_weight": -1.0}, "kl_weight"), ({"mask_value": "zeros"}, "mask_value"),
     ({"mask_value": 300.0}, "mask_value")],
)
def test_other_bad_sgt_options_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        SaliencyGuidedModel(_tiny(), **options)
