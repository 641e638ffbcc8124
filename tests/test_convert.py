"""Every registered variant: quantize, convert (or be refused), parity, map, hash, save/load."""

from __future__ import annotations

import akida
import numpy as np
import pytest
import tf_keras as keras

import common  # noqa: F401  (legacy Keras env)
from common.akida_exact import convert_exact
from common.convert import convert_model, load_akida, model_hash, save_akida
from common.errors import DataError, ModelError
from common.models import HEAD_DENSE, StageSpec, VariantInfo, create_model, list_variants
from common.parity import check_parity
from common.quantize import qat_compile, quantize_model

CLASSES = 3
#: Tiny stage tables per target (few layers: quantizeml/cnn2snn cost grows with layer count).
TINY_STAGES = {
    "akd1000": (StageSpec(32, stride=1), StageSpec(64)),
    "akida2": (StageSpec(32, stride=1, attention="eca", residual=True),),
    "float": (StageSpec(32, stride=1, attention="eca", residual=True),),
}
#: Virtual devices to map on, per target.
DEVICES = {"akd1000": "AKD1000", "akida2": "TwoNodesIPv2"}
#: Variants per behaviour, so that every case runs (no skips).
CONVERTIBLE = [v for v in list_variants() if v.convertible]
FLOAT = [v for v in list_variants() if not v.convertible]
EDGE = [v for v in CONVERTIBLE if v.edge_learning]
#: The variant whose tiny model has Ghost modules (``s1_b0_ghost_cheap``).
GHOST = [v for v in CONVERTIBLE if v.name == "qana-akd1000"]


def tiny_model(info: VariantInfo) -> keras.Model:
    stages = TINY_STAGES.get(info.target, info.stages)
    return create_model(info.name, input_size=16, num_classes=CLASSES, width=0.25, stages=stages)


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


_CONVERSIONS: dict[str, tuple] = {}


def convert_tiny(info: VariantInfo) -> tuple:
    """(info, model, qmodel, akida model) of a convertible variant, built once per session."""
    if info.name not in _CONVERSIONS:
        keras.backend.clear_session()  # layer names (e.g. "dequantizer") start from scratch
        model = tiny_model(info)
        qmodel = quantize_model(model, info, images(16, seed=0), batch_size=8)
        _CONVERSIONS[info.name] = (info, model, qmodel, convert_exact(qmodel, info))
    return _CONVERSIONS[info.name]


def variants(infos: list[VariantInfo]):
    return pytest.mark.parametrize("converted", infos, ids=lambda v: v.name, indirect=True)


@pytest.fixture
def converted(request):
    """(info, model, qmodel, akida model) of the variant the test is parametrized with."""
    return convert_tiny(request.param)


@pytest.mark.parametrize("info", FLOAT, ids=lambda v: v.name)
def test_float_reference_is_refused(info):
    # Prepare
    model = tiny_model(info)
    # Execute / Assert: refused before quantizeml runs, naming the layer and the reason
    with pytest.raises(ModelError, match=r"layer '\w+' \(\w+\) .+"):
        quantize_model(model, info, images(4, seed=0))


@variants(CONVERTIBLE)
def test_converts(converted):
    info, model, qmodel, ak_model = converted
    # Assert
    assert tuple(ak_model.output_shape) == (1, 1, CLASSES)
    assert tuple(ak_model.input_shape) == (16, 16, 3)
    assert ak_model.layers[-1].name in (HEAD_DENSE, "dequantizer")


@variants(CONVERTIBLE)
def test_parity_with_quantized_keras(converted):
    info, _, qmodel, ak_model = converted
    # Execute
    report = check_parity(qmodel, ak_model, images(12, seed=1), strict=True)
    # Assert
    assert report.top1_agreement == 1.0
    assert report.max_abs_logit_diff < 1e-3
    compared = [layer for layer in report.layers if layer.compared]
    assert compared and compared[0].name == "stem_conv"
    assert all(layer.mismatch_fraction == 0.0 for layer in compared)


@variants(CONVERTIBLE)
def test_maps_on_a_virtual_device_then_back_to_software(converted):
    info, _, _, ak_model = converted
    x = images(2, seed=2)
    before = ak_model.predict(x)
    # Execute
    ak_model.map(getattr(akida, DEVICES[info.target])(), hw_only=True)
    mapped = ak_model.device is not None
    ak_model.map(None)
    # Assert
    assert mapped
    assert ak_model.device is None
    assert np.array_equal(ak_model.predict(x), before)


