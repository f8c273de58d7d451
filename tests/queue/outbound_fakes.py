"""Fakes for the outbound tests: an in-memory queue store (messages on disk),
scripted delivery agents and an intake that records what it is given."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mailstack import config as configmod
from mailstack.errors import Reply, TemporaryFailure
from mailstack.interfaces import IDeliveryAgent, IIncoming, IIntake, IQueueStore
from mailstack.queue.entry import QueueEntry, RecipientState
from mailstack.queue.store import HEADER_LIMIT, NoSuchEntry, Recovery, read_headers
from tests.support.fakes import FakeTLS, run_blocking  # noqa: F401 (the outbound tests import them from here)


def make_config(**relay: Any) -> configmod.Config:
    raw: dict[str, Any] = {"hostname": "mx.test", "domains": {"local": ["here.test"]}}
    base = {"retry_intervals": ["1m", "5m", "1h"], "max_queue_lifetime": "1d", "delay_warning_after": "4h"}
    base.update(relay)
    raw["relay"] = base
    return configmod.from_mapping(raw)


@implementer(IQueueStore)
class FakeStore:
    """IQueueStore with envelopes in a dict (as JSON) and messages as files.

    Ids need not be real queue ids ("A", "Q1"), attempt marks are kept
    beside the envelopes rather than as mtimes (the fake clock is far in the
    past), and every save and removal is recorded for the tests.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(os.path.join(root, "msg"), exist_ok=True)
        self.envelopes: dict[str, dict[str, Any]] = {}
        self.saves: list[dict[str, Any]] = []
        self.removals: list[tuple[str, bool]] = []  # (id, sync)
        self.flush = False
        self.kicks: list[str] = []
        self.recovered = 0
        self.marks: dict[str, float] = {}  # attempt marks (a real store: the envelope's mtime)

    def message_path(self, queue_id: str) -> str:
        return os.path.join(self.root, "msg", queue_id)

    def envelope_path(self, queue_id: str) -> str:
        return os.path.join(self.root, "env", queue_id + ".json")  # never written

    def add(self, entry: QueueEntry, body: bytes = b"Subject: hi\r\nFrom: a@b\r\n\r\nbody\r\n") -> QueueEntry:
        with open(self.message_path(entry.id), "wb") as f:
            f.write(body)
        self.envelopes[entry.id] = json.loads(json.dumps(entry.to_json()))
        return entry

    def save(self, entry: QueueEntry, keep_hold: bool = False) -> None:
        current = self.envelopes.get(entry.id)
        if keep_hold and current is not None:
            entry.held_since, entry.held_time = current.get("held_since", 0.0), current.get("held_time", 0.0)
        data = json.loads(json.dumps(entry.to_json()))
        self.envelopes[entry.id] = data
        self.marks.pop(entry.id, None)  # a new envelope
        self.saves.append(data)

    def read_envelope(self, queue_id: str) -> tuple[bytes, float]:
        try:
            data = json.dumps(self.envelopes[queue_id]).encode("utf-8")
        except KeyError:
            raise NoSuchEntry(queue_id) from None
        return data, self.marks.get(queue_id, 0.0)

    def load(self, queue_id: str) -> QueueEntry:
        return QueueEntry.from_json(json.loads(self.read_envelope(queue_id)[0]))

    def load_message(self, queue_id: str) -> tuple[QueueEntry, bytes | None]:
        return self.load(queue_id), None  # the message is always a file here

    def read_message(self, queue_id: str) -> bytes:
        with open(self.message_path(queue_id), "rb") as f:
            return f.read()

    def message_headers(self, queue_id: str, limit: int = HEADER_LIMIT) -> bytes:
        return read_headers(self.message_path(queue_id), limit)

    def ids(self) -> list[str]:
        return sorted(self.envelopes)

    def remove(self, queue_id: str, sync: bool = True, message_file: bool = True) -> bool:
        self.removals.append((queue_id, sync))
        gone = self.envelopes.pop(queue_id, None) is not None
        self.marks.pop(queue_id, None)
        try:
            os.unlink(self.message_path(queue_id))
        except FileNotFoundError:
            pass
        return gone

    def mark_attempt(self, queue_id: str, not_before: float) -> None:
        if queue_id not in self.envelopes:
            raise NoSuchEntry(queue_id)
        self.marks[queue_id] = not_before

    def attempt_mark(self, queue_id: str) -> float:
        return self.marks.get(queue_id, 0.0)

    def scan(self) -> Iterator[QueueEntry]:
        for qid in self.ids():
            yield self.load(qid)

    def recover(self, read_envelopes: bool = True) -> Recovery:
        self.recovered += 1
        return Recovery()

    def flush_requested(self) -> bool:
        requested, self.flush = self.flush, False
        return requested

    def request_flush(self) -> None:
        self.flush = True

    def request_kick(self, queue_id: str) -> None:
        self.kicks.append(queue_id)

    def kicks_requested(self) -> list[str]:
        kicks, self.kicks = self.kicks, []
        return kicks


