# -*- test-case-name: tests.smtp.test_client -*-
"""Outbound SMTP client protocol: one connection, one or more transactions.

Written on ``Protocol`` rather than twisted's ``SMTPClient``, which gives no
per-recipient results, treats 4xx like 5xx, has no PIPELINING and no
timeouts by default.

``SMTPClientProtocol`` offers three coroutines-as-Deferreds:

* ``handshake()``: wait for the 220 greeting (RFC 5321 4.3.1), ``EHLO`` with our
  hostname (``HELO`` when EHLO is refused, 4.1.4), ``STARTTLS`` whenever it is
  offered (RFC 3207; opportunistic per RFC 7435 unless ``require_tls``) and a
  second EHLO after it (RFC 3207 4.2), then ``AUTH PLAIN`` (RFC 4954, 4616)
  when credentials are given.  Errbacks ``HostFailure`` carrying the reply.
* ``send(sender, recipients, source, size)``: ``MAIL FROM`` (with ``SIZE=``,
  RFC 1870, and ``BODY=8BITMIME``, RFC 6152, when offered), ``RCPT TO`` for
  each recipient and ``DATA``, pipelined when the server offers PIPELINING
  (RFC 2920).  The body is streamed from the ``source`` (``IMessageSource``)
  with a push producer (``smtp/data.py``): every bare CR or LF turned into
  CRLF (never relay a bare CR or LF, the SMTP smuggling defence), NULs
  removed, and lines starting with "." dot-stuffed (RFC 5321 4.5.2).  Fires with
  ``{recipient: Reply}``; errbacks ``HostFailure`` when the transaction as a
  whole failed before any recipient had an answer (``MAIL`` refused, lost
  connection, timeout), with ``.stage`` telling where.  Calls may overlap:
  with PIPELINING the next transaction's commands follow the previous one's
  data (RFC 2920 3.1), else it waits for the previous one to finish.
* ``quit()``, deferred until the transactions in progress have finished.

Every reply wait has a timeout (RFC 5321 4.5.3.2, ``relay.command_timeout``;
twice that for the reply to the final ".", 4.5.3.2.6 says 10 minutes) on the
injected clock; a timeout aborts the connection.  TCP_NODELAY is set since the
protocol is command/response.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime, ITCPTransport, ITLSTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailstack import logsafe
from mailstack.delivery import replies as OR
from mailstack.errors import Reply
from mailstack.interfaces import IMessageSource
from mailstack.smtp.data import BodyProducer, BodyStopped, DataEncoder
from mailstack.smtp.extensions import Request
from mailstack.smtp.wire import make_reply, one_line_reply

MAX_LINE = 4096  # RFC 5321 4.5.3.1.5: reply lines are at most 512; be lenient
MAX_REPLY_LINES = 200


class HostFailure(Exception):
    """The session or transaction failed as a whole; ``reply`` says why.

    ``stage`` is one of ``connect``, ``greeting``, ``ehlo``, ``starttls``,
    ``tls``, ``auth``, ``mail``, ``rcpt``, ``data``, ``dot``.
    """

    def __init__(self, stage: str, reply: Reply) -> None:
        super().__init__(f"{stage}: {reply}")
        self.stage = stage
        self.reply = reply


class _Lost(Exception):
    """The connection went away (or was aborted after a timeout)."""

    def __init__(self, reply: Reply, reason: Any = None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.reason = reason


class _Turn:
    """A transaction's hold on the connection's write side.

    Released once: when its data has been written and the server pipelines
    (the next transaction may then write behind it, RFC 2920 3.1), or else
    when the transaction ends.
    """

    def __init__(self, give: Callable[[], None]) -> None:
        self._give = give
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._give()


class _Group:
    """The replies to a pipelined group of commands, one Deferred for all of them.

    Stands in the reply queue once per command (``callback``/``errback`` as a
    Deferred would) and fires ``done`` with ``(replies, lost)`` once every
    command has its answer: per command the Reply, or None from the point the
    connection was lost (``lost`` then says why).  One wake-up of the waiting
    transaction per group instead of one per command.
    """

    def __init__(self, count: int) -> None:
        self.done: Deferred = Deferred()
        self._count = count
        self._replies: list[Reply | None] = []
        self._lost: _Lost | None = None

    def callback(self, reply: Reply) -> None:
        self._add(reply)

    def errback(self, failure: Failure) -> None:
        if self._lost is None:
            self._lost = failure.value if isinstance(failure.value, _Lost) else _Lost(OR.CONNECTION_LOST)
        self._add(None)

    def _add(self, reply: Reply | None) -> None:
        self._replies.append(reply)
        if len(self._replies) == self._count:
            self.done.callback((self._replies, self._lost))


class SMTPClientProtocol(Protocol):
    """One outbound SMTP connection (see the module docstring)."""

    log = Logger()
    transport: ITCPTransport  # set by makeConnection, before any method here runs

    def __init__(
        self,
        hostname: str,
        clock: IReactorTime,
        timeout: float = 300.0,
        *,
        tls: Callable[[], IOpenSSLClientConnectionCreator] | None = None,
        require_tls: bool = False,
        credentials: tuple[str, str] | None = None,
        peer_name: str = "",
    ) -> None:
        self.hostname = hostname
        self.clock = clock
        self.timeout = timeout
        self.tls = tls  # () -> a client TLS connection creator, or None: no STARTTLS
        self.require_tls = require_tls
        self.credentials = credentials
        self.peer_name = peer_name
        self.extensions: dict[str, str] = {}
        self.transactions = 0  # MAIL FROM sent on this connection
        self.data_time = 0.0  # seconds from the last message's data to its final reply
        self.pending = 0  # send() calls not yet finished
        self._writing = False  # a transaction owns the write side (see _take_turn)
        self._turns: deque[Deferred] = deque()  # transactions waiting for it
        self._closing = False  # quit() was called
        self.esmtp = False
        self.secure = False
        self.greeting: Reply | None = None
        self._buffer = b""
        self._lines: list[str] = []
        self._waiting: deque[tuple[Deferred | _Group, float]] = deque()
        self._timer: Any = None
        self._lost: _Lost | None = None

    # -- transport events ---------------------------------------------------

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass  # not a TCP transport (tests, TLS wrappers)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n", 1)
            if self._line(raw.rstrip(b"\r")):
                return
        if len(self._buffer) > MAX_LINE:
            self._violation("overlong reply line")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._lost is None:
            self._lost = _Lost(OR.CONNECTION_LOST, reason)
        waiting, self._waiting = self._waiting, deque()
        for d, _ in waiting:
            d.errback(Failure(self._lost))

    # -- replies ------------------------------------------------------------

    def _line(self, raw: bytes) -> bool:
        """Handle one reply line; True if the connection is being dropped."""
        text = raw.decode("utf-8", "replace")
        if len(text) < 3 or not text[:3].isdigit() or (len(text) > 3 and text[3] not in " -"):
            self._violation("malformed reply line")
            return True
        if self._lines and text[:3] != self._lines[0][:3]:
            self._violation("reply code changed inside a multi-line reply")
            return True
        self._lines.append(text)
        if len(self._lines) > MAX_REPLY_LINES:
            self._violation("reply too long")
            return True
        if len(text) > 3 and text[3] == "-":
            return False
        lines, self._lines = self._lines, []
        code = int(lines[0][:3])
        if not 200 <= code <= 599:
            self._violation("reply code out of range")
            return True
        reply = one_line_reply(lines[0]) if len(lines) == 1 else make_reply(code, [ln[4:] for ln in lines])
        if not self._waiting:
            if code == 421:  # RFC 5321 3.8: the server closes an idle session
                self._lost = _Lost(OR.CONNECTION_LOST)
                self.transport.loseConnection()
            else:
                self._violation("unexpected reply")
            return True
        d, _ = self._waiting.popleft()
        self._rearm()
        d.callback(reply)
        return self.transport is None or self._lost is not None

    def _violation(self, what: str) -> None:
        self.log.info("SMTP protocol violation by {mx}: {what}", mx=logsafe.escape(self.peer_name), what=what)
        self._lost = _Lost(OR.PROTOCOL_VIOLATION)
        self.transport.abortConnection()

    def _expect(self, timeout: float | None = None) -> Deferred:
        d: Deferred = Deferred()
        self._wait_for(d, 1, timeout)
        return d

    def _wait_for(self, waiter: Deferred | _Group, count: int, timeout: float | None = None) -> None:
        """Queue ``waiter`` for the next ``count`` replies (errbacks at once if the
        connection is lost); the timer starts when it is the oldest outstanding."""
        if self._lost is not None:
            failure = Failure(self._lost)
            for _ in range(count):
                waiter.errback(failure)
            return
        first = not self._waiting
        self._waiting.extend([(waiter, timeout if timeout is not None else self.timeout)] * count)
        if first:
            self._rearm()

    def _rearm(self) -> None:
        """One timer for the oldest outstanding reply (RFC 5321 4.5.3.2).

        The same DelayedCall is moved (``reset``) while replies keep coming,
        rather than cancelled and created anew for every reply; with no reply
        outstanding it is left to run out (``_timed_out`` then does nothing),
        so a connection reused for message after message keeps one timer."""
        if self._waiting:
            timer = self._timer
            if timer is not None and timer.active():
                timer.reset(self._waiting[0][1])
            else:
                self._timer = self.clock.callLater(self._waiting[0][1], self._timed_out)

    def _touch(self) -> None:
        """Progress while sending DATA: restart the timer (4.5.3.2.5, data block)."""
        if self._waiting:
            self._rearm()

    def _timed_out(self) -> None:
        self._timer = None
        if not self._waiting:
            return  # armed for a reply that has come (see _rearm)
        self.log.info("SMTP timeout waiting for {mx}", mx=logsafe.escape(self.peer_name))
        self._lost = _Lost(OR.TIMEOUT)
        self.transport.abortConnection()

    def _send_line(self, line: str) -> None:
        self.transport.write(line.encode("utf-8") + b"\r\n")

    def _pipeline(self, lines: list[str]) -> Deferred:
        """Send a group of commands in one write (RFC 2920 3.1); Deferred firing
        once with ``(replies, lost)`` (see ``_Group``)."""
        group = _Group(len(lines))
        self._wait_for(group, len(lines))
        if self._lost is None:
            self.transport.write("".join(line + "\r\n" for line in lines).encode("utf-8"))
        return group.done

    def command(self, line: str, timeout: float | None = None) -> Deferred:
        """Send one command line; Deferred firing with its Reply."""
        d = self._expect(timeout)
        if self._lost is None:
            self._send_line(line)
        return d

    # -- session ------------------------------------------------------------

    def handshake(self) -> Deferred:
        return Deferred.fromCoroutine(self._handshake())

    async def _await(self, d: Deferred, stage: str) -> Reply:
        try:
            return await d
        except _Lost as e:
            if stage == "tls" and e.reply is OR.CONNECTION_LOST:
                raise HostFailure(stage, OR.TLS_FAILED) from None
            raise HostFailure(stage, e.reply) from None

    async def _handshake(self) -> dict[str, str]:
        greeting = await self._await(self._expect(), "greeting")
        self.greeting = greeting
        if greeting.code != 220:
            # RFC 5321 3.1: a 554 greeting; say QUIT and leave.
            self._quietly_quit()
            raise HostFailure("greeting", greeting)
        await self._ehlo()
        if "STARTTLS" in self.extensions and self.tls is not None:
            reply = await self._await(self.command("STARTTLS"), "starttls")
            if reply.code == 220:
                self._start_tls()
                await self._ehlo(stage="tls")
            elif self.require_tls:
                self._quietly_quit()
                raise HostFailure("starttls", reply)
        elif self.require_tls:
            self._quietly_quit()
            raise HostFailure("starttls", OR.TLS_UNAVAILABLE)
        if self.credentials is not None:
            await self._auth()
        return dict(self.extensions)

    async def _ehlo(self, stage: str = "ehlo") -> None:
        reply = await self._await(self.command(f"EHLO {self.hostname}"), stage)
        if reply.code == 250:
            self.esmtp = True
            self.extensions = {}
            for line in reply.text.split("\n")[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    self.extensions[keyword.upper()] = params.strip()
            return
        if stage == "ehlo" and reply.code in (500, 502, 504, 550):
            # RFC 5321 4.1.4 / 3.2: an old server; fall back to HELO.
            reply = await self._await(self.command(f"HELO {self.hostname}"), stage)
            if reply.code == 250:
                self.esmtp = False
                self.extensions = {}
                return
        self._quietly_quit()
        raise HostFailure(stage, reply)

    def _start_tls(self) -> None:
        assert self.tls is not None
        # RFC 3207 4.2: nothing the server sent in plaintext after its 220 may
        # count once TLS is up (the client side of the STARTTLS injection bug,
        # CVE-2011-0411).
        self._buffer = b""
        self._lines = []
        cast(ITLSTransport, self.transport).startTLS(self.tls())
        self.secure = True

    async def _auth(self) -> None:
        assert self.credentials is not None
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user, password = self.credentials
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8")).decode("ascii")
            reply = await self._await(self.command(f"AUTH PLAIN {token}"), "auth")
            if reply.code == 334:  # server wanted the response separately
                reply = await self._await(self.command(token), "auth")
        elif "LOGIN" in mechanisms:
            reply = await self._await(self.command("AUTH LOGIN"), "auth")
            if reply.code == 334:
                reply = await self._await(self.command(base64.b64encode(user.encode()).decode()), "auth")
            if reply.code == 334:
                reply = await self._await(self.command(base64.b64encode(password.encode()).decode()), "auth")
        else:
            self._quietly_quit()
            raise HostFailure("auth", OR.AUTH_UNAVAILABLE)
        if reply.code != 235:
            self._quietly_quit()
            raise HostFailure("auth", reply)

    @property
    def pipelining(self) -> bool:
        """The server offered PIPELINING (RFC 2920): ``send`` may be called again
        before the transaction in progress has finished."""
        return "PIPELINING" in self.extensions

    def send(
        self, sender: str, recipients: Sequence[str], source: IMessageSource, size: int = 0,
        request: Request | None = None,
    ) -> Deferred:
        """One transaction; Deferred firing with ``{recipient: Reply}``; ``request``:
        the message's SMTPUTF8 and DSN needs (``smtp.extensions``).

        Transactions may overlap when the server offers PIPELINING: the next
        one's MAIL, RCPT and DATA go out right behind the previous one's data
        (RFC 2920 3.1: "the actual transfer of message content is explicitly
        allowed to be the first 'command' in a group"), so a stream of
        messages costs one round trip each instead of two.  Without
        PIPELINING a transaction waits until the previous one has finished.
        """
        self.pending += 1
        d = Deferred.fromCoroutine(self._send(sender, list(recipients), source, size, request or Request()))
        d.addBoth(self._sent)
        return d

    def _sent(self, result: Any) -> Any:
        self.pending -= 1
        if not self.pending and self._closing:
            Deferred.fromCoroutine(self._quit())
        return result

    async def _take_turn(self) -> None:
        """Wait until no other transaction is writing, then own the write side."""
        if self._writing:
            d: Deferred = Deferred()
            self._turns.append(d)
            await d  # ownership is handed over by _give_turn
        else:
            self._writing = True

    def _give_turn(self) -> None:
        if self._turns:
            self._turns.popleft().callback(None)
        else:
            self._writing = False

    async def _send(
        self, sender: str, recipients: list[str], source: IMessageSource, size: int, request: Request
    ) -> dict[str, Reply]:
        await self._take_turn()
        turn = _Turn(self._give_turn)
        try:
            return await self._transaction(sender, recipients, source, size, turn, request)
        finally:
            turn.release()

    async def _transaction(
        self, sender: str, recipients: list[str], source: IMessageSource, size: int, turn: _Turn,
        request: Request,
    ) -> dict[str, Reply]:
        if not self.alive:
            # Closed by the transaction before this one (or the server): a reused
            # connection that is gone, which the caller treats as stale.
            raise HostFailure("mail", self._lost.reply if self._lost is not None else OR.CONNECTION_LOST)
        self.transactions += 1
        params = []
        if "SIZE" in self.extensions:
            limit = self.extensions["SIZE"]
            if limit.isdigit() and int(limit) and size > int(limit):
                # RFC 1870 6: do not send what the server said it will not take.
                reply = OR.too_big_for_remote(limit)
                return {r: reply for r in recipients}
            if size:
                params.append(f"SIZE={size}")
        if "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")
        if request.smtputf8 or not (sender.isascii() and all(r.isascii() for r in recipients)):
            # RFC 6531 3.4: UTF-8 addresses and headers only to a server that offers SMTPUTF8.
            if "SMTPUTF8" not in self.extensions:
                reply = OR.NO_SMTPUTF8
                return {r: reply for r in recipients}
            params.append("SMTPUTF8")
        params += request.mail_params(self.extensions)
        mail = f"MAIL FROM:<{sender}>" + "".join(" " + p for p in params)
        rcpts = [f"RCPT TO:<{r}>{request.rcpt_params(r, self.extensions)}" for r in recipients]
        results: dict[str, Reply] = {}
        if "PIPELINING" in self.extensions:
            # RFC 2920 3.1: MAIL, RCPTs and DATA in one group (one write); replies in order.
            replies, lost = await self._pipeline([mail, *rcpts, "DATA"])
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
            if mail_reply is None:
                raise HostFailure("mail", lost.reply if lost else OR.CONNECTION_LOST)
            if mail_reply.code != 250:
                if data_reply is not None and data_reply.code == 354:
                    self._abort_data()
                raise HostFailure("mail", mail_reply)
            for r, rcpt_reply in zip(recipients, rcpt_replies, strict=False):
                if rcpt_reply is None:
                    raise HostFailure("rcpt", lost.reply if lost else OR.CONNECTION_LOST)
                results[r] = rcpt_reply
            accepted = [r for r in recipients if results[r].code // 100 == 2]
            if data_reply is None:
                raise HostFailure("data", lost.reply if lost else OR.CONNECTION_LOST) if accepted else HostFailure(
                    "rcpt", lost.reply if lost else OR.CONNECTION_LOST
                )
            if not accepted:
                if data_reply.code == 354:
                    await self._finish_empty()
                else:
                    await self._rset()
                return results
        else:
            answer = await self._await(self.command(mail), "mail")
            if answer.code != 250:
                raise HostFailure("mail", answer)
            for r, c in zip(recipients, rcpts, strict=False):
                results[r] = await self._await(self.command(c), "rcpt")
            accepted = [r for r in recipients if results[r].code // 100 == 2]
            if not accepted:
                await self._rset()
                return results
            data_reply = await self._await(self.command("DATA"), "data")
        if data_reply.code != 354:
            for r in accepted:
                results[r] = data_reply
            await self._rset()
            return results
        started = self.clock.seconds()
        final = await self._await(self._send_body(source, turn), "dot")
        self.data_time = self.clock.seconds() - started
        for r in accepted:
            results[r] = final
        return results

    def _send_body(self, source: IMessageSource, turn: _Turn) -> Deferred:
        """Stream the body; Deferred firing with the reply to the final ".".

        Once the "." is written the next transaction may write, if the server
        pipelines (``send``).  A message held in memory (nearly all: the queue
        manager preloads those up to 64 KiB) goes out in one write, without the
        producer's reads and registration."""
        reply = self._expect(self.timeout * 2)  # RFC 5321 4.5.3.2.6: 10 minutes
        whole = source.whole
        if whole is not None:
            self._touch()
            encoder = DataEncoder()
            self.transport.write(encoder.feed(whole) + encoder.end())
            if self.pipelining:
                turn.release()
            return reply

        def written(result: Any) -> Any:
            if self.pipelining:
                turn.release()
            return result

        producer = BodyProducer(source, self.transport, self._touch)
        producer.done.addErrback(lambda f: None if f.check(BodyStopped) else self._body_failed(f))
        producer.done.addCallback(written)
        producer.start()
        return reply

    def _body_failed(self, failure: Failure) -> None:
        self.log.failure("reading the message to relay failed", failure)
        self._lost = _Lost(OR.READ_ERROR)
        self.transport.abortConnection()

    def _abort_data(self) -> None:
        # RFC 2920 3.1: DATA was accepted although the transaction failed; end it empty.
        self.transport.write(b".\r\n")
        self._expect().addErrback(lambda f: None)

    async def _finish_empty(self) -> None:
        self.transport.write(b".\r\n")
        try:
            await self._expect()
        except _Lost:
            pass

    async def _rset(self) -> None:
        try:
            reply = await self.command("RSET")
        except _Lost:
            return
        if reply.code != 250:
            self._quietly_quit()

    @property
    def alive(self) -> bool:
        """Connected, not timed out, not closing: usable for another transaction."""
        return (
            self._lost is None
            and not self._closing
            and self.transport is not None
            and not getattr(self.transport, "disconnecting", False)
        )

    def quit(self) -> Deferred:
        """Say QUIT (RFC 5321 4.1.1.10) and close; never fails.

        With transactions in progress the QUIT waits until they have finished
        (it must not end up inside a pipelined message's data)."""
        if self._closing:
            return succeed(None)
        self._closing = True
        if self.pending:
            return succeed(None)  # _sent says it after the last transaction
        return Deferred.fromCoroutine(self._quit())

    async def _quit(self) -> None:
        if self._lost is not None or self.transport is None:
            return
        d = self.command("QUIT")
        try:
            await d
        except _Lost:
            return
        if self._lost is None:
            self.transport.loseConnection()

    def _quietly_quit(self) -> None:
        if self._lost is None:
            self.command("QUIT").addErrback(lambda f: None)
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection at once (shutdown)."""
        if self._lost is None:
            self._lost = _Lost(OR.CONNECTION_LOST)
        if self.transport is not None:
            self.transport.abortConnection()
