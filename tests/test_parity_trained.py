"""A briefly trained qana-akd1000: bit-exact Akida conversion, class-dependent 1-bit spikes."""

from __future__ import annotations

import contextlib

import akida
import numpy as np
import pytest

import common  # noqa: F401  (legacy Keras env)
from common.metrics import classification_metrics
from common.parity import check_parity
from common.train import SplitArrays, TrainConfig, train_and_convert

SIZE = 48
CLASSES = 4


def textures(n_per: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable classes: one fixed random 4×4 colour mosaic per class under heavy noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(CLASSES):
        proto = np.random.default_rng(1000 + c).integers(0, 256, (4, 4, 3))
        proto = np.kron(proto, np.ones((SIZE // 4, SIZE // 4, 1)))
        for _ in range(n_per):
            images.append(np.clip(proto + rng.normal(0, 40, proto.shape), 0, 255))
            labels.append(c)
    return np.asarray(images, np.uint8), np.asarray(labels)


@pytest.fixture(scope="module")
def trained():
    """The real pipeline (float training, PTQ, one QAT epoch, conversion) on a tiny model."""
    import tensorflow as tf

    # one thread, unless an earlier test already started TensorFlow's runtime
    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_intra_op_parallelism_threads(1)
    arrays = SplitArrays(*textures(30, seed=0), *textures(5, seed=1), *textures(12, seed=2),
                         class_names=tuple(f"class{c}" for c in range(CLASSES)))
    cfg = TrainConfig(variant="qana-akd1000", size=SIZE, width=0.25, epochs=5, qat_epochs=1,
                      batch_size=8, lr=3e-3, balance="none", augment=False,
                      calibration_samples=64, min_agreement=0.99, seed=0)
    return arrays, train_and_convert(arrays, cfg)


def held_out(arrays: SplitArrays) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([arrays.x_val, arrays.x_test]),
            np.concatenate([arrays.y_val, arrays.y_test]))


def test_akida_reproduces_the_trained_quantized_model_bit_for_bit(trained):
    arrays, result = trained
    x = np.concatenate([held_out(arrays)[0], arrays.x_train])
    # Execute
    report = check_parity(result["quantized_model"], result["akida_model"], x, per_layer=True)
    # Assert: every layer's integer outputs are identical, so predictions agree everywhere
    compared = [layer for layer in report.layers if layer.compared]
    assert len(compared) == len(result["akida_model"].layers) - 2  # all but input and head
    assert {layer.name: layer.mismatch_fraction for layer in compared} == {
        layer.name: 0.0 for layer in compared}
    assert report.top1_agreement == 1.0
    assert report.n_images == len(x)
    assert report.n_layer_images == min(64, len(x))  # layers on a prefix, logits on all
    assert report.max_abs_logit_diff < 1e-4
    assert result["parity"].top1_agreement == 1.0
    m = result["metrics"]
    assert m["quantized"]["balanced_accuracy"] == m["akida"]["balanced_accuracy"]


def test_4bit_output_scales_are_powers_of_two_and_every_threshold_is_exact(trained):
    from quantizeml.models import record_quantization_variables

    from common.akida_exact import exact_thresholds, pow2_output_scales

    _, result = trained
    qmodel, ak_model = result["quantized_model"], result["akida_model"]
    record_quantization_variables(qmodel)
    # Execute
    rescaled = pow2_output_scales(qmodel)  # already applied by the pipeline: a no-op now
    reports = exact_thresholds(qmodel, ak_model)
    # Assert
    assert rescaled == 0
    four_bit = [layer for layer in qmodel.layers
                if getattr(layer, "out_quantizer", None) is not None
                and layer.out_quantizer.bitwidth == 4]
    assert four_bit
    for layer in four_bit:
        assert set(np.asarray(layer.out_quantizer.qscales.value.values).ravel()) == {128.0}
    assert [r.name for r in reports][-1] == "head_conv" and reports[-1].act_bits == 1
    assert all(r.inexact == 0 and r.changed == 0 for r in reports)  # idempotent


def test_spike_patterns_carry_class_information(trained):
    arrays, result = trained
    backbone = akida.Model(layers=result["akida_model"].layers[:-1])
    x, y = held_out(arrays)
    # Execute
    spikes = np.asarray(backbone.forward(x)).reshape(len(x), -1).astype(float)
    classes = np.unique(y)
    means = np.stack([spikes[y == c].mean(axis=0) for c in classes])
    # Assert: 1-bit, neither silent nor saturated, and class means differ by far more than
    # the same statistic on shuffled labels (the PTQ failure gave identical means per class)
    assert set(np.unique(spikes)) <= {0.0, 1.0}
    assert 0.05 < spikes.mean() < 0.95
    spread = np.abs(means[:, None] - means[None]).mean()
    rng = np.random.default_rng(0)
    shuffled = []
    for _ in range(20):
        ys = rng.permutation(y)
        ms = np.stack([spikes[ys == c].mean(axis=0) for c in classes])
        shuffled.append(np.abs(ms[:, None] - ms[None]).mean())
    assert spread > 2 * np.mean(shuffled)


def test_on_chip_learning_on_trained_spikes_beats_chance(trained):
    from common.edge.learning import learn, predict_classes, prepare_edge_learning

    arrays, result = trained
    x, y = held_out(arrays)
    # Execute: a fresh learnable head, trained on the chip from the training images only
    edge = prepare_edge_learning(result["akida_model"], CLASSES, arrays.x_train[:32],
                                 neurons_per_class=2)
    learn(edge, arrays.x_train, arrays.y_train)
    pred = predict_classes(edge, x, CLASSES)
    # Assert: chance is 0.25
    score = classification_metrics(y, pred, arrays.class_names)["balanced_accuracy"]
    assert score >= 0.6, f"on-chip learning balanced accuracy {score:.3f}"