@variants(CONVERTIBLE)
def test_same_quantized_weights_give_identical_akida_bits(converted, tmp_path):
    info, _, qmodel, ak_model = converted
    # Execute
    again = convert_exact(qmodel, info)  # idempotent: the same bits a second time
    path = save_akida(ak_model, tmp_path / "sub" / "model.fbz")
    loaded = load_akida(path)
    # Assert
    assert model_hash(again) == model_hash(ak_model)
    assert model_hash(loaded) == model_hash(ak_model)
    assert len(model_hash(ak_model)) == 64
    assert not [p for p in path.parent.iterdir() if p.name != "model.fbz"]  # no temp left


@variants(EDGE)
def test_spike_generator_emits_one_bit_on_akida_1(converted):
    info, _, _, ak_model = converted
    # Execute
    before_head = ak_model.layers[-2].to_dict()["parameters"]
    # Assert
    assert before_head["act_bits"] == 1


@variants(GHOST)
def test_qat_step_keeps_ghost_form_and_spike_bits(converted):
    info, _, qmodel, _ = converted
    # Prepare
    x, y = images(8, seed=3).astype(np.float32), np.arange(8) % CLASSES
    qat_compile(qmodel, lr=1e-3)
    # Execute
    history = qmodel.fit(x, y, batch_size=8, epochs=1, verbose=0)
    # Assert
    assert np.isfinite(history.history["loss"][0])
    kernel = qmodel.get_layer("s1_b0_ghost_cheap").kernel.numpy()
    from common.models.blocks import ghost_mask

    assert np.all(kernel[ghost_mask(kernel.shape) == 0] == 0)
    assert tuple(convert_model(qmodel, info).output_shape) == (1, 1, CLASSES)


def test_full_width_spike_head_converts_bit_exactly():
    """At full width the spike layer's step exceeds Akida's 65535 and cnn2snn truncates the
    classifier's weights to compensate; convert_exact restores them (logits drifted by 1-3)."""
    from common.akida_exact import restore_weights_after_spikes

    # Prepare
    keras.backend.clear_session()
    model = create_model("qana-akd1000", input_size=64, num_classes=7, width=1.0)
    x = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    qmodel = quantize_model(model, "qana-akd1000", x[:24], batch_size=8)
    # Execute
    ak_model = convert_exact(qmodel, "qana-akd1000")
    report = check_parity(qmodel, ak_model, x[24:], min_agreement=0.5)
    # Assert
    assert restore_weights_after_spikes(qmodel, ak_model) == [HEAD_DENSE]
    assert report.top1_agreement == 1.0
    assert report.max_abs_logit_diff < 1e-3


def test_truncating_conversion_is_refused():
    # Prepare: sigmoid gating (a tensor×tensor multiply) stops quantization mid-model
    from quantizeml.models import quantize

    layers = keras.layers
    inp = layers.Input((16, 16, 3))
    x = layers.Rescaling(1 / 255.0)(inp)
    x = layers.Conv2D(8, 3, strides=2, padding="same")(x)
    x = layers.ReLU(6.0)(x)
    gate = layers.Conv2D(8, 1, activation="sigmoid")(x)
    x = layers.Multiply()([x, gate])
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(CLASSES)(x)
    qmodel = quantize(keras.Model(inp, out, name="gated"), samples=images(8, 0).astype("float32"),
                      num_samples=8, batch_size=8)
    # Execute / Assert
    with pytest.raises(ModelError, match="silently truncate"):
        convert_model(qmodel, "qana-akida2")


@variants(CONVERTIBLE)
def test_bad_inputs_are_refused_clearly(converted, tmp_path):
    info, model, qmodel, ak_model = converted
    bogus = tmp_path / "not_a_model.fbz"
    bogus.write_bytes(b"hello")
    # Execute / Assert
    with pytest.raises(ModelError, match="not a readable Akida model"):
        load_akida(bogus)
    with pytest.raises(DataError, match="uint8"):
        check_parity(qmodel, ak_model, images(2, 0).astype(np.float32) / 255)
    with pytest.raises(DataError, match="0–1"):
        quantize_model(model, info, images(4, 0).astype(np.float32) / 255)
