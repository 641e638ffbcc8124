"""The federation's accuracy recipe on a tiny real Keras model: each site's batches follow its
square-root balanced sampler, the local step's loss is cross-entropy on ``logits + tau · log
prior`` of the site's own prior, two sites sharing one compiled step each get their own offset,
and bad recipe values are refused naming the key, the value and the fix."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from common import site
from common.errors import ConfigError
from common.fedconfig import parse_config
from common.local_training import compile_local

CLASSES = ("a", "b", "c")
SIZE = 8


def _tiny_model():
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(len(CLASSES))(x))


def _site(counts: tuple[int, ...], seed: int) -> site.SiteData:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    x = rng.integers(0, 256, (len(y), SIZE, SIZE, 3), dtype=np.uint8)
    return site.SiteData(f"site-{seed}", CLASSES, x, y, x[:3], y[:3])


def _cfg(**extra):
    return parse_config({"name": "recipe", "data": "synthetic", "batch-size": 32,
                         "balance": "sampler", "sampling-power": 0.5,
                         "loss": "logit-adjusted", "la-tau": 1.0, **extra})


def _hand_loss(logits: np.ndarray, y: np.ndarray, prior: np.ndarray, tau: float) -> float:
    z = logits.astype(np.float64) + tau * np.log(prior)
    log_softmax = z - z.max(axis=1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(axis=1, keepdims=True))
    return float(-np.mean(log_softmax[np.arange(len(y)), y]))


def _step_loss(local, x: np.ndarray, y: np.ndarray) -> float:
    """The compiled step's label loss on one batch, without moving the weights (lr 0)."""
    import tensorflow as tf

    local.optimizer.learning_rate = 0.0
    return float(local.step(tf.constant(x, tf.float32), tf.constant(y, tf.int32)))


def test_a_sites_batches_follow_its_square_root_balanced_sampler():
    # Prepare: a site with 400 / 100 / 25 images; a step that records the labels it is given
    data = _site((400, 100, 25), seed=1)
    local = compile_local(_tiny_model())
    seen: list[np.ndarray] = []

    def record(x, y):
        seen.append(np.asarray(y))
        return 0.0

    # Execute
    out = site.train_local(dataclasses.replace(local, step=record), data, _cfg(), lr=1e-3,
                           epochs=8, seed=3)

    # Assert: classes drawn in proportion to sqrt(n_c) = 20 : 10 : 5, as many draws as images
    labels = np.concatenate(seen)
    assert out["train_examples"] == 525 and len(labels) == 8 * 525
    freq = np.bincount(labels, minlength=3) / len(labels)
    np.testing.assert_allclose(freq, np.array([20, 10, 5]) / 35, atol=0.02)
    # and the loss is adjusted by this site's own batch prior, sqrt(n_c) normalised
    np.testing.assert_allclose(local.label_loss.offset, np.log(np.array([20, 10, 5]) / 35),
                               rtol=1e-5)


def test_the_local_step_loss_is_cross_entropy_on_logits_plus_tau_log_prior():
    # Prepare: a known prior, tau 0.7; a batch and the model's plain logits
    local = compile_local(_tiny_model())
    prior = np.array([0.6, 0.3, 0.1])
    data = _site((5, 4, 3), seed=2)
    logits = local.model(data.x_train.astype(np.float32), training=False).numpy()

    # Execute
    local.set_prior(prior, 0.7)
    adjusted = _step_loss(local, data.x_train, data.y_train)
    local.set_prior(None, 0.0)
    plain = _step_loss(local, data.x_train, data.y_train)

    # Assert (the step's forward pass is in training mode: no dropout or BN in this model)
    assert adjusted == pytest.approx(_hand_loss(logits, data.y_train, prior, 0.7), rel=1e-5)
    assert plain == pytest.approx(_hand_loss(logits, data.y_train, np.ones(3) / 3, 0.0),
                                  rel=1e-5)
    assert adjusted != pytest.approx(plain, rel=1e-3)


