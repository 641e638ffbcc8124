"""Which variables each phase exchanges, FedAvg via Flower, and the calibration combination rule."""

from __future__ import annotations

import numpy as np
import pytest
import tf_keras as keras
from flwr.app import Message

from common.aggregate import EXCHANGED, apply_ranges, combine_ranges, raw_ranges, weighted_mean
from common.checkpoint import Checkpoint, load_latest, save_checkpoint
from common.errors import ModelError
from common.fedconfig import StrategyConfig
from common.weights import BN_STATS, OTHER, QUANTIZER, TRAINABLE, get_arrays, set_arrays
from server import protocol as P
from server.strategies import aggregate, make_strategy


def _float_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, 16, 3), name="t_input")
    x = keras.layers.Rescaling(1 / 255.0, name="t_rescale")(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="t_conv1")(x)
    x = keras.layers.BatchNormalization(name="t_bn1")(x)
    x = keras.layers.ReLU(6.0, name="t_relu1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="t_conv2")(x)
    x = keras.layers.BatchNormalization(name="t_bn2")(x)
    x = keras.layers.ReLU(6.0, name="t_relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="t_gap")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="t_dense")(x), name="tiny")


def _quantize(model: keras.Model, samples: np.ndarray) -> keras.Model:
    import cnn2snn
    from quantizeml.models import QuantizationParams, quantize

    qp = QuantizationParams(input_weight_bits=8, weight_bits=4, activation_bits=4)
    with cnn2snn.set_akida_version(cnn2snn.AkidaVersion.v1):
        return quantize(model, qparams=qp, samples=samples, num_samples=len(samples),
                        batch_size=len(samples))


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"a": rng.uniform(0, 255, (16, 16, 16, 3)).astype(np.float32),
            "b": rng.uniform(0, 90, (16, 16, 16, 3)).astype(np.float32),
            "c": rng.uniform(0, 30, (4, 16, 16, 3)).astype(np.float32)}


def test_float_variables_fall_into_named_groups():
    # Prepare
    model = _float_model()

    # Execute
    trainable = get_arrays(model, [TRAINABLE])
    bn = get_arrays(model, [BN_STATS])

    # Assert
    assert set(trainable) == {"t_conv1/kernel", "t_conv1/bias", "t_bn1/gamma", "t_bn1/beta",
                              "t_conv2/kernel", "t_conv2/bias", "t_bn2/gamma", "t_bn2/beta",
                              "t_dense/kernel", "t_dense/bias"}
    assert set(bn) == {"t_bn1/moving_mean", "t_bn1/moving_variance",
                       "t_bn2/moving_mean", "t_bn2/moving_variance"}
    assert get_arrays(model, [QUANTIZER, OTHER]) == {}
    assert EXCHANGED["warmup"] == (TRAINABLE, BN_STATS)


def test_quantizer_state_is_calibration_only_and_never_averaged_in_qat(images):
    # Prepare
    qmodel = _quantize(_float_model(), images["a"])

    # Execute
    q = get_arrays(qmodel, [QUANTIZER])
    qat = get_arrays(qmodel, EXCHANGED["qat"])

    # Assert: stable keys (quantizeml's auto-named input quantizer included)
    assert set(q) == {"input_quantizer/range_min", "input_quantizer/range_max",
                      "t_relu1/output_quantizer/range_max",
                      "t_relu1/output_quantizer/rescaling_rate",
                      "t_gap/output_quantizer/range_max", "t_gap/output_quantizer/rescaling_rate"}
    assert EXCHANGED["calibrate"] == (QUANTIZER,)
    assert not set(q) & set(qat)
    assert "t_conv1/kernel" in qat


def test_set_arrays_round_trip_and_shape_errors():
    # Prepare
    src, dst = _float_model(1), _float_model(2)
    arrays = get_arrays(src, EXCHANGED["warmup"])

    # Execute
    n = set_arrays(dst, arrays)

    # Assert
    assert n == len(arrays) == 14
    for k, v in get_arrays(dst, EXCHANGED["warmup"]).items():
        np.testing.assert_array_equal(v, arrays[k])
    with pytest.raises(ModelError, match="t_dense/bias.*shape"):
        set_arrays(dst, {"t_dense/bias": np.zeros(5)})
    with pytest.raises(ModelError, match="no variables"):
        set_arrays(dst, {"nope/kernel": np.zeros(1)})


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Every test here builds Flower messages."""


def _reply(arrays: dict[str, np.ndarray], n: int) -> Message:
    return Message(P.reply_content(arrays, n, "s", b"sealed"), dst_node_id=0, message_type="train")


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_flower_aggregation_is_the_example_weighted_mean(name):
    # Prepare
    rng = np.random.default_rng(0)
    sites = [{"w": rng.normal(size=(3, 2)).astype(np.float32),
              "bn/moving_mean": rng.normal(size=2).astype(np.float32)} for _ in range(3)]
    weights = [10, 30, 60]
    strategy = make_strategy(StrategyConfig(name=name, **({"proximal-mu": 0.1}
                                                          if name == "fedprox" else {})))

    # Execute
    out = aggregate(strategy, 1, [_reply(a, n) for a, n in zip(sites, weights, strict=True)],
                    current=sites[0])

    # Assert
    expected = weighted_mean(sites, weights)
    for k in expected:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-6)
        assert out[k].dtype == np.float32


def test_fedadam_moves_from_the_current_model_towards_the_mean():
    # Prepare
    current = {"w": np.zeros(4, np.float32)}
    sites = [{"w": np.full(4, 1.0, np.float32)}, {"w": np.full(4, 3.0, np.float32)}]
    strategy = make_strategy(StrategyConfig.model_validate({"name": "fedadam", "server-lr": 0.1}))

    # Execute
    out = aggregate(strategy, 1, [_reply(a, 1) for a in sites], current=current)

    # Assert: a positive step of at most about eta, with server state kept for checkpoints
    assert np.all(out["w"] > 0) and np.all(out["w"] <= 0.2)
    assert set(strategy.m_t) == {"w"} and set(strategy.v_t) == {"w"}


def test_combination_rule_is_the_per_channel_max_of_raw_ranges():
    # Prepare: site 2 was equalized (stored max 0.5 with rate 0.25 → raw 2.0)
    s1 = {"l/output_quantizer/range_max": np.array([1.0, 4.0], np.float32),
          "l/output_quantizer/rescaling_rate": np.array([1.0, 1.0], np.float32),
          "input_quantizer/range_min": np.array([0.0], np.float32),
          "input_quantizer/range_max": np.array([200.0], np.float32)}
    s2 = {"l/output_quantizer/range_max": np.array([0.5, 0.5], np.float32),
          "l/output_quantizer/rescaling_rate": np.array([0.25, 1.0], np.float32),
          "input_quantizer/range_min": np.array([-1.0], np.float32),
          "input_quantizer/range_max": np.array([255.0], np.float32)}

    # Execute
    combined = combine_ranges([s1, s2])

    # Assert
    np.testing.assert_array_equal(raw_ranges(s2)["l/output_quantizer/range_max"], [2.0, 0.5])
    np.testing.assert_array_equal(combined["l/output_quantizer/range_max"], [2.0, 4.0])
    np.testing.assert_array_equal(combined["input_quantizer/range_min"], [-1.0])
    np.testing.assert_array_equal(combined["input_quantizer/range_max"], [255.0])
    with pytest.raises(ModelError):
        combine_ranges([])


def test_one_site_calibration_applied_on_the_server_reproduces_that_site_exactly(images):
    # Prepare: a site calibrates on its images; the server's model was calibrated on others
    site = _quantize(_float_model(), images["a"])
    server = _quantize(_float_model(), images["c"])
    everything = (TRAINABLE, BN_STATS, QUANTIZER, OTHER)

    # Execute
    apply_ranges(server, combine_ranges([get_arrays(site, [QUANTIZER])]))

    # Assert: every variable (ranges, rates and the re-equalized kernels) matches
    want, got = get_arrays(site, everything), get_arrays(server, everything)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_two_site_calibration_covers_both_sites_ranges(images):
    # Prepare
    a = _quantize(_float_model(), images["a"])
    b = _quantize(_float_model(), images["b"])
    server = _quantize(_float_model(), images["c"])
    states = [get_arrays(m, [QUANTIZER]) for m in (a, b)]

    # Execute
    apply_ranges(server, combine_ranges(states))

    # Assert: the global raw range is at least each site's, and equals one of them per channel
    glob = raw_ranges(get_arrays(server, [QUANTIZER]))
    for key, value in glob.items():
        if key.endswith("range_max"):
            site_raw = np.stack([raw_ranges(s)[key] for s in states])
            assert np.all(value >= site_raw.max(0) * (1 - 1e-6)), key
    np.testing.assert_allclose(glob["input_quantizer/range_max"],
                               raw_ranges(states[0])["input_quantizer/range_max"])


def test_checkpoint_round_trip_is_atomic_and_keeps_the_last_two(tmp_path):
    # Prepare
    arrays = {"w": np.arange(4, dtype=np.float32)}

    # Execute
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, Checkpoint(step, arrays, {"m_t": {"w": arrays["w"] * step}},
                                             {"step": step, "seen-ids": ["a", "b"]}))
    ckpt = load_latest(tmp_path)

    # Assert
    assert ckpt.step == 3 and ckpt.state["seen-ids"] == ["a", "b"]
    np.testing.assert_array_equal(ckpt.groups["m_t"]["w"], arrays["w"] * 3)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00002", "step-00003"]
    assert not list(tmp_path.glob(".*tmp"))
    assert load_latest(tmp_path / "empty") is None
