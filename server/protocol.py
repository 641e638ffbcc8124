"""The round protocol's message types and record keys, shared by the ServerApp and the ClientApp."""

from __future__ import annotations

import json
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


#: Keys of a packed ArrayRecord: all arrays' bytes in one Array, and what they are.
PACKED, MANIFEST = "packed", "manifest"


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack named numpy arrays into an ArrayRecord of two Arrays (keys, order, dtypes kept).

    Flower sends every Array of a message as objects of its own, each pulled and pushed with
    a request of its own at every hop (ServerApp, SuperLink, SuperNode, ClientApp); a QANA
    model has ~70 tensors, so one round moved ~140 objects each way. Packed, it is a few.
    :func:`from_record` (and :func:`unpack_replies` before a strategy averages) undo it.
    """
    manifest, chunks = [], []
    for k, v in arrays.items():
        # np.ascontiguousarray would turn 0-d arrays (per-tensor ranges) into shape (1,).
        a = np.asarray(v, order="C")
        manifest.append([k, a.dtype.str, list(a.shape)])
        chunks.append(a.tobytes())
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    header = np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8)
    return ArrayRecord({MANIFEST: Array(header.copy()), PACKED: Array(data.copy())})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord (packed by :func:`to_record`, or one Array per key)."""
    if set(record.keys()) != {MANIFEST, PACKED}:
        return {k: v.numpy() for k, v in record.items()}
    manifest = json.loads(record[MANIFEST].numpy().tobytes().decode("utf-8"))
    data = record[PACKED].numpy().tobytes()
    out, offset = {}, 0
    for key, dtype, shape in manifest:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        out[key] = np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(shape).copy()
        offset += count * dt.itemsize
    if offset != len(data):
        raise ValueError(f"packed arrays: manifest covers {offset} of {len(data)} bytes")
    return out


def unpack_replies(replies: list[Message]) -> None:
    """Replace each reply's packed ArrayRecord by one Array per key, in place.

    Flower's strategies average key by key, so they must see the named arrays.
    """
    for m in replies:
        if ARRAYS in m.content:
            m.content[ARRAYS] = ArrayRecord(
                {k: Array(v) for k, v in from_record(m.content[ARRAYS]).items()})


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
