"""Akida mapping, CPU latency and on-chip incremental learning on tiny Akida models."""

from __future__ import annotations

import json
from pathlib import Path

import akida
import numpy as np
import pytest

import common  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from common.errors import ConfigError, DataError, ModelError

SIZE = 32
OLD = [0, 1, 2, 3]  # classes the backbone is trained on
NEW = 4  # a class neither the backbone nor the edge head has seen


def textures(n_per: int, classes: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Easy, well-separated classes: one fixed random 4×4 colour mosaic per class, plus noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in classes:
        proto = np.random.default_rng(1000 + c).integers(0, 256, (4, 4, 3))
        proto = np.kron(proto, np.ones((SIZE // 4, SIZE // 4, 1)))
        for _ in range(n_per):
            images.append(np.clip(proto + rng.normal(0, 20, proto.shape), 0, 255))
            labels.append(c)
    return np.asarray(images, np.uint8), np.asarray(labels)


def _tiny_keras(num_classes: int, spike: bool):
    import tf_keras as keras

    layers = keras.layers
    body = [
        keras.Input((SIZE, SIZE, 3)),
        layers.Rescaling(1 / 255.0, name="t_rescale"),
        layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="t_conv0"),
        layers.BatchNormalization(momentum=0.9, name="t_bn0"),
        layers.ReLU(6.0, name="t_relu0"),
    ]
    if spike:
        body += [
            layers.SeparableConv2D(16, 3, strides=2, padding="same", use_bias=False,
                                   name="t_sep1"),
            layers.BatchNormalization(momentum=0.9, name="t_bn1"),
            layers.ReLU(6.0, name="t_relu1"),
            layers.SeparableConv2D(64, 3, padding="same", use_bias=False, name="t_sep2"),
            layers.BatchNormalization(momentum=0.9, name="t_bn2"),
            layers.GlobalAveragePooling2D(name="t_gap"),
            layers.ReLU(1.0, name="t_spike"),
        ]
    else:  # Akida 2.0: no SeparableConv2D
        body += [
            layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="t_conv1"),
            layers.BatchNormalization(momentum=0.9, name="t_bn1"),
            layers.ReLU(6.0, name="t_relu1"),
            layers.Conv2D(16, 1, use_bias=False, name="t_pw2"),
            layers.BatchNormalization(momentum=0.9, name="t_bn2"),
            layers.ReLU(6.0, name="t_relu2"),
            layers.GlobalAveragePooling2D(name="t_gap"),
        ]
    body.append(layers.Dense(num_classes, name="t_head"))
    return keras.Sequential(body, name="tiny")


@pytest.fixture(scope="module")
def tiny_v1(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A trained tiny Akida 1.0 model with a 1-bit spike layer, and its 4-bit-spike twin."""
    import tf_keras as keras
    from cnn2snn import AkidaVersion, convert, set_akida_version
    from quantizeml.models import QuantizationParams, quantize

    keras.utils.set_random_seed(0)
    x, y = textures(30, OLD, seed=0)
    model = _tiny_keras(len(OLD), spike=True)
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x.astype("float32"), y, epochs=20, batch_size=16, verbose=0)
    qparams = QuantizationParams(
        weight_bits=4, activation_bits=4, input_weight_bits=8, per_tensor_activations=True
    )
    with set_akida_version(AkidaVersion.v1):
        qmodel = quantize(model, qparams=qparams, samples=x.astype("float32"),
                          num_samples=len(x), batch_size=len(x))
        four_bit = convert(qmodel)
        spike_q = qmodel.get_layer("t_spike").out_quantizer
        spike_q.bitwidth, spike_q.value_bits = 1, 1
        ak = convert(qmodel)
    path = tmp_path_factory.mktemp("tiny") / "model.fbz"
    ak.save(str(path))
    return {"path": path, "four_bit": four_bit, "keras": model}


@pytest.fixture()
def ak_v1(tiny_v1: dict):
    """A fresh copy of the tiny Akida 1.0 model for each test."""
    return akida.Model(str(tiny_v1["path"]))


def test_map_on_virtual_akd1000_reports_passes_nps_and_program(ak_v1) -> None:
    # Prepare
    from common.edge import ENERGY_NOTE, map_model

    images, _ = textures(2, OLD, seed=5)
    expected = ak_v1.predict(images)

    # Execute
    report = map_model(ak_v1, "akd1000")

    # Assert
    assert report.passes >= 1
    assert 0 < report.nps_used <= report.nps_available == 78
    assert report.program_bytes > 0 and report.hrc_used
    data = json.loads(report.to_json())
    assert data["energy"] is None and data["note"] == ENERGY_NOTE
    assert np.array_equal(ak_v1.predict(images), expected)  # back in software


def test_map_refuses_wrong_akida_version(ak_v1, tmp_path: Path) -> None:
    # Prepare
    import tf_keras as keras
    from cnn2snn import AkidaVersion, convert, set_akida_version
    from quantizeml.models import QuantizationParams, quantize

    from common.edge import map_model

    keras.utils.set_random_seed(0)
    x, _ = textures(4, OLD, seed=1)
    with set_akida_version(AkidaVersion.v2):
        qmodel = quantize(
            _tiny_keras(3, spike=False),
            qparams=QuantizationParams(per_tensor_activations=True),
            samples=x.astype("float32"),
            num_samples=len(x),
        )
        ak_v2 = convert(qmodel)

    # Execute / Assert
    with pytest.raises(ModelError, match="Akida 2.0 model but device 'akd1000' is Akida 1.0"):
        map_model(ak_v2, "akd1000")
    with pytest.raises(ModelError, match="Akida 1.0 model but device 'akida2-6n'"):
        map_model(ak_v1, "akida2-6n")
    assert map_model(ak_v2, "akida2-6n").nps_used > 0
    with pytest.raises(ConfigError, match="unknown Akida device 'akd9000'"):
        map_model(ak_v1, "akd9000")


def test_edge_learning_learns_a_new_class_from_few_shots(ak_v1) -> None:
    # Prepare
    from common.edge import (
        add_classes,
        edge_learning_eval,
        learn,
        predict_classes,
        prepare_edge_learning,
    )

    x_old, y_old = textures(5, OLD, seed=2)
    x_new, _ = textures(5, [NEW], seed=3)
    x_test, y_test = textures(20, [*OLD, NEW], seed=4)
    edge = prepare_edge_learning(ak_v1, len(OLD), x_old)
    learn(edge, x_old, y_old)
    before = predict_classes(edge, x_test)

    # Execute
    assert add_classes(edge, 1) == len(OLD) + 1
    learn(edge, x_new, np.full(len(x_new), NEW))
    after = predict_classes(edge, x_test)
    scores = edge_learning_eval(y_test, after, list("abcdN"), [NEW], before)

    # Assert
    chance = scores["chance"]
    assert chance == pytest.approx(0.2)
    assert scores["before"]["new"]["accuracy"] == 0.0  # the class did not exist yet
    assert scores["after"]["new"]["accuracy"] >= 3 * chance
    assert scores["after"]["old"]["accuracy"] > 2 * chance
    assert len(ak_v1.layers[-1].get_variable("weights").shape) == 4  # source model untouched
    assert ak_v1.learning is None


def test_saved_edge_model_keeps_what_it_learned(ak_v1, tmp_path: Path) -> None:
    # Prepare
    from common.edge import learn, predict_classes, prepare_edge_learning, save_model_atomic

    x, y = textures(5, OLD, seed=2)
    x_test, _ = textures(10, OLD, seed=4)
    edge = prepare_edge_learning(ak_v1, len(OLD), x)
    untrained = edge.layers[-1].get_variable("weights").copy()
    learn(edge, x, y)
    expected = predict_classes(edge, x_test)

    # Execute
    path = save_model_atomic(edge, tmp_path / "edge" / "model.fbz")
    reloaded = akida.Model(str(path))

    # Assert
    learned = reloaded.layers[-1].get_variable("weights")
    assert not np.array_equal(learned, untrained)
    assert np.array_equal(learned, edge.layers[-1].get_variable("weights"))
    assert np.array_equal(predict_classes(reloaded, x_test), expected)
    assert reloaded.learning is not None and int(reloaded.learning.num_classes) == len(OLD)
    assert [p.name for p in path.parent.iterdir()] == ["model.fbz"]  # no temp file left


def test_float_01_images_are_refused(ak_v1) -> None:
    # Prepare
    from common.edge import learn, predict_classes, prepare_edge_learning

    x, y = textures(3, OLD, seed=2)
    edge = prepare_edge_learning(ak_v1, len(OLD), x)

    # Execute / Assert
    with pytest.raises(DataError, match="0-1 floats"):
        learn(edge, x / 255.0, y)
    with pytest.raises(DataError, match="0-1 floats"):
        predict_classes(edge, x.astype(np.float32) / 255.0)
    with pytest.raises(DataError, match="labels span 0..4 but the edge head has 4 classes"):
        learn(edge, x[:2], [0, 4])


def test_prepare_refuses_a_head_without_1bit_spikes(tiny_v1: dict) -> None:
    # Prepare
    from common.edge import prepare_edge_learning

    x, _ = textures(2, OLD, seed=2)

    # Execute / Assert
    with pytest.raises(ModelError, match="emits 4-bit activations.*1-bit spikes"):
        prepare_edge_learning(tiny_v1["four_bit"], 3, x)


def test_cpu_latency_for_akida_software_and_keras(ak_v1, tiny_v1: dict) -> None:
    # Prepare
    from common.edge import measure_latency

    x, _ = textures(2, OLD, seed=2)

    # Execute
    ak = measure_latency(ak_v1, x, batch_sizes=(1, 4), repeats=2)
    kr = measure_latency(tiny_v1["keras"], x, batch_sizes=(1, 4), repeats=2)

    # Assert
    assert ak["backend"] == "akida-software" and kr["backend"] == "keras"
    for result in (ak, kr):
        assert set(result["batches"]) == {"1", "4"}
        assert all(b["ms_per_image"] > 0 for b in result["batches"].values())
    with pytest.raises(DataError, match="0-1 floats"):
        measure_latency(ak_v1, x / 255.0)


def test_cli_model_map_json_and_learn(tiny_v1: dict, tmp_path: Path) -> None:
    # Prepare
    from typer.testing import CliRunner

    from qanafed.cli import app

    runner = CliRunner()
    out = tmp_path / "learned"

    # Execute
    mapped = runner.invoke(app, ["model", "map", "--model", str(tiny_v1["path"]), "--json"])
    learned = runner.invoke(app, [
        "model", "learn", "--model", str(tiny_v1["path"].parent), "--data",
        "synthetic:n=120,size=32,seed=3", "--shots", "3", "--new-class", "df",
        "--out", str(out), "--json",
    ])

    # Assert
    assert mapped.exit_code == 0, mapped.output
    report = json.loads(mapped.stdout)
    assert report["device"] == "akd1000" and 0 < report["nps_used"] <= report["nps_available"]
    assert report["energy"] is None and "hardware device" in report["note"]
    assert learned.exit_code == 0, learned.output
    record = json.loads((out / "learn.json").read_text())
    assert record == json.loads(learned.stdout) and record["new_classes"] == ["df"]
    assert record["edge_classes"][-1] == "df" and record["learning"]["num_classes"] == 7
    assert record["metrics"]["after"]["new"]["num_examples"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["learn.json", "model.fbz"]
    assert akida.Model(str(out / "model.fbz")).learning is not None


def test_cli_refuses_a_file_that_is_not_akida(tmp_path: Path) -> None:
    # Prepare
    from typer.testing import CliRunner

    from qanafed.cli import app

    bogus = tmp_path / "model.fbz"
    bogus.write_bytes(b"not a model")

    # Execute
    result = CliRunner().invoke(app, ["model", "map", "--model", str(bogus)])

    # Assert
    assert isinstance(result.exception, ModelError)
    assert "is not an Akida model file" in str(result.exception)
