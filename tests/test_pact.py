"""PACT: learnable clips replace bounded ReLUs, α is learned and used by quantization, Akida."""

from __future__ import annotations

import numpy as np
import pytest
import tf_keras as keras

from common.errors import ConfigError, ModelError
from common.models import SPIKE_LAYER, create_model
from common.pact import PACTReLU, apply_pact, bake_pact, effective_ranges, pact_alphas

VARIANT = "qana-akd1000"
SIZE = 48


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    """A tiny QANA with PACT clips started at α=1, trained a few steps (α and BN stats move)."""
    keras.utils.set_random_seed(0)
    model = create_model(VARIANT, input_size=SIZE, num_classes=3, width=0.25)
    pact = apply_pact(model, alpha_init=1.0, l2=1e-3)
    pact.compile(keras.optimizers.Adam(5e-2),
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _images(96), np.random.default_rng(1).integers(0, 3, 96)
    pact.fit(x, y, batch_size=16, epochs=1, verbose=0)
    return pact


@pytest.fixture(scope="module")
def quantized(trained):
    """The trained PACT model baked and quantized, calibrated on one batch (ranges = maxima)."""
    from common.quantize import quantize_model

    calibration = _images(32, seed=2)
    baked = bake_pact(trained)
    return baked, quantize_model(baked, VARIANT, calibration, batch_size=32), calibration


def test_apply_pact_keeps_names_weights_and_spike_layer():
    # Prepare
    model = create_model(VARIANT, input_size=SIZE, num_classes=3, width=0.25)
    bounded = [la.name for la in model.layers
               if type(la) is keras.layers.ReLU and la.name != SPIKE_LAYER]
    x = _images(4)
    # Execute
    pact = apply_pact(model)  # α starts at each ReLU's own bound (6): same function
    # Assert
    assert [la.name for la in pact.layers] == [la.name for la in model.layers]
    assert sorted(pact_alphas(pact)) == sorted(bounded)
    assert set(pact_alphas(pact).values()) == {6.0}
    # the 1-bit spike generator (a SpikeReLU, or a ReLU(max 1) in older models) stays as it is
    assert type(pact.get_layer(SPIKE_LAYER)) is type(model.get_layer(SPIKE_LAYER))
    np.testing.assert_allclose(pact.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_alpha_is_learned_with_its_l2_penalty(trained):
    # Execute
    alphas = pact_alphas(trained)
    # Assert: every α left its initial value; the penalty is l2·α² per layer
    assert len(alphas) == 12
    assert all(abs(a - 1.0) > 1e-3 for a in alphas.values()), alphas
    penalty = float(sum(loss.numpy() for loss in trained.losses))
    assert penalty == pytest.approx(1e-3 * sum(a * a for a in alphas.values()), rel=1e-4)


def test_pact_clip_gradient_goes_to_alpha_where_input_saturates():
    # Prepare
    import tensorflow as tf

    layer = PACTReLU(2.0, l2=0.0)
    x = tf.constant([-1.0, 0.5, 1.5, 2.5, 3.0])
    # Execute
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = layer(x)
        total = tf.reduce_sum(y)
    d_alpha = tape.gradient(total, layer.alpha)
    d_x = tape.gradient(total, x)
    # Assert
    np.testing.assert_allclose(y.numpy(), [0.0, 0.5, 1.5, 2.0, 2.0])
    assert float(d_alpha) == 2.0  # two saturated inputs
    np.testing.assert_allclose(d_x.numpy(), [0.0, 1.0, 1.0, 0.0, 0.0])


def test_baked_alpha_sets_quantized_activation_ranges(trained, quantized):
    # Prepare
    baked, qmodel, calibration = quantized
    alphas = pact_alphas(trained)
    # Execute
    ranges = effective_ranges(qmodel)
    # Assert: ReLU bounds are the learned α; each 4-bit range is the calibrated maximum of the
    # clipped activation, i.e. min(α, largest pre-clip value) — α itself where it saturates.
    observed = keras.Model(baked.input, [baked.get_layer(n).output for n in alphas])
    maxima = [float(np.max(a)) for a in observed.predict(calibration, verbose=0)]
    saturated = 0
    for (name, alpha), seen in zip(alphas.items(), maxima, strict=True):
        assert baked.get_layer(name).max_value == pytest.approx(alpha)
        assert seen <= alpha + 1e-6
        assert ranges[name] == pytest.approx(seen, rel=0.02), name
        saturated += seen == pytest.approx(alpha, rel=1e-6)
    assert saturated >= 3, (alphas, maxima)
    np.testing.assert_allclose(baked.predict(calibration[:4], verbose=0),
                               trained.predict(calibration[:4], verbose=0), rtol=1e-5, atol=1e-6)


def test_pact_trained_model_converts_to_akida_bit_for_bit(quantized):
    # Prepare (runs after the range test: convert_exact rescales qmodel's output scales in place)
    from common.akida_exact import convert_exact
    from common.pact import release_saturating_clips
    from common.parity import check_parity

    _, qmodel, calibration = quantized
    ranges = effective_ranges(qmodel)
    # Execute: clips at the calibrated range (α) move out of reach, as on Akida 1.0
    released = release_saturating_clips(qmodel)
    ak_model = convert_exact(qmodel, VARIANT)
    report = check_parity(qmodel, ak_model, calibration.astype(np.uint8), per_layer=True)
    # Assert (without the release: 0.6 % of stem activations one level off, agreement 0.81)
    assert tuple(ak_model.output_shape) == (1, 1, 3)
    # every calibrated range is at most its α (calibrated on clipped values): all 12 go
    assert set(released) == set(ranges) - {SPIKE_LAYER} and len(released) == 12
    for name in released:  # still bounded (cnn2snn needs it), never reached before saturation
        assert qmodel.get_layer(name).max_value == pytest.approx(2 * ranges[name])
    assert report.top1_agreement == 1.0
    assert all(layer["mismatch_fraction"] == 0 for layer in report.to_dict()["layers"]
               if layer["compared"]), report.to_dict()["layers"]


def test_pact_model_saves_and_loads(tmp_path, trained):
    # Execute
    trained.save(tmp_path / "pact.h5")
    from common.models import GhostFold

    loaded = keras.models.load_model(tmp_path / "pact.h5", compile=False,
                                     custom_objects={"GhostFold": GhostFold})
    # Assert
    assert pact_alphas(loaded) == pytest.approx(pact_alphas(trained))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_non_positive_alpha_is_refused(alpha):
    model = create_model(VARIANT, input_size=SIZE, num_classes=3, width=0.25)
    with pytest.raises(ConfigError, match="alpha_init"):
        apply_pact(model, alpha_init=alpha)
    with pytest.raises(ConfigError, match="alpha_init"):
        PACTReLU(alpha)


def test_bake_without_pact_layers_is_refused():
    model = create_model(VARIANT, input_size=SIZE, num_classes=3, width=0.25)
    with pytest.raises(ModelError, match="no PACTReLU"):
        bake_pact(model)
