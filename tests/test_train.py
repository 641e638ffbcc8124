"""Centralized training pipeline and `qanafed model train/evaluate` on tiny synthetic data."""

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from common.errors import ConfigError, DataError, ModelError
from common.loaders import load_dataset
from common.splits import Split
from common.train import TrainConfig, prepare_arrays, run_training
from qanafed.cli import app

DATA = "synthetic:n=240,size=48,sites=3,seed=3"  # = conftest.TINY_RUN_DATA
METRIC_KEYS = {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix"}


def tiny_config(**kw) -> TrainConfig:
    base = dict(variant="qana-akd1000", size=48, width=0.25, epochs=2, qat_epochs=1,
                batch_size=32, balance="oversample", calibration_samples=64,
                min_agreement=0.05, augment=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tiny_run):
    return tiny_run.out, tiny_run.payload


def test_train_writes_akida_model_and_metrics_for_float_quantized_akida(trained):
    out, payload = trained
    assert sorted(p.name for p in out.iterdir()) == [
        "float.h5", "metrics.json", "model.fbz", "model.fbz.meta.json", "model_card.md",
        "quantized.h5", "split.json"
    ]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["akida_hash"] == payload["akida_hash"]
    for kind in ("float", "quantized", "akida"):
        assert METRIC_KEYS <= set(on_disk[kind])
        assert on_disk[kind]["num_examples"] == payload["split"]["test"]
        assert set(on_disk[kind]["per_class"]) == set(on_disk["class_names"])
    assert 0.0 <= on_disk["parity"]["top1_agreement"] <= 1.0
    assert on_disk["config"]["variant"] == "qana-akd1000"
    # not a single hidden leftover of the atomic write
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_saved_split_is_lesion_grouped_and_reloads(trained):
    out, payload = trained
    ds = load_dataset(DATA)
    split = Split.load(out / "split.json", ds)
    groups = [set(ds.lesion_ids[getattr(split, part)]) for part in ("train", "val", "test")]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert len(split.test) == payload["split"]["test"]


def test_evaluate_cli_gives_metrics_json_keys_on_the_test_split(trained):
    out, payload = trained
    result = CliRunner().invoke(app, [
        "model", "evaluate", "--model", str(out / "model.fbz"), "--data", DATA,
        "--split", str(out / "split.json"), "--part", "test", "--json",
    ])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert METRIC_KEYS <= set(scored)
    # same model, same images, same preprocessing: the exact figures of training's test report
    assert scored["confusion_matrix"] == payload["akida"]["confusion_matrix"]
    assert scored["balanced_accuracy"] == pytest.approx(payload["akida"]["balanced_accuracy"])


def test_evaluate_refuses_data_with_classes_the_model_does_not_know(trained, tmp_path):
    out, _ = trained
    from common.evaluate import evaluate_akida
    from common.synthetic import make_synthetic

    gi = make_synthetic(n=40, size=48, seed=0, mode="endoscopy")
    with pytest.raises(DataError, match="does not know"):
        evaluate_akida(out / "model.fbz", gi)


def test_evaluate_refuses_a_file_that_is_not_an_akida_model(tmp_path):
    bogus = tmp_path / "model.fbz"
    bogus.write_bytes(b"not a model")
    result = CliRunner().invoke(app, ["model", "evaluate", "--model", str(bogus), "--data", DATA])
    assert result.exit_code != 0
    assert "not a readable Akida model" in str(result.exception) + result.output


def test_balancing_touches_the_training_split_only():
    ds = load_dataset(DATA)
    arrays, split = prepare_arrays(ds, tiny_config(balance="smote"))
    assert len(arrays.y_val) == len(split.val) and len(arrays.y_test) == len(split.test)
    np.testing.assert_array_equal(arrays.y_test, ds.labels[split.test])
    counts = np.bincount(arrays.y_train, minlength=ds.num_classes)
    present = counts[np.bincount(ds.labels[split.train], minlength=ds.num_classes) > 0]
    assert len(set(present.tolist())) == 1  # every class present in train is equalised
    assert arrays.info["train_after_balance"] > arrays.info["train_before_balance"]


def test_parity_guard_refuses_to_write_and_leaves_existing_output(tmp_path, monkeypatch):
    # Prepare: a conversion whose Akida head always answers the class the quantized model
    # predicts least often (zero weights, that unit's threshold lowered): the test split cannot
    # be all that class, so agreement < 1. The real conversion is bit-exact and never trips it.
    from common import akida_exact

    real_convert = akida_exact.convert_exact
    ds = load_dataset("synthetic:n=160,size=48,sites=2,seed=4")

    def constant_head(qmodel, variant):
        ak_model = real_convert(qmodel, variant)
        logits = qmodel.predict(ds.images, verbose=0).reshape(len(ds.images), -1)
        rare = int(np.argmin(np.bincount(logits.argmax(1), minlength=logits.shape[1])))
        head = ak_model.layers[-1]
        weights, threshold = (np.asarray(head.variables[k]) for k in ("weights", "threshold"))
        head.variables["weights"] = np.zeros_like(weights)
        head.variables["threshold"] = np.where(np.arange(threshold.size) == rare, -1, 0).astype(
            threshold.dtype)  # output = (weights · spikes - threshold) / act_step
        return ak_model

    monkeypatch.setattr(akida_exact, "convert_exact", constant_head)
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run")
    cfg = tiny_config(epochs=1, qat_epochs=0, min_agreement=1.0)
    # Execute
    with pytest.raises(ModelError, match="nothing was written"):
        run_training(ds, cfg, out)
    # Assert
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_config_errors_echo_the_value():
    with pytest.raises(ConfigError, match="balance='mixup'"):
        TrainConfig(balance="mixup")
    with pytest.raises(ConfigError, match="min_agreement=1.5"):
        TrainConfig(min_agreement=1.5)
    with pytest.raises(ConfigError, match="lr_schedule='step'"):
        TrainConfig(lr_schedule="step")


def test_cosine_schedule_decays_from_base_to_near_zero():
    from common.train import cosine_lr

    lrs = [cosine_lr(1e-3, e, 10) for e in range(10)]
    assert lrs[0] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert 0 < lrs[-1] < 0.05e-3


def test_everything_dropped_by_quality_filter_is_a_clear_error(tmp_path):
    from common.dataset import LesionDataset

    n = 12
    dark = LesionDataset(
        images=np.zeros((n, 48, 48, 3), np.uint8), labels=np.arange(n) % 2,
        class_names=("a", "b"), lesion_ids=np.array([f"L{i}" for i in range(n)]),
        sites=np.array(["s"] * n), image_ids=np.array([f"I{i}" for i in range(n)]),
    )
    with pytest.raises(DataError, match="dropped all 12 images"):
        prepare_arrays(dark, tiny_config())


# --- PACT and SGT in the training pipeline (issue 6) -------------------------------------

PIPE_DATA = "synthetic:n=160,size=48,sites=2,seed=5"


@pytest.fixture(scope="module")
def pipe_arrays():
    return prepare_arrays(load_dataset(PIPE_DATA), tiny_config(balance="none"))[0]


@pytest.mark.parametrize(
    ("options", "match"),
    [({"sgt_mask_fraction": 0.0}, "sgt_mask_fraction=0.0"),
     ({"sgt_mask_fraction": 1.2}, "sgt_mask_fraction=1.2"),
     ({"pact_alpha_init": 0.0}, "pact_alpha_init=0.0"),
     ({"pact_alpha_init": -2.0}, "pact_alpha_init=-2.0"),
     ({"pact_l2": -1e-4}, "pact_l2=-0.0001"),
     ({"sgt_kl_weight": -1.0}, "sgt_kl_weight=-1.0")],
)
def test_pact_and_sgt_options_are_validated_with_the_value_echoed(options, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**options)


def test_train_cli_refuses_a_bad_mask_fraction_before_loading_data(tmp_path):
    result = CliRunner().invoke(app, [
        "model", "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
        "--sgt", "--sgt-mask-fraction", "1.2",
    ])
    assert isinstance(result.exception, ConfigError)
    assert "sgt_mask_fraction=1.2" in str(result.exception)


def test_pact_alpha_is_learned_baked_and_is_the_quantized_relu_bound(pipe_arrays):
    # Prepare
    from common.pact import PACTReLU, effective_ranges
    from common.train import quantize_and_qat, train_float

    cfg = tiny_config(epochs=1, qat_epochs=0, lr=1e-2, pact=True, pact_alpha_init=1.0,
                      pact_l2=1e-3, calibration_samples=64)
    # Execute
    model, record = train_float(pipe_arrays, cfg)
    qmodel, _ = quantize_and_qat(model, pipe_arrays, cfg)
    # Assert: α moved; the float model handed on is plain ReLU(max_value=α); the quantized
    # ReLU clips at α and its 4-bit range is the calibrated maximum, at most α (= α once it
    # saturates on the calibration images)
    alphas = record["pact_alphas"]
    assert len(alphas) >= 10
    assert all(abs(a - 1.0) > 1e-4 for a in alphas.values()), alphas
    assert not any(isinstance(layer, PACTReLU) for layer in model.layers)
    ranges = effective_ranges(qmodel)
    saturated = 0
    for name, alpha in alphas.items():
        assert model.get_layer(name).max_value == pytest.approx(alpha)
        assert qmodel.get_layer(name).max_value == pytest.approx(alpha)
        assert ranges[name] <= alpha * 1.02, name
        saturated += ranges[name] == pytest.approx(alpha, rel=0.02)
    assert saturated >= 1, (alphas, ranges)


def test_sgt_in_float_training_adds_exactly_the_kl_term(pipe_arrays):
    # Prepare: with kl_weight 0 the SGT loss is the plain cross-entropy, so the trainable
    # weights must follow plain training step for step; with kl_weight 1 they must not.
    from common.train import train_float

    base = tiny_config(epochs=1, qat_epochs=0, lr=1e-2)

    def trained(**kw):
        model, record = train_float(pipe_arrays, dataclasses.replace(base, **kw))
        return [w.numpy() for w in model.trainable_weights], record

    # Execute
    plain, _ = trained()
    kl_off, _ = trained(sgt=True, sgt_kl_weight=0.0, sgt_mask_fraction=0.2)
    kl_on, record = trained(sgt=True, sgt_kl_weight=1.0, sgt_mask_fraction=0.2)
    # Assert
    for a, b in zip(plain, kl_off, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert any(not np.allclose(a, b, rtol=1e-4, atol=1e-5)
               for a, b in zip(plain, kl_on, strict=True))
    assert np.isfinite(record["history"][0]["loss"])
