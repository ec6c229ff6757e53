"""An in-process Flower Message-API Grid for unit tests: ``send_and_receive`` hands each message to
a Python function standing in for the node's ClientApp (no Ray, no SuperLink), so a strategy's
``start`` loop runs as Flower drives it."""

from __future__ import annotations

from typing import Callable, Iterable

import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def task_identity():
    """Flower's messages read the process's task identity (set by a SuperLink/SuperNode)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class FunctionGrid(Grid):
    """Nodes 1..n; ``reply(node_id, message) -> RecordDict`` answers each message."""

    def __init__(self, n: int, reply: Callable[[int, Message], RecordDict]) -> None:
        self.nodes = list(range(1, n + 1))
        self.reply = reply
        self.sent: list[list[int]] = []  # the nodes addressed by each send_and_receive

    def set_run(self, run_id: int) -> None:  # pragma: no cover - not used by strategies
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.sent.append([m.metadata.dst_node_id for m in messages])
        return [Message(content=self.reply(m.metadata.dst_node_id, m), reply_to=m) for m in messages]
