"""Fakes for the outbound tests: an in-memory queue store (messages on disk),
scripted delivery agents and an intake that records what it is given."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from zope.interface import implementer

from mailstack import config as configmod
from mailstack.errors import Reply, TemporaryFailure
from mailstack.interfaces import IDeliveryAgent, IIncoming, IIntake
from mailstack.queue.entry import QueueEntry, RecipientState


def run_blocking(f: Callable[..., Any], *a: Any, **kw: Any) -> Deferred:
    return maybeDeferred(f, *a, **kw)


def make_config(**relay: Any) -> configmod.Config:
    raw: dict[str, Any] = {"hostname": "mx.test", "domains": {"local": ["here.test"]}}
    base = {"retry_intervals": ["1m", "5m", "1h"], "max_queue_lifetime": "1d", "delay_warning_after": "4h"}
    base.update(relay)
    raw["relay"] = base
    return configmod.from_mapping(raw)


class FakeStore:
    """QueueStore's contract; envelopes in a dict (as JSON), messages as files."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(os.path.join(root, "msg"), exist_ok=True)
        self.envelopes: dict[str, dict[str, Any]] = {}
        self.saves: list[dict[str, Any]] = []
        self.flush = False
        self.recovered = 0
        self._n = 0

    def new_id(self) -> str:
        self._n += 1
        return f"Q{self._n:04d}"

    def message_path(self, queue_id: str) -> str:
        return os.path.join(self.root, "msg", queue_id)

    def add(self, entry: QueueEntry, body: bytes = b"Subject: hi\r\nFrom: a@b\r\n\r\nbody\r\n") -> QueueEntry:
        with open(self.message_path(entry.id), "wb") as f:
            f.write(body)
        self.envelopes[entry.id] = json.loads(json.dumps(entry.to_json()))
        return entry

    def save(self, entry: QueueEntry) -> None:
        data = json.loads(json.dumps(entry.to_json()))
        self.envelopes[entry.id] = data
        self.saves.append(data)

    def load(self, queue_id: str) -> QueueEntry:
        try:
            return QueueEntry.from_json(json.loads(json.dumps(self.envelopes[queue_id])))
        except KeyError:
            raise FileNotFoundError(queue_id) from None

    def remove(self, queue_id: str) -> None:
        self.envelopes.pop(queue_id, None)
        try:
            os.unlink(self.message_path(queue_id))
        except FileNotFoundError:
            pass

    def scan(self):
        for qid in sorted(self.envelopes):
            yield self.load(qid)

    def recover(self) -> None:
        self.recovered += 1

    def flush_requested(self) -> bool:
        requested, self.flush = self.flush, False
        return requested

    def request_flush(self) -> None:
        self.flush = True


def entry(store: FakeStore, qid: str, sender: str, rcpts: list[str], arrival: float = 0.0, local: tuple = ()) -> QueueEntry:
    e = QueueEntry(
        id=qid,
        sender=sender,
        arrival=arrival,
        recipients=[RecipientState(address=r, original=r, local=r in local) for r in rcpts],
    )
    return store.add(e)


@implementer(IDeliveryAgent)
class FakeAgent:
    """Answers from ``script(entry, rcpts)`` -> {address: Reply} (or a Deferred)."""

    def __init__(self, script: Callable[[Any, list], Any] | None = None) -> None:
        self.script = script or (lambda e, rs: {r.address: Reply(250, "2.0.0", "ok") for r in rs})
        self.calls: list[tuple[str, list[str], list[dict]]] = []
        self.store: FakeStore | None = None

    def deliver(self, entry: QueueEntry, recipients: list) -> Deferred:
        snapshot = []
        if self.store is not None and entry.id in self.store.envelopes:
            snapshot = [dict(r) for r in self.store.envelopes[entry.id]["recipients"]]
        self.calls.append((entry.id, [r.address for r in recipients], snapshot))
        result = self.script(entry, recipients)
        if isinstance(result, Deferred):
            return result
        return succeed(result)


def reply_all(reply: Reply) -> Callable[[Any, list], dict]:
    return lambda e, rs: {r.address: reply for r in rs}


@implementer(IIncoming)
class FakeIncoming:
    def __init__(self, intake: "FakeIntake", envelope: Any) -> None:
        self.intake = intake
        self.envelope = envelope
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def finish(self) -> Deferred:
        if self.intake.fail_next:
            self.intake.fail_next -= 1
            return fail(TemporaryFailure(Reply(451, "4.3.0", "try later")))
        self.intake.messages.append((self.envelope, self.data))
        return succeed(f"D{len(self.intake.messages)}")

    def abort(self) -> None:
        pass


@implementer(IIntake)
class FakeIntake:
    def __init__(self) -> None:
        self.messages: list[tuple[Any, bytes]] = []
        self.fail_next = 0

    def begin(self, envelope: Any) -> FakeIncoming:
        return FakeIncoming(self, envelope)
