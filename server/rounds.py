"""Bounded waits: sites connecting before a deadline, and rounds that go on with a quorum."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.errors import QanafedError
from common.log import get_logger

log = get_logger("server.rounds")


class QuorumError(QanafedError, RuntimeError):
    """Too few sites connected, or too few replied to a round."""


class RunInterrupted(QanafedError, RuntimeError):
    """The run was asked to stop (Ctrl-C) before its plan was done."""


def _check_stop(stop: threading.Event | None, what: str) -> None:
    if stop is not None and stop.is_set():
        raise RunInterrupted(f"{what}: interrupted", "rerun with --resume to continue")


def wait_for_sites(
    grid: Grid,
    min_sites: int,
    timeout: float,
    poll: float = 0.5,
    settle: float = 0.0,
    stop: threading.Event | None = None,
) -> list[int]:
    """Wait until at least ``min_sites`` nodes are connected, or stop at the deadline.

    Unlike Flower's ``sample_nodes`` (which waits forever), this gives up after ``timeout``.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    min_sites : int
        Sites needed to start.
    timeout : float
        Seconds to wait.
    poll : float (default: 0.5)
        Seconds between polls of ``grid.get_node_ids()``.
    settle : float (default: 0.0)
        Once the minimum is reached, keep waiting this long (within the deadline) for more.
    stop : threading.Event | None (default: None)
        When set, stop waiting at once.

    Returns
    -------
    list[int]
        Sorted node ids connected at the end of the wait.

    Raises
    ------
    QuorumError
        If fewer than ``min_sites`` are connected at the deadline.
    RunInterrupted
        If ``stop`` was set.
    """
    deadline = time.monotonic() + timeout
    reached_at: float | None = None
    while True:
        _check_stop(stop, "waiting for sites")
        nodes = sorted(grid.get_node_ids())
        now = time.monotonic()
        if len(nodes) >= min_sites:
            reached_at = now if reached_at is None else reached_at
            if now - reached_at >= settle or now >= deadline:
                log.info("%d site(s) connected (need %d)", len(nodes), min_sites)
                return nodes
        elif now >= deadline:
            raise QuorumError(
                f"only {len(nodes)} site(s) connected after {timeout:g} s; the run needs "
                f"quorum.min-sites={min_sites}",
                "start more SuperNodes, check their address/certificates, or raise "
                "timeouts.connect / lower quorum.min-sites",
            )
        _wait(stop, poll)


@dataclass
class RoundResult:
    """Replies of one round, split into usable ones and failures.

    Parameters
    ----------
    replies : dict[int, Message]
        Node id → reply without error.
    failures : dict[int, str]
        Node id → why it gave nothing (error reply, or no reply before the timeout).
    seconds : float
        Wall time of the round.
    """

    replies: dict[int, Message] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0


def reply_node(reply: Message, sent_to: Mapping[str, int]) -> int:
    """Return the node a reply answers for: the destination of the message it replies to.

    A site's own reply carries its node id as ``src_node_id``, but an error the SuperLink
    makes up for a site ("node unavailable", "reply message unavailable") comes from the
    SuperLink's node (1), so the node is looked up through ``reply_to_message_id``.

    Parameters
    ----------
    reply : Message
        A reply pulled from the grid.
    sent_to : Mapping[str, int]
        Message id → destination node id of the messages sent (ids set by the grid's push).
    """
    node = sent_to.get(reply.metadata.reply_to_message_id)
    return reply.metadata.src_node_id if node is None else node


def _wait(stop: threading.Event | None, seconds: float) -> None:
    if stop is None:
        time.sleep(seconds)
    else:
        stop.wait(seconds)


def send_and_receive(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    stop: threading.Event | None = None,
    what: str = "round",
) -> list[Message]:
    """Push ``messages`` and pull their replies until all came, ``timeout`` passed or ``stop``.

    Flower's ``Grid.send_and_receive``, but a set ``stop`` ends the wait at once.

    Raises
    ------
    RunInterrupted
        If ``stop`` was set (before or while waiting).
    """
    _check_stop(stop, what)
    waiting = set(grid.push_messages(messages))
    poll = min(float(getattr(grid, "pull_interval", 1.0)), 1.0)
    deadline = time.monotonic() + timeout
    received: list[Message] = []
    while True:
        replies = list(grid.pull_messages(waiting))
        received.extend(replies)
        waiting.difference_update(m.metadata.reply_to_message_id for m in replies)
        if not waiting or time.monotonic() >= deadline:
            return received
        _wait(stop, min(poll, max(0.0, deadline - time.monotonic())))
        _check_stop(stop, what)


def run_round(
    grid: Grid,
    contents: Mapping[int, RecordDict],
    message_type: str,
    timeout: float,
    min_replies: int,
    label: Callable[[int], str] = str,
    what: str = "round",
    timeout_key: str = "timeouts.round",
    stop: threading.Event | None = None,
) -> RoundResult:
    """Send one message per node, wait at most ``timeout``, and demand ``min_replies`` good replies.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    contents : Mapping[int, RecordDict]
        Node id → message content.
    message_type : str
        Flower message type, e.g. ``"train.warmup"``.
    timeout : float
        Seconds to wait for replies; late replies are ignored.
    min_replies : int
        Good replies needed.
    label : Callable[[int], str] (default: str)
        Names a node in logs (its site id when known).
    what : str (default: "round")
        Names the round in logs and errors.
    timeout_key : str (default: "timeouts.round")
        The scenario key of ``timeout``, suggested when sites did not reply in time.
    stop : threading.Event | None (default: None)
        When set, the round is abandoned at once.

    Raises
    ------
    QuorumError
        If fewer than ``min_replies`` good replies arrived in time.
    RunInterrupted
        If ``stop`` was set.
    """
    start = time.monotonic()
    messages = [
        Message(content, node_id, message_type, ttl=max(timeout * 2, 60.0))
        for node_id, content in contents.items()
    ]
    received = send_and_receive(grid, messages, timeout, stop, what)
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    result = RoundResult()
    for msg in received:
        node = reply_node(msg, sent_to)
        if msg.has_error():
            result.failures[node] = f"error reply: {msg.error.reason}"
        else:
            result.replies[node] = msg
    for node in contents:
        if node not in result.replies and node not in result.failures:
            result.failures[node] = f"no reply within {timeout:g} s"
    result.seconds = time.monotonic() - start
    for node, why in result.failures.items():
        log.warning("%s: site %s dropped: %s", what, label(node), why)
    if len(result.replies) < min_replies:
        raise QuorumError(
            f"{what}: only {len(result.replies)} of {len(contents)} site(s) replied usefully "
            f"within {timeout:g} s; quorum.min-replies={min_replies}. Failures: "
            + "; ".join(f"{label(n)}: {w}" for n, w in result.failures.items()),
            "fix the failing sites (see their logs)"
            + (f", raise {timeout_key}" if any(w.startswith("no reply") for w in
                                               result.failures.values()) else "")
            + ", or lower quorum.min-replies; then rerun with --resume",
        )
    log.info("%s: %d/%d replies in %.1f s", what, len(result.replies), len(contents),
             result.seconds)
    return result