def test_a_missing_class_counts_as_one_image_in_the_site_prior():
    # Prepare: 36 images of class a, 4 of b, none of c; square-root sampler
    y = np.array([0] * 36 + [1] * 4)

    # Execute
    prior = site.site_prior(_cfg(), y, 3)
    natural = site.site_prior(_cfg(balance="none"), y, 3)

    # Assert: masses 6, 2, 1 (sqrt of 36, 4, and the one image an absent class counts as)
    np.testing.assert_allclose(prior, np.array([6, 2, 1]) / 9)
    np.testing.assert_allclose(natural, np.array([36, 4, 1]) / 41)


def test_two_sites_sharing_one_compiled_step_each_train_with_their_own_offset():
    # Prepare: two sites with opposite class mixes, one compiled step
    cfg = _cfg()
    local = compile_local(_tiny_model())
    first, second = _site((90, 9, 1), seed=4), _site((1, 9, 90), seed=5)
    x, y = first.x_train[::10], first.y_train[::10]
    losses, offsets = [], []

    # Execute: a round of each site, then the step on one fixed batch with that site's offset
    for data in (first, second, first):
        site.train_local(local, data, cfg, lr=1e-3, epochs=1, seed=0)
        offsets.append(local.label_loss.offset.copy())
        logits = local.model(x.astype(np.float32), training=False).numpy()
        losses.append((_step_loss(local, x, y), logits))

    # Assert: each site's own prior, read by the one trace at every call
    for data, offset, (loss, logits) in zip((first, second, first), offsets, losses,
                                            strict=True):
        prior = site.site_prior(cfg, data.y_train, 3)
        np.testing.assert_allclose(offset, np.log(prior), rtol=1e-5)
        assert loss == pytest.approx(_hand_loss(logits, y, prior, 1.0), rel=1e-5)
    assert offsets[0][0] > offsets[0][2] and offsets[1][0] < offsets[1][2]
    assert local.step.experimental_get_tracing_count() == 1


def test_a_new_round_starts_without_the_previous_sites_offset():
    local = compile_local(_tiny_model())
    local.set_prior(np.array([0.8, 0.1, 0.1]), 1.0)

    local.start_round({}, lr=1e-3, proximal_mu=0.0)

    np.testing.assert_array_equal(local.label_loss.offset, np.zeros(3))  # plain cross-entropy


def test_softmax_models_refuse_logit_adjustment():
    import tf_keras as keras

    from common.errors import ModelError

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    local = compile_local(keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)))
    local.set_prior(None, 0.0)  # plain cross-entropy is fine
    with pytest.raises(ModelError, match="softmax"):
        local.set_prior(np.ones(3) / 3, 1.0)


@pytest.mark.parametrize(("extra", "where", "received", "fix"), [
    ({"sampling-power": 1.5}, "sampling-power", "1.5", "0.5 (square-root"),
    ({"sampling-power": -0.1}, "sampling-power", "-0.1", "use 1 (class-balanced)"),
    ({"la-tau": -1}, "la-tau", "-1", "use e.g. 1.0"),
    ({"la-tau": float("inf")}, "la-tau", "inf", "use e.g. 1.0"),
    ({"tta": 0}, "tta", "0", "use 1 (no test-time augmentation) to 8"),
    ({"tta": 9}, "tta", "9", "use 1 (no test-time augmentation) to 8"),
    ({"loss": "focal"}, "loss", "'focal'", "loss: ce, logit-adjusted"),
    ({"balance": "weights"}, "balance", "'weights'", "balance: none, oversample, smote, sampler"),
])
def test_bad_recipe_values_name_the_key_the_value_and_the_fix(extra, where, received, fix):
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "data": "d", **extra}, "s.yaml")
    text = str(err.value)
    assert f"s.yaml: {where}:" in text and f"received {received}" in text, text
    assert fix in text, text


def test_recipe_keys_default_to_todays_behaviour_and_dump_kebab_case():
    cfg = parse_config({"name": "x", "data": "d"})
    assert (cfg.balance, cfg.loss, cfg.tta) == ("none", "ce", 1)
    dumped = _cfg(tta=8).dump()
    assert (dumped["balance"], dumped["sampling-power"], dumped["loss"], dumped["la-tau"],
            dumped["tta"]) == ("sampler", 0.5, "logit-adjusted", 1.0, 8)
