"""The accuracy recipe's levers: colour constancy, sampler, logit adjustment, distillation, TTA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from common.balance import effective_prior, sampling_probs
from common.colour import apply_colour, illuminant
from common.errors import ConfigError, DataError
from common.losses import DistillationModel, LogitAdjustedLoss, distillation_kl
from common.model_meta import meta_path, model_meta, resolve_colour, write_meta
from common.tta import VIEWS, check_tta, tta_logits, view


def _lesion_like(seed: int = 0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 200, (size, size, 3)).astype(np.uint8)
    img[8:24, 8:24] = [90, 50, 40]  # a brown "lesion" on skin-coloured noise
    return img


# ------------------------------------------------------------------ colour constancy


def test_gray_world_on_a_known_image_gives_the_known_output():
    # Prepare: left half (200, 100, 50), right half (100, 50, 25): channel means 150/75/37.5
    img = np.zeros((2, 2, 3), np.uint8)
    img[:, 0] = [200, 100, 50]
    img[:, 1] = [100, 50, 25]

    # Execute
    out = apply_colour(img, "gray-world")

    # Assert: gains mean(150, 75, 37.5) / each = (0.5833, 1.1667, 2.3333) -> grey pixels
    np.testing.assert_array_equal(out[:, 0], [[117, 117, 117]] * 2)
    np.testing.assert_array_equal(out[:, 1], [[58, 58, 58]] * 2)


@pytest.mark.parametrize("method", ["shades-of-gray", "gray-world"])
def test_colour_constancy_cancels_a_global_colour_cast(method):
    # Prepare: the same scene under a warm and a cool illuminant
    img = _lesion_like()
    warm = np.clip(img * np.array([1.15, 1.0, 0.8]), 0, 255).astype(np.uint8)
    cool = np.clip(img * np.array([0.85, 1.0, 1.2]), 0, 255).astype(np.uint8)

    # Execute
    a, b = apply_colour(np.stack([warm, cool]), method)

    # Assert: the cast is gone (illuminants equal) and the images nearly agree
    before = np.abs(warm.astype(int) - cool.astype(int)).mean()
    after = np.abs(a.astype(int) - b.astype(int)).mean()
    assert after < before / 5
    est = illuminant(np.stack([a, b]), 6.0 if method == "shades-of-gray" else 1.0)
    assert np.ptp(est[0]) / est[0].mean() < 0.02


def test_colour_constancy_keeps_brightness_and_none_is_identity():
    img = _lesion_like(1)
    assert apply_colour(img, "none") is img
    out = apply_colour(img, "shades-of-gray")
    assert abs(out.mean() - img.mean()) < 0.05 * img.mean()


def test_colour_constancy_refuses_bad_input():
    with pytest.raises(ConfigError, match="shades-of-gray"):
        apply_colour(_lesion_like(), "retinex")
    with pytest.raises(DataError, match="uint8"):
        apply_colour(_lesion_like().astype(np.float32) / 255, "gray-world")


# ------------------------------------------------------------------ balanced sampling


@pytest.mark.parametrize(
    "power, expected", [(1.0, [0.5, 0.5]), (0.5, [0.75, 0.25]), (0.0, [0.9, 0.1])]
)
def test_sampler_draws_classes_at_the_asked_frequencies(power, expected):
    # Prepare: 900 images of class 0, 100 of class 1
    from common.augment import make_dataset

    y = np.array([0] * 900 + [1] * 100)
    x = np.zeros((1000, 4, 4, 3), np.uint8)
    ds = make_dataset(x, y, batch_size=250, sample_probs=sampling_probs(y, power), seed=3)

    # Execute: 4 epochs
    drawn = np.concatenate([b[1].numpy() for _ in range(4) for b in ds])

    # Assert: class frequencies within 3 points of n_c^(1-p) / sum; epochs differ
    freq = np.bincount(drawn, minlength=2) / len(drawn)
    np.testing.assert_allclose(freq, expected, atol=0.03)
    np.testing.assert_allclose(effective_prior(y, 2, power), expected, atol=1e-9)
    assert len(drawn) == 4000


def test_sampler_refuses_a_power_outside_0_1():
    with pytest.raises(ConfigError, match="sampling power"):
        sampling_probs(np.array([0, 1]), 1.5)


# ------------------------------------------------------------------ losses


def test_logit_adjusted_loss_matches_a_hand_computation():
    # Prepare
    prior = np.array([0.7, 0.2, 0.1])
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]], np.float32)
    y = np.array([0, 2])

    # Execute
    loss = float(LogitAdjustedLoss(prior, tau=1.0)(y, logits))

    # Assert: mean of -log softmax(z + log prior)[y]
    z = logits + np.log(prior)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    expected = -np.mean(np.log(p[np.arange(2), y]))
    assert loss == pytest.approx(expected, rel=1e-5)
    plain = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits))
    assert float(LogitAdjustedLoss(prior, tau=0.0)(y, logits)) == pytest.approx(plain, rel=1e-5)


def test_logit_adjusted_loss_refuses_an_empty_class():
    with pytest.raises(ConfigError, match="positive class prior"):
        LogitAdjustedLoss([0.5, 0.5, 0.0])


def test_distillation_kl_matches_a_hand_computation():
    t = np.array([[2.0, 0.0, -1.0]], np.float32)
    s = np.array([[0.5, 0.5, 0.0]], np.float32)
    temp = 2.0
    pt = np.exp(t / temp) / np.exp(t / temp).sum()
    ps = np.exp(s / temp) / np.exp(s / temp).sum()
    expected = temp**2 * np.sum(pt * np.log(pt / ps))
    assert float(distillation_kl(t, s, temp)[0]) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_kl(t, t, temp)[0]) == pytest.approx(0.0, abs=1e-6)


def test_distillation_moves_the_student_towards_the_teacher():
    # Prepare: a fixed teacher and a student that starts elsewhere
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    teacher = keras.Model(inp, keras.layers.Dense(3, name="t")(inp))
    student = keras.Model(inp, keras.layers.Dense(3, name="s")(inp))
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = np.zeros(64, np.int64)
    trainer = DistillationModel(student, teacher, temperature=2.0, weight=1.0)
    trainer.compile(optimizer=keras.optimizers.Adam(0.05),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = float(tf.reduce_mean(distillation_kl(teacher(x), student(x), 2.0)))
    teacher_weights = [w.copy() for w in teacher.get_weights()]

    # Execute
    trainer.fit(x, y, epochs=30, batch_size=64, verbose=0)

    # Assert: KD shrank, teacher untouched
    after = float(tf.reduce_mean(distillation_kl(teacher(x), student(x), 2.0)))
    assert after < before / 3
    for a, b in zip(teacher_weights, teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_distillation_refuses_bad_settings():
    with pytest.raises(ConfigError, match="temperature"):
        DistillationModel(keras.Sequential(), keras.Sequential(), temperature=0.0)
    with pytest.raises(ConfigError, match="weight"):
        DistillationModel(keras.Sequential(), keras.Sequential(), weight=1.5)


# ------------------------------------------------------------------ test-time augmentation


def test_views_are_the_eight_symmetries_of_the_square():
    x = np.arange(2 * 3 * 3 * 1).reshape(2, 3, 3, 1)
    seen = {view(x, name).tobytes() for name in VIEWS}
    assert len(seen) == 8


def test_tta_averages_the_logits_of_its_views():
    # Prepare: a model that is not flip invariant
    keras.utils.set_random_seed(1)
    inp = keras.Input((6, 6, 3))
    out = keras.layers.Dense(4)(keras.layers.Flatten()(inp))
    model = keras.Model(inp, out)
    x = np.random.default_rng(2).integers(0, 255, (5, 6, 6, 3)).astype(np.uint8)

    # Execute
    mean2, info = tta_logits(model, x, 2)
    mean1, _ = tta_logits(model, x, 1)

    # Assert
    expected = (model.predict(x.astype(np.float32), verbose=0)
                + model.predict(x[:, :, ::-1].astype(np.float32), verbose=0)) / 2
    np.testing.assert_allclose(mean2, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(mean1, mean2)
    assert info["views"] == ["identity", "flip-lr"] and info["ms_per_image_per_view"] > 0


@pytest.mark.parametrize("bad", [0, -1, 9, 2.5])
def test_tta_count_must_be_1_to_8(bad):
    with pytest.raises(ConfigError, match="--tta"):
        check_tta(bad)


# ------------------------------------------------------------------ model metadata


def test_a_model_cannot_be_scored_with_another_colour_setting(tmp_path):
    model = tmp_path / "model.fbz"
    write_meta(model, model_meta(variant="qana-akd1000", size=64, class_names=["a", "b"],
                                 colour="shades-of-gray"))
    assert json.loads(meta_path(model).read_text())["preprocessing"]["colour_constancy"] == (
        "shades-of-gray"
    )
    assert resolve_colour(model, None) == ("shades-of-gray", "metadata")
    with pytest.raises(ConfigError, match="trained with"):
        resolve_colour(model, "none")
    assert resolve_colour(tmp_path / "other.fbz", None)[0] == "none"


# ------------------------------------------------------------------ spike margin


def test_spike_margin_pushes_pre_spike_values_out_of_the_threshold_band():
    # Prepare: values crowding the 0.5 threshold, as in an undertrained QANA head
    from common.models.blocks import SpikeReLU

    layer = SpikeReLU(name="head_spike")
    layer.margin = 0.2
    x = tf.Variable(np.linspace(0.35, 0.65, 64, dtype=np.float32)[None])
    opt = keras.optimizers.SGD(0.05)

    # Execute: minimise the margin loss alone
    for _ in range(60):
        with tf.GradientTape() as tape:
            layer(x, training=True)
            loss = tf.add_n(layer.losses)
        opt.apply_gradients([(tape.gradient(loss, x), x)])

    # Assert: nothing left within the band, each value moved away on its own side
    final = x.numpy()[0]
    assert np.all(np.abs(final - 0.5) >= 0.19)
    assert np.all((final >= 0.5) == (np.linspace(0.35, 0.65, 64) >= 0.5))
    off = SpikeReLU(name="off")
    off(x, training=True)
    assert off.losses == []


def test_spike_margin_outside_0_to_half_is_refused():
    from common.train import TrainConfig, set_spike_margin

    with pytest.raises(ConfigError, match="spike_margin"):
        set_spike_margin(keras.Sequential(), 0.6)
    assert TrainConfig().spike_margin == 0.0


def test_a_class_without_training_images_keeps_the_prior_positive():
    prior = effective_prior(np.array([0, 0, 0, 2]), 3)
    np.testing.assert_allclose(prior, [3 / 5, 1 / 5, 1 / 5])
    LogitAdjustedLoss(prior)  # defined: no error for the empty class
