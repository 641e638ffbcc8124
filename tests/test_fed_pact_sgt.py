"""PACT and saliency-guided training inside the federation, on a tiny real QANA: warm-up trains α
and FedAvg averages it like any weight; calibration bakes the global α into the ReLU bounds; a
fresh process rebuilds the same quantized model from the global arrays; SGT runs in warm-up and
QAT; the final round writes saliency overlays to the site's own folder and reports only the
stability and the file names."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Message

from common import site
from common.fedconfig import parse_config
from common.local_training import CACHE
from server import protocol as P

pytestmark = pytest.mark.slow

SCENARIO = {
    "name": "pact-sgt", "data": "synthetic:n=150,size=48,sites=2,seed=2",
    "partition": {"scheme": "natural", "sites": 2},
    "model": {"variant": "qana-akd1000", "size": 48, "width": 0.25, "depth": 1},
    "batch-size": 16, "lr": 0.01, "qat-lr": 0.001, "calibration-samples": 16,
    "edge": {"shots": 2, "neurons-per-class": 1}, "seed": 5, "explain-images": 2,
    # α starts low so that activations saturate and α gets a gradient from the first step.
    "pact": {"enabled": True, "alpha-init": 0.5, "l2": 1e-4},
    "sgt": {"enabled": True, "mask-fraction": 0.2, "kl-weight": 1.0},
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


def _alphas(arrays: dict) -> dict[str, float]:
    return site.split_pact(arrays)[0]


def _relu_bounds(qmodel) -> dict[str, float]:
    return {layer.name: float(layer.max_value) for layer in qmodel.layers
            if type(layer).__name__ == "QuantizedReLU" and layer.name != "head_spike"}


def test_warmup_trains_alpha_and_fedavg_averages_it_like_any_weight(
    cfg, data, initial, flower_task_identity
):
    from server.strategies import aggregate, make_strategy

    # Prepare
    other = site.data_of(cfg, 1, None)
    start = _alphas(initial)
    assert start and set(start.values()) == {0.5}

    # Execute: one warm-up round at each site, then the server's FedAvg
    a, n_a, _ = site.warmup(cfg, data, initial, step=1, lr=0.01, epochs=1)
    b, n_b, _ = site.warmup(cfg, other, initial, step=1, lr=0.01, epochs=1)
    replies = [Message(P.reply_content(x, n, s, b"sealed"), dst_node_id=0, message_type="train")
               for x, n, s in ((a, n_a, "a"), (b, n_b, "b"))]
    merged = aggregate(make_strategy(cfg.strategy), 1, replies, initial)

    # Assert: α moved at each site and the global α is their example-weighted mean
    for layer, alpha in start.items():
        key = f"{layer}{site.PACT_KEY}"
        assert a[key] != alpha and b[key] != a[key], layer
        expected = (n_a * a[key].astype(np.float64) + n_b * b[key]) / (n_a + n_b)
        assert merged[key] == pytest.approx(expected, rel=1e-6), layer


def test_sgt_changes_the_local_update(cfg, data, initial):
    # Execute: the same round with and without saliency-guided training
    plain_cfg = cfg.model_copy(update={"sgt": cfg.sgt.model_copy(update={"enabled": False})})
    guided, _, m_guided = site.warmup(cfg, data, initial, step=1, lr=0.01, epochs=1)
    plain, _, m_plain = site.warmup(plain_cfg, data, initial, step=1, lr=0.01, epochs=1)

    # Assert
    assert np.isfinite(m_guided["train_loss"]) and np.isfinite(m_plain["train_loss"])
    moved = [k for k in plain if not np.allclose(plain[k], guided[k])]
    assert moved, "SGT gave the same update as plain cross-entropy"


def test_calibration_bakes_alpha_and_a_fresh_process_rebuilds_the_same_model_for_qat(
    cfg, data, initial, tmp_path
):
    from common.weights import BN_STATS, QUANTIZER, TRAINABLE, get_arrays

    # Prepare: a trained α, as after warm-up
    warm, _, _ = site.warmup(cfg, data, initial, step=1, lr=0.01, epochs=1)
    alphas = _alphas(warm)

    # Execute: calibrate (the site keeps the float model in its folder), then QAT with SGT and
    # the final round in a fresh process, from the global arrays (quantized + baked α)
    site.calibrate(cfg, data, warm, step=2, out_dir=tmp_path)
    calibrated = CACHE.models["quantized"].model
    bounds_at_calibration = _relu_bounds(calibrated)
    quantized = {**site.pact_arrays(warm),
                 **get_arrays(calibrated, (TRAINABLE, BN_STATS, QUANTIZER))}
    CACHE.clear()
    trained, _, metrics = site.qat(cfg, data, quantized, step=3, lr=0.001, epochs=1)
    # before finalize: its conversion releases the clips at the range in place (Akida 1.0)
    bounds_rebuilt = _relu_bounds(CACHE.models["quantized"].model)
    n, final = site.finalize(cfg, data, {**quantized, **trained}, step=4, server_hash="",
                             out_dir=tmp_path)
    # ... and the server converting after a resume: it rebuilds from the arrays alone
    _, server_hash = site.akida_from_arrays(cfg, len(data.class_names),
                                            {**quantized, **trained})

    # Assert: every bounded ReLU clips at the global α, in both processes
    assert bounds_at_calibration == pytest.approx(alphas, rel=1e-6)
    assert bounds_rebuilt == bounds_at_calibration
    assert not any(k.endswith(site.PACT_KEY) for k in trained)  # α is not trained in QAT
    assert final["akida_hash"] == server_hash
    assert np.isfinite(metrics["train_loss"])
    assert any(not np.allclose(trained[k], quantized[k]) for k in trained)
    # ... and the final round explained 2 local test images: 2 methods x float/quantized
    sal = final["saliency"]
    assert sal["images"] == 2 and len(sal["files"]) == 8
    for name in sal["files"]:
        assert (tmp_path / name).is_file() and name.startswith("saliency/")
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(sal["stability"]) == {"vanilla", "smoothgrad"}
    reported = json.dumps(sal)
    assert "label" not in reported and "pred" not in reported  # no per-image data
    assert (tmp_path / "saliency" / "summary.json").is_file()  # stays on the site


def test_saliency_without_a_site_folder_is_skipped_with_the_reason(cfg, data, initial):
    # Execute
    out = site.explain_locally(cfg, data, None, None, seed=0)

    # Assert
    assert "out-dir" in out["error"]
