"""run_round attributes every reply, including the SuperLink's own error replies, to its site."""

from __future__ import annotations

import pytest
from flwr.app import Message, RecordDict
from flwr.app.error import Error
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from server.rounds import QuorumError, run_round

SUPERLINK = 1  # the node id flwr's SuperLink puts on the errors it makes up


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are built inside a ServerApp task, which knows its run and node."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 42)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class ReplyingGrid:
    """A grid that gives each message an id, as flwr's grids do, and answers by node.

    ``answers[node]`` is ``"ok"`` (the site replies), ``"raised"`` (the site's ClientApp
    failed), ``"unavailable"`` (the SuperLink answers "node unavailable") or ``"silent"``.
    """

    pull_interval = 0.05

    def __init__(self, answers: dict[int, str]) -> None:
        self.answers = answers
        self._pending: dict[str, Message] = {}

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            ids.append(msg.object_id)
            answer = self.answers[msg.metadata.dst_node_id]
            if answer == "ok":
                self._pending[msg.object_id] = Message(RecordDict(), reply_to=msg)
            elif answer == "raised":
                self._pending[msg.object_id] = Message(
                    Error(code=0, reason="ClientApp raised"), reply_to=msg)
            elif answer == "unavailable":
                self._pending[msg.object_id] = create_message_error_unavailable_res_message(
                    msg.metadata, "node_unavail")
        return ids

    def pull_messages(self, message_ids):
        return [self._pending.pop(i) for i in list(message_ids) if i in self._pending]


def test_superlink_errors_are_attributed_to_the_node_they_were_sent_to() -> None:
    # Prepare: four sites; the SuperLink answers for node 9 with its own node id
    grid = ReplyingGrid({7: "ok", 8: "raised", 9: "unavailable", 10: "silent"})
    contents = {node: RecordDict() for node in grid.answers}

    # Execute
    result = run_round(grid, contents, "train.warmup", timeout=5, min_replies=1)

    # Assert: the good reply is node 7's; every failure names the site it was sent to
    assert set(result.replies) == {7}
    assert set(result.failures) == {8, 9, 10}
    assert SUPERLINK not in result.failures
    assert "ClientApp raised" in result.failures[8]
    assert result.failures[9].startswith("error reply: ")
    assert "unavailable" in result.failures[9].lower()
    assert result.failures[10] == "no reply within 5 s"


def test_quorum_error_names_the_unavailable_site() -> None:
    # Prepare: only the SuperLink's "node unavailable" for node 4 comes back
    grid = ReplyingGrid({3: "ok", 4: "unavailable"})
    contents = {node: RecordDict() for node in grid.answers}

    # Execute / Assert
    with pytest.raises(QuorumError) as err:
        run_round(grid, contents, "train.qat", timeout=5, min_replies=2,
                  label={3: "a", 4: "b"}.get, what="round 3")
    assert "b: error reply" in err.value.problem
    assert "None:" not in err.value.problem


def test_quorum_fix_suggests_the_timeout_only_when_a_site_timed_out() -> None:
    # Prepare: sites whose ClientApp failed, then a site that stayed silent
    failing = ReplyingGrid({3: "raised", 4: "raised"})
    silent = ReplyingGrid({3: "raised", 4: "silent"})
    contents = {node: RecordDict() for node in failing.answers}

    # Execute
    with pytest.raises(QuorumError) as failed:
        run_round(failing, contents, "train.warmup", timeout=5, min_replies=1, what="hello",
                  timeout_key="timeouts.connect")
    with pytest.raises(QuorumError) as timed_out:
        run_round(silent, contents, "train.warmup", timeout=5, min_replies=1, what="hello",
                  timeout_key="timeouts.connect")

    # Assert
    assert "timeouts" not in failed.value.fix and "fix the failing sites" in failed.value.fix
    assert "raise timeouts.connect" in timed_out.value.fix
