"""The round protocol's message types and record keys, shared by the ServerApp and the ClientApp."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

#: Message types, one per phase ("<category>.<action>" as Flower routes them).
HELLO = "query.hello"
WARMUP = "train.warmup"
CALIBRATE = "query.calibrate"
QAT = "train.qat"
FINALIZE = "evaluate.finalize"

#: Phase name of each message type (used for checkpoints, seeds and reports).
PHASE_OF = {HELLO: "hello", WARMUP: "warmup", CALIBRATE: "calibrate", QAT: "qat",
            FINALIZE: "finalize"}

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
REPORT = "report"
NUM_EXAMPLES = "num-examples"
SITE_ID = "site-id"
ENVELOPE = "envelope"


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack named numpy arrays into an ArrayRecord (keys kept, order kept)."""
    # np.ascontiguousarray would turn 0-d arrays (per-tensor ranges) into shape (1,).
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into named numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


def request_content(
    arrays: Mapping[str, np.ndarray] | None, config: Mapping[str, Any]
) -> RecordDict:
    """Build the content of a server → site message."""
    content = RecordDict({CONFIG: ConfigRecord(dict(config))})
    if arrays is not None:
        content[ARRAYS] = to_record(arrays)
    return content


def reply_content(
    arrays: Mapping[str, np.ndarray] | None, num_examples: int, site_id: str, envelope: bytes
) -> RecordDict:
    """Build the content of a site → server reply: arrays, the example weight, the sealed report.

    Metrics travel only inside ``envelope`` (encrypted to the coordinator); the plain
    ``num-examples`` weight needed for averaging is the only number in the clear.
    """
    content = RecordDict({
        METRICS: MetricRecord({NUM_EXAMPLES: int(num_examples)}),
        REPORT: ConfigRecord({SITE_ID: site_id, ENVELOPE: envelope}),
    })
    if arrays is not None:
        content[ARRAYS] = to_record(arrays)
    return content


def reply_of(message: Message, content: RecordDict) -> Message:
    """Wrap reply content as the reply to ``message``."""
    return Message(content, reply_to=message)


def record_nbytes(content: RecordDict) -> int:
    """Bytes of array payload in a message content (what dominates traffic)."""
    return int(sum(len(a.data) for rec in content.array_records.values() for a in rec.values()))
