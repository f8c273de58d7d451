# -*- test-case-name: tests.test_session -*-
"""The command-stream engine under the SMTP and POP3 servers.

Why not ``twisted.protocols.basic.LineOnlyReceiver`` (nor ``twisted.mail``
built on it): that base keeps splitting already-received plaintext into lines
after STARTTLS/STLS (the CVE-2011-0411 class of command injection), leaves line
mode only through ``setRawMode`` hooks that cannot discard the rest of an
overlong line, and keeps delivering lines while a Deferred of an earlier
command is pending, so pipelined replies come out of order (RFC 2920 section 3,
RFC 2449 section 6.6).  Fixing that is replacing its receive loop, so this is a
``Protocol`` with its own buffer; see ``docs/design.rst`` for the rationale.

``CommandSession`` does, for both protocols:

* Line framing: lines end with ``delimiter``; an unterminated line longer than
  ``max_line_length()`` is answered once (``line_too_long``) and skipped up to
  its end, so the session stays in step.  A "raw" consumer (SMTP DATA) can
  take the bytes instead of the line splitter.
* Strict order: while a command waits on a Deferred (``_wait``) or a delay
  (``_delay``) nothing after it is looked at; a synchronous result
  (``_then``) costs no Deferred.
* Output: replies are queued and the ones produced by one read go out in one
  write (at most ``FLUSH_AT`` at a time), straight to the socket when nothing
  is pending (``mailstack.directsend``).
* Inline reads (``inline_reads``, POP3): after a read's replies went out, the
  next command is taken from the socket at once if it is already there, up to
  ``inline_reads`` times before the reactor gets its turn back.  A client that
  waits for each reply has usually sent it by then (on one machine it even
  runs before we get the CPU back); one that has not costs one failed
  ``recv``, and then none for the next ``INLINE_BACKOFF`` reads.
* Back-pressure: the session is the transport's push producer.  With a full
  write buffer either reading stops (``stop_reading_when_write_full``, SMTP) or
  command processing stops (POP3: the TLS handshake needs reads while writes
  wait, so it keeps reading); in both, reading stops once ``pause_input_at``
  bytes of input wait behind a blocked command.  While a TLS handshake is in
  progress, pauses are ignored: Twisted's TLS layer pauses its producer until
  the handshake is done, and stopping our reads then would starve it.
* One idle timer on the injected clock (``idle_timeout``/``timed_out``), and
  one deadline (``_set_deadline``): a total limit that client activity does
  not push back (the POP3 pre-login time, the length of an SMTP DATA).  Input
  only notes the time; the timer, when it comes due early, waits out the rest
  (a DelayedCall reset per command was a measurable share of a POP3 download).
* Connection caps (``interfaces.IConnectionSlots``) and graceful drain
  (``SessionGroup``): a draining session closes once ``idle()`` between
  commands; the group's Deferred fires when the last one is gone.
* Closing: ``_close`` flushes, stops producing (a paused producer would keep a
  closing TCP transport open), closes, and aborts after ``CLOSE_GRACE`` (a TLS
  close waits for a close_notify a stuck client never sends).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.directsend import receive, send
from mailstack.interfaces import IConnectionSlots, IMetrics
from mailstack.metrics import NoMetrics

FLUSH_AT = 64 * 1024  # replies queued beyond this are written before the next command
READ_SIZE = 64 * 1024  # of an inline read (Twisted's tcp reads take as much)
INLINE_BACKOFF = 16  # reactor reads without inline reads after one found nothing
CLOSE_GRACE = 10.0  # seconds a closing connection may take before it is aborted


class SessionGroup:
    """The live sessions of one listener factory, and their graceful drain."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.sessions: set[CommandSession] = set()
        self.draining = False
        self._waiters: list[Deferred] = []

    def add(self, session: CommandSession) -> None:
        self.sessions.add(session)

    def discard(self, session: CommandSession) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        if not self.sessions:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def drain(self, timeout: float) -> Deferred[None]:
        """Stop taking sessions; close each once it is idle; fire when all are gone.

        Sessions still there after ``timeout`` seconds are dropped
        (``force_close``) and the Deferred fires then.
        """
        self.draining = True
        d: Deferred[None] = Deferred()
        if not self.sessions:
            d.callback(None)
            return d
        self._waiters.append(d)
        for session in list(self.sessions):
            session.shutdown_when_idle()
        if d.called:
            return d

        def expire() -> None:
            for session in list(self.sessions):
                session.force_close()
            # abortConnection reports connectionLost later; don't wait for it.
            if not d.called:
                self._waiters.remove(d)
                d.callback(None)

        call = self.clock.callLater(timeout, expire)

        def cancel_timer(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        return d.addBoth(cancel_timer)


@implementer(IPushProducer)
class CommandSession(Protocol):
    """Base of ``SMTPServer`` and ``POP3Server``; see the module docstring.

    Subclasses set the class attributes and implement the hooks below.
    """

    log = Logger()
    # ITCPTransport (or Twisted's TLS wrapper of one) that is also an IConsumer
    # and, on STARTTLS/STLS listeners, an ITLSTransport; set by makeConnection.
    transport: Any

    delimiter = b"\r\n"
    pause_input_at = 256 * 1024
    stop_reading_when_write_full = True
    # Failures that may reach a session whose client already left without being worth a log entry.
    quiet_after_close: tuple[type[BaseException], ...] = ()
    # Replies: to a connection beyond a cap (by ``connlimit.TOTAL``/``PER_IP``),
    # to a session closed by a drain (and to connections during it), and what a
    # session dropped at the end of the shutdown grace is told (None: nothing).
    limit_replies: ClassVar[dict[str, bytes]] = {}
    too_many_errors_reply = b""
    shutdown_reply = b""
    forced_close_reply: bytes | None = None

    # The ``protocol`` label of the session metrics: "smtp" or "pop3".
    protocol = ""
    # Commands read straight from the socket per reactor read (module docstring); 0: none.
    inline_reads = 0

    def __init__(
        self, clock: IReactorTime, group: SessionGroup, limiter: IConnectionSlots, metrics: IMetrics | None = None
    ) -> None:
        self.clock = clock
        self.metrics: IMetrics = metrics if metrics is not None else NoMetrics()
        self.peer = ""
        self._group = group
        self._limiter = limiter
        self._admitted = False  # holds a limiter slot and is in the group
        self._buf = b""  # unprocessed input starts at self._pos
        self._pos = 0
        self._raw: Callable[[bytes], None] | None = None  # takes input instead of the line splitter
        self._discarding = False  # dropping the rest of an overlong line
        self._out: list[bytes] = []
        self._out_size = 0
        self._blocked = False  # a command is waiting on a Deferred or a delay
        self._processing = False
        self._write_full = False  # the transport's write buffer is full (we are its producer)
        self._reading_paused = False
        self._handshaking = False  # TLS handshake in progress: ignore write-side pauses
        self._registered = False  # we are the transport's registered producer
        self._closed = False  # no command runs any more
        self._lost = False  # connectionLost happened
        self._draining = False
        self._timer: IDelayedCall | None = None  # pending while set
        self._timer_due = 0.0  # when _timer fires
        self._idle_since = 0.0  # the client's idle period began (_arm_timer)
        self._delayed: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self.errors = 0  # client errors so far (_count_error)
        self._inline_wait = 0  # reactor reads left before inline reads are tried again

    # -- hooks ------------------------------------------------------------------

    def refused(self, reply: bytes) -> None:
        """A connection was refused with ``reply`` (caps, shutdown): log it if wanted."""

    def max_line_length(self) -> int:
        """Longest line (with its delimiter) passed on; 0: no limit.  Longer
        ones go to ``line_too_long`` instead and are skipped to their end."""
        return 0

    def line_received(self, line: bytes) -> None:
        raise NotImplementedError

    def max_errors(self) -> int:
        """Client errors after which the session is closed; 0: no limit."""
        return 0

    def line_too_long(self) -> None:
        """An overlong line is being skipped: answer it."""
        raise NotImplementedError

    def idle_timeout(self) -> float:
        """Seconds of client silence allowed now; 0: no timer."""
        raise NotImplementedError

    def timed_out(self) -> None:
        """The idle timer expired (also while a command is blocked: the hook decides)."""
        raise NotImplementedError

    def idle(self) -> bool:
        """Whether a draining session may be closed now (between transactions)."""
        return True

    def handler_failed(self) -> None:
        """A ``_wait`` handler raised (in an ``except`` block): log and answer."""
        raise NotImplementedError

    def closing(self) -> None:
        """We end the session: release what it holds before the transport closes."""

    def ended(self, was_closed: bool) -> None:
        """The connection is gone; ``was_closed``: we had ended it ourselves."""

    def after_flush(self) -> None:
        """Work worth doing after a read's replies went out (the client is busy now)."""

    # -- connection -----------------------------------------------------------

    @property
    def tls(self) -> bool:
        return ISSLTransport.providedBy(self.transport)

    def _admit(self, start: Callable[[], None]) -> None:
        """``connectionMade`` calls this: take a connection slot, become the
        transport's producer and ``start()`` the session, or refuse the connection.

        The slot's answer is a Deferred (the master process keeps the caps when
        there are several session processes); until it comes the transport is
        not read.  A client gone by then gives its slot back at once.
        """
        self.peer = getattr(self.transport.getPeer(), "host", "") or ""  # UNIX sockets have none
        if self._group.draining:
            self._refuse(self.shutdown_reply)
            return
        answer = self._limiter.acquire(self.peer)
        paused = not answer.called
        if paused:
            self.transport.pauseProducing()
        answer.addCallbacks(self._slot_answered, self._slot_failed, callbackArgs=(start, paused))

    def _slot_answered(self, over: str | None, start: Callable[[], None], paused: bool) -> None:
        if self._lost:
            if over is None:
                self._limiter.release(self.peer)
            return
        if over is None and self._group.draining:  # a drain began while we waited
            self._limiter.release(self.peer)
            self._refuse(self.shutdown_reply)
            return
        if over is not None:  # RFC 5321 section 3.1, RFC 2449 section 8: say why, hang up
            self._refuse(self.limit_replies[over])
            return
        self._admitted = True
        self.metrics.session_opened(self.protocol)
        self._group.add(self)
        self._tcp_nodelay()
        self._handshaking = self.tls
        self._register_producer()
        if paused:
            self.transport.resumeProducing()
        start()

    def _slot_failed(self, failure: Failure) -> None:
        """The caps could not be asked (the master process is gone): close."""
        self.log.failure("no connection slot for {peer}", failure, peer=self.peer)
        if not self._lost:
            self._closed = True
            self.transport.loseConnection()

    def _refuse(self, refusal: bytes) -> None:
        self.refused(refusal)
        self._closed = True
        send(self.transport, refusal)
        self.transport.loseConnection()

    def _tcp_nodelay(self) -> None:
        t = self.transport
        for candidate in (t, getattr(t, "transport", None)):  # TLS wraps the TCP transport
            setter = getattr(candidate, "setTcpNoDelay", None)
            if setter is not None:
                try:
                    setter(True)
                except Exception:  # not a TCP socket after all
                    pass
                return

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        was_closed = self._closed
        self._closed = True
        self._lost = True
        for call in (self._timer, self._delayed, self._abort_call, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._delayed = self._abort_call = self._deadline = None
        if not self._admitted:
            return
        self._admitted = False
        self._limiter.release(self.peer)
        self.metrics.session_closed(self.protocol)
        self.ended(was_closed)
        self._group.discard(self)

    def _close(self) -> None:
        """End the session from our side: flush, no command runs any more, close."""
        if self._closed:
            return
        self._flush()
        self._closed = True
        self.closing()
        self._unregister_producer()
        self.transport.loseConnection()
        self._abort_call = self.clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if not self._lost:
            self.transport.abortConnection()

    def _tls_established(self) -> None:
        """Count the handshake by protocol version (``TLSv1.3``) for the metrics."""
        if not self.tls:
            return
        try:
            version = self.transport.getHandle().get_protocol_version_name()
        except Exception:  # noqa: BLE001 -- a transport without an OpenSSL handle (tests)
            return
        if isinstance(version, str) and version:
            self.metrics.tls_established(version)

    def _start_tls(self, context: Any) -> int:
        """STARTTLS/STLS after its reply was queued: flush it in the clear, then
        discard whatever the client pipelined behind the command (it arrived
        in plaintext: RFC 3207 section 4.2, RFC 2595 section 4); returns how
        many bytes were dropped."""
        self._flush()
        dropped = self._discard_input()
        self._handshaking = True
        self.transport.startTLS(context)
        return dropped

    # -- graceful shutdown ----------------------------------------------------

    def shutdown_when_idle(self) -> None:
        """Close now if idle, else once the command or transaction in progress is done."""
        self._draining = True
        if self._closed or self._blocked or self._processing:
            return
        self._process()
        self._flush()

    def force_close(self) -> None:
        """The shutdown grace expired: drop the connection."""
        if not self._closed:
            if self.forced_close_reply is not None:
                self._queue(self.forced_close_reply)
            self._close()
        self.transport.abortConnection()

    # -- producer (see the module docstring) ------------------------------------

    def _register_producer(self) -> None:
        self.transport.registerProducer(self, True)
        self._registered = True

    def _unregister_producer(self) -> None:
        if self._registered:
            self._registered = False
            self._write_full = False
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        if self._handshaking:
            return
        self._write_full = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._write_full = False
        self._update_reading()
        if not (self.stop_reading_when_write_full or self._blocked or self._processing or self._closed):
            self._process()  # commands that arrived while the client was not reading
            self._flush()

    def stopProducing(self) -> None:
        pass

    def _update_reading(self) -> None:
        unread = len(self._buf) - self._pos
        want = (self._write_full and self.stop_reading_when_write_full) or (
            (self._blocked or self._write_full) and unread > self.pause_input_at
        )
        if want != self._reading_paused and not self._closed:
            self._reading_paused = want
            (self.transport.pauseProducing if want else self.transport.resumeProducing)()

    # -- timer ------------------------------------------------------------------

    def _arm_timer(self) -> None:
        """The client's idle period starts now (``idle_timeout()`` seconds from now).

        Only when no timer is pending, or the timeout got shorter than the one
        pending (SMTP after DATA), is a DelayedCall made or moved."""
        if self._closed:
            return
        timeout = self.idle_timeout()
        if not timeout:
            return
        now = self._idle_since = self.clock.seconds()
        if self._timer is None:
            self._start_timer(timeout)
        elif now + timeout < self._timer_due:
            self._timer.reset(timeout)
            self._timer_due = now + timeout

    def _start_timer(self, seconds: float) -> None:
        self._timer = self.clock.callLater(seconds, self._timer_fired)
        self._timer_due = self._timer.getTime()

    def _set_deadline(self, seconds: float, expired: Callable[[], None]) -> None:
        """Run ``expired`` in ``seconds`` unless ``_clear_deadline`` comes first; 0: none.

        Unlike the idle timer, input does not push it back: a client that
        trickles a byte now and then cannot stretch a state forever."""
        self._clear_deadline()
        if not seconds or self._closed:
            return

        def fire() -> None:
            self._deadline = None
            if not self._closed:
                expired()
                self._flush()

        self._deadline = self.clock.callLater(seconds, fire)

    def _clear_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _timer_fired(self) -> None:
        self._timer = None
        if self._closed:
            return
        timeout = self.idle_timeout()
        left = self._idle_since + timeout - self.clock.seconds()
        if timeout and left > 0:  # input came meanwhile: wait out the rest of its period
            self._start_timer(left)
            return
        self.timed_out()

    # -- input ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._received(data)
        if self._inline_wait:
            self._inline_wait -= 1
            return
        for _ in range(self.inline_reads):
            if self._closed or self._blocked or self._write_full or self._reading_paused:
                return
            data = receive(self.transport, READ_SIZE)
            if not data:
                self._inline_wait = INLINE_BACKOFF
                return
            self._received(data)

    def _received(self, data: bytes) -> None:
        if self._closed:
            return
        if self._handshaking:  # application data: the TLS handshake is over
            self._handshaking = False
            self._tls_established()
        self._buf += data
        self._process()  # which ends with _update_reading
        self._flush()
        self._arm_timer()
        self.after_flush()

    def _resume(self) -> None:
        """A blocked command finished: carry on with buffered input."""
        if self._closed:
            return
        self._update_reading()
        self._process()
        self._flush()
        self._arm_timer()
        self.after_flush()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False
            # Lines are consumed by moving _pos; drop them once per read, not per line.
            if self._pos:
                self._buf = self._buf[self._pos :]
                self._pos = 0
        self._update_reading()

    def _process_buffer(self) -> None:
        while not (self._blocked or self._closed):
            if self._raw is not None:
                if self._pos >= len(self._buf):
                    return
                chunk = self._buf[self._pos :] if self._pos else self._buf
                self._buf, self._pos = b"", 0
                self._raw(chunk)  # hands back what follows its end through _unread
                continue
            if self._draining and self.idle():
                self._queue(self.shutdown_reply)
                self._close()
                return
            if self._write_full and not self.stop_reading_when_write_full:
                return  # resumeProducing carries on
            if self._pos >= len(self._buf):
                return  # all input taken (the usual end: one command per read)
            line = self._next_line()
            if line is None:
                return
            self.line_received(line)
            if self._out_size > FLUSH_AT:
                # Big answers (pipelined listings): hand them over now; a full
                # transport buffer then pauses us (see resumeProducing).
                self._flush()

    def _pending_input(self) -> int:
        """Bytes received behind the line being processed (pipelined after it)."""
        return len(self._buf) - self._pos

    def _discard_input(self) -> int:
        """Drop the input received behind the line being processed; how many bytes."""
        dropped = self._pending_input()
        self._buf, self._pos = b"", 0
        self._discarding = False
        return dropped

    def _unread(self, rest: bytes) -> None:
        """The raw consumer is done: ``rest`` (what followed its end) is input again."""
        self._buf, self._pos = rest, 0

    def _next_line(self) -> bytes | None:
        """The next complete line without its delimiter; None if there is none yet."""
        delimiter = self.delimiter
        limit = self.max_line_length()
        while True:
            start = self._pos
            end = self._buf.find(delimiter, start)
            if self._discarding:
                if end < 0:
                    # Keep a final CR: it may be the start of the CRLF we wait for.
                    keep = len(delimiter) > 1 and self._buf.endswith(delimiter[:1])
                    self._buf = delimiter[:1] if keep else b""
                    self._pos = 0
                    return None
                self._pos = end + len(delimiter)
                self._discarding = False
                continue
            if end < 0:
                if limit and len(self._buf) - start > limit:
                    self._discarding = True
                    self.line_too_long()
                    continue
                return None
            self._pos = end + len(delimiter)
            if limit and end - start + len(delimiter) > limit:
                self.line_too_long()
                continue
            return self._buf[start:end]

    # -- output -----------------------------------------------------------------

    def _count_error(self) -> None:
        """One more client error; at ``max_errors()`` say ``too_many_errors_reply`` and close."""
        self.errors += 1
        limit = self.max_errors()
        if limit and self.errors >= limit:
            self._queue(self.too_many_errors_reply)
            self._close()

    def _queue(self, data: bytes) -> None:
        if not self._closed:
            self._out.append(data)
            self._out_size += len(data)

    def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out = []
            self._out_size = 0
            if not self._lost:
                send(self.transport, data)

    # -- waiting, in order --------------------------------------------------------

    def _wait(self, d: Deferred, handler: Callable[[Any], None]) -> None:
        """Run ``handler(result or Failure)`` when ``d`` fires; no other command meanwhile."""
        self._blocked = True
        sync = [True]

        def fire(result: Any) -> None:
            self._blocked = False
            if self._closed:
                if isinstance(result, Failure) and not result.check(*self.quiet_after_close):
                    self.log.failure("failure after the client left", result, peer=self.peer)
                return
            try:
                handler(result)
            except Exception:
                self.handler_failed()
            if not sync[0]:
                self._resume()
            return

        d.addBoth(fire)
        sync[0] = False

    def _then(self, handler: Callable[[Any], None], f: Callable[..., Any], *args: Any) -> None:
        """``handler(result or Failure)`` of ``f(*args)``: at once unless ``f`` returns a Deferred.

        The SMTP router answers synchronously in production; a Deferred per
        RCPT only to be fired at once was a measurable share of a session's CPU.
        """
        try:
            result = f(*args)
        except Exception:
            result = Failure()
        if isinstance(result, Deferred):
            self._wait(result, handler)
        else:
            handler(result)

    def _delay(self, seconds: float, then: Callable[[], None]) -> None:
        """Block for ``seconds`` on the injected clock, then run ``then``."""
        self._blocked = True

        def later() -> None:
            self._delayed = None
            self._blocked = False
            then()
            self._resume()

        self._delayed = self.clock.callLater(max(0.0, seconds), later)
