"""What travels in Flower messages: weights, the example count and a sealed report, nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics_crypto import (
    MisaddressedReport,
    ReplayedReport,
    ReportReceiver,
    encrypt_report,
    generate_metrics_keypair,
)
from server import protocol as P
from server.driver import Receiver, plan
from server.reports import global_summary


def test_a_reply_carries_metrics_only_sealed():
    # Prepare
    private, public = generate_metrics_keypair()
    metrics = {"test": {"balanced_accuracy": 0.8125, "num_examples": 16}}
    envelope = encrypt_report(metrics, public, run_id="r", round=2, site_id="site-0")

    # Execute
    content = P.reply_content({"w": np.ones(3, np.float32)}, 40, "site-0", envelope)

    # Assert: the only plain number is the example weight; the score is not in any record
    assert dict(content[P.METRICS]) == {P.NUM_EXAMPLES: 40}
    assert set(content[P.REPORT].keys()) == {P.SITE_ID, P.ENVELOPE}
    assert b"0.8125" not in content[P.REPORT][P.ENVELOPE]
    assert ReportReceiver(private).open(content[P.REPORT][P.ENVELOPE], run_id="r", round=2,
                                        site_id="site-0") == metrics


def test_the_receiver_refuses_replays_and_misaddressed_reports_and_keeps_seen_ids(caplog):
    # Prepare
    private, public = generate_metrics_keypair()
    receiver = Receiver(private)
    env = encrypt_report({"x": 1}, public, run_id="r", round=1, site_id="a")

    # Execute
    first = receiver.open(env, "r", 1, "a")
    replay = receiver.open(env, "r", 1, "a")
    other_site = receiver.open(encrypt_report({"x": 1}, public, run_id="r", round=1,
                                              site_id="a"), "r", 1, "b")
    receiver.restore(receiver.seen_ids())
    after_restart = receiver.open(env, "r", 1, "a")

    # Assert
    assert first == {"x": 1}
    assert replay is None and other_site is None and after_restart is None
    assert ReplayedReport.__name__ in caplog.text and MisaddressedReport.__name__ in caplog.text
    assert len(receiver.seen_ids()) == 1
    with pytest.raises(ReplayedReport):
        ReportReceiver(private, seen_ids=receiver.seen_ids()).open(env, run_id="r", round=1,
                                                                   site_id="a")


def test_plan_orders_phases_and_skips_quantization_for_the_float_variant():
    from common.fedconfig import parse_config

    q = parse_config({"name": "x", "data": "d", "rounds": {"warmup": 2, "qat": 1}})
    f = parse_config({"name": "x", "data": "d", "rounds": {"warmup": 2, "qat": 1},
                      "model": {"variant": "qana-float"}})
    assert [s.phase for s in plan(q)] == ["warmup", "warmup", "calibrate", "qat", "finalize"]
    assert [s.number for s in plan(q)] == [1, 2, 3, 4, 5]
    assert [s.phase for s in plan(f)] == ["warmup", "warmup", "finalize"]


def test_global_numbers_are_example_weighted():
    reports = {"a": {"test": {"balanced_accuracy": 1.0, "num_examples": 30}, "train_loss": 1.0,
                     "train_examples": 10},
               "b": {"test": {"balanced_accuracy": 0.0, "num_examples": 10}, "train_loss": 3.0,
                     "train_examples": 30}}
    g = global_summary(reports)
    assert g["test.balanced_accuracy"] == pytest.approx(0.75)
    assert g["train_loss"] == pytest.approx(2.5)


def test_scalar_arrays_keep_their_shape_through_a_record():
    # per-tensor quantizer ranges are 0-d arrays; they must not come back as shape (1,)
    arrays = {"q/range_max": np.asarray(np.float32(2.5)), "w": np.ones((2, 3), np.float32)}
    back = P.from_record(P.to_record(arrays))
    assert back["q/range_max"].shape == () and back["w"].shape == (2, 3)


def test_a_model_travels_as_a_few_objects_and_comes_back_exactly():
    # Prepare: ~70 tensors of mixed dtypes and shapes, as a QANA model's exchange
    rng = np.random.default_rng(0)
    arrays = {f"block{i}/kernel": rng.normal(size=(3, 3, 4, i + 1)).astype(np.float32)
              for i in range(35)}
    arrays |= {f"block{i}/range_max": np.asarray(np.float32(i)) for i in range(34)}
    arrays["steps"] = np.asarray([7], np.int64)
    # Execute
    record = P.to_record(arrays)
    back = P.from_record(record)
    # Assert: two Arrays on the wire, every array back with its name, dtype, shape and values
    assert len(record) == 2
    assert list(back) == list(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    assert P.record_nbytes(P.request_content(arrays, {})) >= sum(v.nbytes for v in arrays.values())


def test_replies_are_unpacked_for_the_strategy_to_average_by_key(flower_task_identity):
    from flwr.app import Message, RecordDict

    from common.fedconfig import StrategyConfig
    from server.strategies import aggregate, make_strategy

    arrays = [{"w": np.full((2, 2), x, np.float32), "b": np.asarray(np.float32(x))}
              for x in (1.0, 3.0)]
    replies = []
    for i, a in enumerate(arrays):
        request = Message(RecordDict(), dst_node_id=i + 1, message_type=P.WARMUP)
        replies.append(P.reply_of(request, P.reply_content(a, 10 * (i + 1), f"s{i}", b"x")))
    # Execute: FedAvg weighted 10:20
    out = aggregate(make_strategy(StrategyConfig()), 1, replies, arrays[0])
    # Assert
    np.testing.assert_allclose(out["w"], np.full((2, 2), (1 * 10 + 3 * 20) / 30))
    assert out["b"].shape == () and float(out["b"]) == pytest.approx(7 / 3)
