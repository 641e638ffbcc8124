"""Reloading a training run: models, summary, and clear errors for incomplete folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

import common  # noqa: F401  (legacy Keras env)
from common.errors import ModelError
from common.runio import load_keras_models, load_run, load_summary

SIZE = 16
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A complete tiny run folder written the way ``write_run`` writes one (no training)."""
    from quantizeml import save_model

    from common.models import StageSpec, create_model
    from common.quantize import quantize_model

    out = tmp_path_factory.mktemp("run")
    model = create_model("qana-akd1000", input_size=SIZE, num_classes=len(CLASSES), width=0.25,
                         stages=(StageSpec(32, stride=1), StageSpec(64)))
    images = np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
    qmodel = quantize_model(model, "qana-akd1000", images, batch_size=8)
    model.save(out / "float.h5")
    save_model(qmodel, str(out / "quantized.h5"))
    (out / "metrics.json").write_text(json.dumps(
        {"variant": "qana-akd1000", "size": SIZE, "class_names": CLASSES, "akida": {"f1": 0.5}}
    ))
    return out


def copy_run(run_dir, dest, names):
    dest.mkdir()
    for name in names:
        (dest / name).write_bytes((run_dir / name).read_bytes())
    return dest


def test_load_run_gives_both_models_and_the_summary(run_dir):
    # Execute
    run = load_run(run_dir)
    float_model, qmodel, metrics = run
    # Assert
    x = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.float32)
    assert float_model.predict(x, verbose=0).shape == (2, len(CLASSES))
    assert qmodel.predict(x, verbose=0).shape == (2, len(CLASSES))
    assert float_model.get_layer("head_spike").__class__.__name__ == "SpikeReLU"
    assert run.class_names == CLASSES and run.size == SIZE
    assert metrics["akida"] == {"f1": 0.5}  # other fields are kept


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"run folder .*nowhere does not exist"):
        load_run(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="does not exist"):
        load_keras_models(tmp_path / "nowhere")


def test_missing_keras_models_say_to_retrain(run_dir, tmp_path):
    # Prepare: an Akida-only folder with its summary
    only_summary = copy_run(run_dir, tmp_path / "partial", ["metrics.json"])
    (only_summary / "model.fbz").write_bytes(b"akida")
    # Execute
    with pytest.raises(ModelError) as err:
        load_run(only_summary)
    # Assert
    msg = str(err.value)
    assert "float.h5 and no quantized.h5" in msg and "model.fbz alone" in msg
    assert "re-run `qanafed model train" in msg and "which writes them" in msg


def test_one_missing_model_file_is_named(run_dir, tmp_path):
    partial = copy_run(run_dir, tmp_path / "partial", ["metrics.json", "float.h5"])
    with pytest.raises(ModelError, match=r"has no quantized\.h5:"):
        load_keras_models(partial)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    # Prepare: e.g. the dataset folder passed by mistake
    data = tmp_path / "images"
    data.mkdir()
    (data / "ISIC_0001.jpg").write_bytes(b"")
    # Execute
    with pytest.raises(ModelError) as err:
        load_run(data)
    # Assert
    assert "is not a QANA training run" in str(err.value) and "ISIC_0001.jpg" in str(err.value)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "metrics.json is not a QANA training summary"),
        (json.dumps({"size": 48}), "class_names"),
        (json.dumps({"size": -1, "class_names": CLASSES}), "size"),
        (json.dumps([1, 2]), "not a QANA training summary"),
    ],
)
def test_bad_summary_is_refused(tmp_path, content, needle):
    (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(ModelError, match=needle):
        load_summary(tmp_path)


def test_unreadable_model_file_says_to_retrain(run_dir, tmp_path):
    broken = copy_run(run_dir, tmp_path / "broken", ["metrics.json", "quantized.h5"])
    (broken / "float.h5").write_bytes(b"not hdf5")
    with pytest.raises(ModelError, match=r"cannot load the Keras models[\s\S]*re-run"):
        load_run(broken)