def entry(
    store: FakeStore, qid: str, sender: str, rcpts: list[str], arrival: float = 0.0, local: tuple = ()
) -> QueueEntry:
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

    takes_message = False

    def __init__(self, script: Callable[[Any, list], Any] | None = None) -> None:
        self.script = script or (lambda e, rs: {r.address: Reply(250, "2.0.0", "ok") for r in rs})
        self.calls: list[tuple[str, list[str], list[dict]]] = []
        self.messages: list[bytes | None] = []  # the message argument of each call
        self.store: FakeStore | None = None
        self.closed = 0  # close_idle calls
        self.aborted = 0  # abort_all calls

    def deliver(self, entry: QueueEntry, recipients: list, message: bytes | None = None) -> Deferred:
        snapshot = []
        if self.store is not None and entry.id in self.store.envelopes:
            snapshot = [dict(r) for r in self.store.envelopes[entry.id]["recipients"]]
        self.calls.append((entry.id, [r.address for r in recipients], snapshot))
        self.messages.append(message)
        result = self.script(entry, recipients)
        if isinstance(result, Deferred):
            return result
        return succeed(result)

    def close_idle(self) -> None:
        self.closed += 1

    def abort_all(self) -> None:
        self.aborted += 1


def reply_all(reply: Reply) -> Callable[[Any, list], dict]:
    return lambda e, rs: {r.address: reply for r in rs}


@implementer(IIncoming)
class FakeIncoming:
    def __init__(self, intake: FakeIntake, envelope: Any) -> None:
        self.intake = intake
        self.envelope = envelope
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def message(self) -> Any:
        from tests.smtp.support import FakeMessage

        return FakeMessage(self.data)

    def finish(self, changes: Any = None) -> Deferred:
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

    def wait_idle(self) -> Deferred:
        return succeed(None)


# -- SMTP on the other end: a scriptable sink, and an in-memory network ------

from twisted.internet.error import ConnectionRefusedError as _Refused  # noqa: E402 (grouped with the fakes that use it)
from twisted.internet.error import TCPTimedOutError as _TimedOut  # noqa: E402 (grouped with the fakes that use it)
from twisted.internet.interfaces import IStreamClientEndpoint  # noqa: E402 (grouped with the fakes that use it)
from twisted.protocols.basic import LineReceiver  # noqa: E402 (grouped with the fakes that use it)
from twisted.test import iosim  # noqa: E402 (grouped with the fakes that use it)


