"""Site-side phases on a tiny real QANA: FedProx pulls towards the global model; a round gives the
same arrays in a fresh process as in one that ran other rounds (what resume relies on); the
held-out new class never reaches federated training."""

from __future__ import annotations

import numpy as np
import pytest

from common import site
from common.errors import ConfigError
from common.fedconfig import parse_config
from common.local_training import CACHE

pytestmark = pytest.mark.slow

SCENARIO = {
    "name": "site", "data": "synthetic:n=150,size=48,sites=2,seed=2",
    "partition": {"scheme": "natural", "sites": 2},
    "model": {"variant": "qana-akd1000", "size": 48, "width": 0.25, "depth": 1},
    "batch-size": 16, "lr": 0.01, "qat-lr": 0.001, "calibration-samples": 16,
    "balance": "oversample", "edge": {"new-class": "mel"}, "seed": 5,
}


@pytest.fixture(scope="module")
def cfg():
    return parse_config(SCENARIO)


@pytest.fixture(scope="module")
def data(cfg):
    return site.data_of(cfg, 0, None)


@pytest.fixture(scope="module")
def initial(cfg, data):
    from server.global_model import QanaGlobalModel

    return QanaGlobalModel(cfg, len(data.class_names)).initial_arrays()


def _distance(a: dict, b: dict) -> float:
    return float(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a if "kernel" in k))


def test_fedprox_term_keeps_local_weights_closer_to_the_global_model(cfg, data, initial):
    # Execute: the same round (same seed, data, lr) without and with a strong proximal term
    plain, _, _ = site.warmup(cfg, data, initial, step=1, lr=0.01, epochs=2, proximal_mu=0.0)
    prox, _, _ = site.warmup(cfg, data, initial, step=1, lr=0.01, epochs=2, proximal_mu=50.0)

    # Assert
    d_plain, d_prox = _distance(plain, initial), _distance(prox, initial)
    assert d_plain > 0
    assert d_prox < 0.5 * d_plain, (d_prox, d_plain)


def test_a_round_gives_the_same_arrays_in_a_fresh_process_as_after_other_rounds(
    cfg, data, initial
):
    from common.weights import BN_STATS, QUANTIZER, TRAINABLE, get_arrays

    # Prepare: the quantized global model after federated calibration at this one site (what
    # the server builds from one site's ranges, see test_fed_aggregate; here read from the
    # model the site keeps for its QAT rounds)
    site.calibrate(cfg, data, initial, step=2)
    quantized = get_arrays(CACHE.models["quantized"].model, (TRAINABLE, BN_STATS, QUANTIZER))

    # Execute: warm-up and QAT rounds in a fresh process (empty model cache) ...
    CACHE.clear()
    fresh_w, _, fresh_metrics = site.warmup(cfg, data, initial, step=1, lr=0.01, epochs=1)
    fresh_q, _, _ = site.qat(cfg, data, quantized, step=3, lr=0.001, epochs=1)
    # ... and the same rounds again after other rounds moved the cached models and optimizers
    site.warmup(cfg, data, initial, step=7, lr=0.03, epochs=1, proximal_mu=1.0)
    again_w, _, again_metrics = site.warmup(cfg, data, initial, step=1, lr=0.01, epochs=1)
    site.qat(cfg, data, quantized, step=8, lr=0.01, epochs=1, proximal_mu=1.0)
    again_q, _, _ = site.qat(cfg, data, quantized, step=3, lr=0.001, epochs=1)

    # Assert
    for fresh, again in ((fresh_w, again_w), (fresh_q, again_q)):
        assert fresh.keys() == again.keys()
        for key in fresh:
            np.testing.assert_array_equal(fresh[key], again[key], err_msg=key)
    assert fresh_metrics["train_loss"] == again_metrics["train_loss"]
    assert not any(np.array_equal(fresh_q[k], quantized[k]) for k in fresh_q if "kernel" in k)
    assert not any(k.endswith(("range_max", "rescaling_rate")) for k in fresh_q)


def test_the_new_class_is_left_out_of_federated_training_and_evaluation(cfg, data):
    # Prepare
    held_out = data.class_names.index("mel")
    assert (data.y_train == held_out).any()

    # Execute
    _, y_train = site.federated_part(cfg, data, "train")
    _, y_test = site.federated_part(cfg, data, "test")
    n, hello = site.hello(data, cfg)

    # Assert
    assert held_out not in y_train and held_out not in y_test
    assert len(y_train) == int((data.y_train != held_out).sum())
    assert hello["train_class_counts"][held_out] > 0  # the site still has (and says) it


def test_an_unknown_new_class_is_refused_with_the_classes(data):
    cfg = parse_config({**SCENARIO, "edge": {"new-class": "melanoma"}})
    with pytest.raises(ConfigError, match=r"edge\.new-class 'melanoma'.*akiec, bcc"):
        site.hello(data, cfg)


def test_a_round_scores_the_global_model_received_before_training_on_it(cfg, data, initial):
    # Prepare: the global float model as the server sends it, scored directly
    x_test, y_test = site.federated_part(cfg, data, "test")
    model = site.float_model_from(cfg, len(data.class_names), initial)
    received = site.evaluate(model, x_test, y_test, data.class_names)

    # Execute: a warm-up round that trains hard enough to change the predictions
    trained, _, metrics = site.warmup(cfg, data, initial, step=1, lr=0.03, epochs=2)

    # Assert: "test" is the received global model's score; the locally tuned one is labelled
    assert metrics["test"]["confusion_matrix"] == received["confusion_matrix"]
    assert metrics["test"]["loss"] == pytest.approx(received["loss"], rel=1e-5)
    local = site.evaluate(site.float_model_from(cfg, len(data.class_names), trained), x_test,
                          y_test, data.class_names)
    assert metrics[site.LOCAL_AFTER_TRAINING]["loss"] == pytest.approx(local["loss"], rel=1e-5)
    assert metrics[site.LOCAL_AFTER_TRAINING]["loss"] != pytest.approx(received["loss"], rel=1e-3)


def test_two_qana_sites_warm_up_with_the_recipe_on_one_compiled_step(initial):
    # Prepare: the recipe, two sites of the same scenario in one process (as simulated sites)
    recipe = parse_config({**SCENARIO, "balance": "sampler", "loss": "logit-adjusted",
                           "tta": 2})
    sites = [site.data_of(recipe, i, None) for i in (0, 1)]
    held_out = sites[0].class_names.index("mel")

    # Execute
    offsets, metrics = [], []
    for data in sites:
        _, n, m = site.warmup(recipe, data, initial, step=1, lr=0.01, epochs=1)
        offsets.append(CACHE.models["float"].label_loss.offset.copy())
        metrics.append((n, m))

    # Assert: each site trained on its own prior (new class out), through the one trace
    for data, offset, (n, m) in zip(sites, offsets, metrics, strict=True):
        _, y = site.federated_part(recipe, data, "train")
        prior = site.site_prior(recipe, y, len(data.class_names))
        np.testing.assert_allclose(offset, np.log(prior), rtol=1e-5)
        assert offset[held_out] == offset.min()  # the held-out class counts as one image
        assert n == len(y)  # the sampler adds no image
        assert np.isfinite(m["train_loss"]) and 0.0 <= m["test"]["balanced_accuracy"] <= 1.0
    assert not np.allclose(offsets[0], offsets[1])
    assert CACHE.models["float"].step.experimental_get_tracing_count() == 1