class FakeSMTPServer(LineReceiver):
    """An SMTP sink whose replies come from keyword arguments.

    ``rcpt`` maps an address to a reply line (default 250); ``messages`` gets
    ``(sender, [rcpts], raw_data_bytes)`` with the DATA stream as it arrived
    (still dot-stuffed, without the final ".").
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 100000

    def __init__(
        self,
        greeting: bytes = b"220 sink.test ESMTP",
        extensions: tuple = (b"PIPELINING", b"SIZE 10000000", b"8BITMIME"),
        ehlo: bytes | None = None,
        mail: bytes = b"250 2.1.0 Ok",
        rcpt: dict | None = None,
        data: bytes = b"354 End data with <CR><LF>.<CR><LF>",
        final: bytes = b"250 2.0.0 Ok: queued",
        starttls: FakeTLS | None = None,
        auth: tuple | None = None,
        hang_at: bytes | None = None,
        drop_at: bytes | None = None,
    ) -> None:
        self.greeting = greeting
        self.extensions = list(extensions)
        if starttls is not None:
            self.extensions.append(b"STARTTLS")
        if auth is not None:
            self.extensions.append(b"AUTH PLAIN LOGIN")
        self.ehlo_reply = ehlo
        self.mail_reply = mail
        self.rcpt_replies = rcpt or {}
        self.data_reply = data
        self.final_reply = final
        self.starttls = starttls
        self.auth = auth
        self.hang_at = hang_at
        self.drop_at = drop_at
        self.commands: list[bytes] = []
        self.messages: list[tuple[bytes, list[bytes], bytes]] = []
        self.tls = False
        self._data: list[bytes] | None = None
        self._sender = b""
        self._rcpts: list[bytes] = []

    def connectionMade(self) -> None:
        self.sendLine(self.greeting)

    def lineReceived(self, line: bytes) -> None:
        if self._data is not None:
            if line == b".":
                data = b"".join(line + b"\r\n" for line in self._data)
                self._data = None
                if self.drop_at == b".":
                    self.transport.loseConnection()
                    return
                self.messages.append((self._sender, list(self._rcpts), data))
                self.sendLine(self.final_reply)
            else:
                self._data.append(line)
            return
        self.commands.append(line)
        verb = line.split(b" ", 1)[0].upper().split(b":")[0]
        if self.hang_at is not None and line.upper().startswith(self.hang_at):
            return
        if self.drop_at is not None and line.upper().startswith(self.drop_at):
            self.transport.loseConnection()
            return
        if verb == b"EHLO":
            if self.ehlo_reply is not None:
                self.sendLine(self.ehlo_reply)
                return
            lines = [b"sink.test"] + self.extensions
            for i, line in enumerate(lines):
                self.sendLine(b"250" + (b" " if i == len(lines) - 1 else b"-") + line)
        elif verb == b"HELO":
            self.sendLine(b"250 sink.test")
        elif verb == b"STARTTLS":
            self.sendLine(b"220 2.0.0 Ready to start TLS")
            self.transport.startTLS(self.starttls)
            self.tls = True
        elif verb == b"AUTH":
            import base64

            parts = line.split(b" ")
            if len(parts) == 3 and parts[1].upper() == b"PLAIN":
                _, user, pw = base64.b64decode(parts[2]).split(b"\0")
                ok = (user.decode(), pw.decode()) == self.auth
                self.sendLine(b"235 2.7.0 Authentication successful" if ok else b"535 5.7.8 Authentication failed")
            else:
                self.sendLine(b"504 5.5.4 Unrecognized authentication type")
        elif verb == b"MAIL":
            self._sender = line[10:]
            self._rcpts = []
            self.sendLine(self.mail_reply)
        elif verb == b"RCPT":
            addr = line[8:].split(b">")[0].lstrip(b"<").decode()
            reply = self.rcpt_replies.get(addr, b"250 2.1.5 Ok")
            if reply.startswith(b"2"):
                self._rcpts.append(addr.encode())
            self.sendLine(reply)
        elif verb == b"DATA":
            if not self._rcpts:
                self.sendLine(b"554 5.5.1 Error: no valid recipients")
            elif self.data_reply.startswith(b"354"):
                self._data = []
                self.sendLine(self.data_reply)
            else:
                self.sendLine(self.data_reply)
        elif verb == b"RSET":
            self._rcpts = []
            self.sendLine(b"250 2.0.0 Ok")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 5.5.2 Error: command not recognized")


def connect_pair(server: Any, client: Any, clock: Any) -> iosim.IOPump:
    """Connect two protocols in memory; the pump moves bytes when told to."""
    return iosim.connect(
        server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=False, clock=clock
    )


def drive(pumps: list, clock: Any, d: Deferred, rounds: int = 2000) -> None:
    """Pump every connection until ``d`` has fired (or nothing moves)."""
    for _ in range(rounds):
        if d.called:
            return
        moved = False
        for p in list(pumps):
            moved |= bool(p.pump())
        clock.advance(0)
        if not moved and not d.called:
            # let the last callbacks run (e.g. QUIT replies, disconnects)
            if not any(p.pump() for p in list(pumps)):
                return


@implementer(IStreamClientEndpoint)
class _PumpEndpoint:
    def __init__(self, net: FakeNet, key: tuple[str, int]) -> None:
        self.net = net
        self.key = key

    def connect(self, factory: Any) -> Deferred:
        self.net.attempts.append(self.key)
        make = self.net.servers.get(self.key)
        if make is None:
            return fail(_Refused())
        if make == "timeout":
            return fail(_TimedOut())
        server = make()
        client = factory.buildProtocol(None)
        self.net.pumps.append(connect_pair(server, client, self.net.clock))
        self.net.connected.append((self.key, server))
        return succeed(client)


class FakeNet:
    """``endpoint_factory(ip, port)`` over iosim: ``servers[(ip, port)] = make_server``."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.servers: dict[tuple[str, int], Any] = {}
        self.pumps: list = []
        self.attempts: list[tuple[str, int]] = []
        self.connected: list = []

    def __call__(self, ip: str, port: int) -> _PumpEndpoint:
        return _PumpEndpoint(self, (ip, port))

    def drive(self, d: Deferred) -> None:
        drive(self.pumps, self.clock, d)


from mailstack.errors import MailError as _MailError  # noqa: E402 (grouped with the fakes that use it)
from mailstack.interfaces import IMXResolver  # noqa: E402 (grouped with the fakes that use it)
from mailstack.mx import Host  # noqa: E402 (grouped with the fakes that use it)


@implementer(IMXResolver)
class FakeMXResolver:
    """``hosts[domain]`` = list of Host or a MailError; ``names[name]`` = addresses."""

    def __init__(self, hosts: dict | None = None, names: dict | None = None) -> None:
        self.hosts = hosts or {}
        self.names = names or {}

    def hosts_for(self, domain: str) -> Deferred:
        found = self.hosts.get(domain)
        if isinstance(found, _MailError):
            return fail(found)
        if found is None:
            from mailstack.delivery.replies import NO_DOMAIN
            from mailstack.errors import PermanentFailure

            return fail(PermanentFailure(NO_DOMAIN))
        return succeed(list(found))

    def addresses(self, name: str) -> Deferred:
        return succeed(list(self.names.get(name, ())))


def two_mx(domain: str = "remote.test") -> list:
    return [Host(f"mx1.{domain}", ("192.0.2.1",), 10), Host(f"mx2.{domain}", ("192.0.2.2",), 20)]
