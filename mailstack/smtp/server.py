# -*- test-case-name: tests.smtp.test_smtp_server -*-
"""The ESMTP server protocol (RFC 5321) behind the MX, submission and submissions listeners.

Why not ``twisted.mail.smtp.ESMTP``: it is built on ``LineOnlyReceiver``, and the
defects listed in ``anchors.md`` section 4.4 live in that base, not in methods a
subclass could override: ``LineOnlyReceiver.dataReceived`` keeps splitting the
already-received plaintext after ``STARTTLS`` (4.4.1, CVE-2011-0411 class); an
overlong line inside DATA makes it drop back to command mode and execute the
body (4.4.2); and it keeps reading commands while a validation Deferred is
pending, so pipelined replies come out of order (4.4.5, twisted#8126).  Fixing
those means replacing the receive loop, i.e. the whole class, so this module is
its own ``Protocol`` with its own buffer:

* Commands are processed strictly in order (RFC 2920 section 3).  While a
  command waits on a Deferred (AUTH check, the DATA commit) nothing after it is
  looked at; input is buffered and the transport paused if the buffer grows.
  The replies produced by one read go out in one write, straight to the
  socket when nothing is pending (``mailstack.directsend``).
* DATA is decoded by ``smtp.data.DataDecoder`` in chunks (only ``CRLF.CRLF``
  ends it; no content byte is ever read as a command; bare CR/LF is refused
  after the terminator; long lines are fine), streamed to ``IIntake`` and
  answered 250 only from the commit Deferred's callback.
* ``STARTTLS`` discards whatever the client sent behind it before the
  handshake (RFC 3207 section 4.2) and resets the session.
* Policy checks are not done here: the session calls ``runtime.pipeline``
  (``mailstack.pipeline``) at connect, after MAIL, per RCPT after routing,
  when DATA starts and at the end of data, and answers what it returns.

``make_factory(kind, runtime)`` returns the listener factory; see
``SMTPFactory.drain`` for graceful shutdown.
"""

from __future__ import annotations

import base64
import binascii
import re
import weakref
from collections import Counter
from typing import Any, Callable

from twisted.cred.error import LoginFailed
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailstack.address import Address, AddressError, parse_address, parse_path
from mailstack.auth import cred
from mailstack.directsend import send
from mailstack.envelope import Destination, Envelope
from mailstack.errors import MailError, Reply
from mailstack.pipeline import Connection, Transaction
from mailstack.smtp import replies as R
from mailstack.smtp.data import DataDecoder
from mailstack.smtp.policy import ListenerPolicy, auth_allowed, sender_owned
from mailstack.smtp.ratelimit import RateLimiter

_CRLF = b"\r\n"
# Input buffered while a command waits on a Deferred before the transport is paused.
_PAUSE_AT = 256 * 1024

# RFC 5321 4.1.2: Path, then space-separated Mail-parameters.
_PATH_ARGS = re.compile(r'\s*(<(?:"(?:[^"\\]|\\.)*"|[^<>"])*>)(.*)\Z', re.S)
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")
_ESMTP_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(=[\x21-\x3c\x3e-\x7e]+)?\Z")

# Session modes.
_COMMAND = "command"
_DATA = "data"
_AUTH = "auth"
_CLOSED = "closed"

_WIRE: dict[Reply, bytes] = {r: r.encode() for r in R.ALL.values()}  # the constants, pre-encoded

_SKIP = object()  # an overlong line was answered and dropped

_LOGIN_USER = base64.b64encode(b"Username:")
_LOGIN_PASS = base64.b64encode(b"Password:")


class _Shared:
    """State shared by every SMTP listener built from one runtime."""

    def __init__(self, runtime: Any) -> None:
        self.connections = 0
        self.per_ip: Counter[str] = Counter()
        self.rate = RateLimiter(runtime.reactor, runtime.config.limits.messages_per_hour)


_SHARED: "weakref.WeakKeyDictionary[Any, _Shared]" = weakref.WeakKeyDictionary()
_SHARED_STRONG: dict[int, tuple[Any, _Shared]] = {}


def _shared_for(runtime: Any) -> _Shared:
    try:
        shared = _SHARED.get(runtime)
        if shared is None:
            shared = _SHARED[runtime] = _Shared(runtime)
        return shared
    except TypeError:  # not weak-referenceable
        entry = _SHARED_STRONG.get(id(runtime))
        if entry is None or entry[0] is not runtime:
            entry = _SHARED_STRONG[id(runtime)] = (runtime, _Shared(runtime))
        return entry[1]


class _Refuse(Protocol):
    """Says 421 and hangs up (connection caps, shutdown); RFC 5321 3.1."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        send(self.transport, self.reply.encode())
        self.transport.loseConnection()


class SMTPServer(Protocol):
    """One ESMTP session.  Built by ``SMTPFactory``."""

    log = Logger()

    def __init__(self, factory: "SMTPFactory") -> None:
        self.factory = factory
        rt = factory.runtime
        self.runtime = rt
        self.config = rt.config
        self.clock = rt.reactor
        self.policy = factory.policy
        self.peer = ""
        self.mode = _COMMAND
        self._buf = b""  # unprocessed input starts at self._pos
        self._pos = 0
        self._out: list[bytes] = []
        self._discarding = False  # dropping the rest of an overlong command line
        self._blocked = False  # a command is waiting on a Deferred or a delay
        self._paused = False  # reading paused: a command is blocked and input piles up
        self._write_full = False  # reading paused: the transport's write buffer is full
        self._reading_paused = False
        self._handshaking = False  # TLS handshake in progress: ignore write-side pauses
        self._timer: Any = None
        self._delayed: Any = None
        self._draining = False
        self.errors = 0
        self.messages = 0
        self._refused = False  # the connect checks refused: only QUIT is accepted (RFC 5321 3.1)
        self._reset_session()

    # -- session state --------------------------------------------------------

    def _reset_session(self) -> None:
        """Forget HELO, AUTH and the transaction (connect and after STARTTLS)."""
        self.helo: str | None = None
        self.esmtp = False
        self.user = ""
        self._auth: tuple[str, bytes] | None = None  # multi-step AUTH in progress
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self.sender: Address | None = None
        self.in_transaction = False  # MAIL accepted
        self.recipients: list[Destination] = []
        self._rcpt_count = 0
        self._rcpt_tried = False
        self._decoder: DataDecoder | None = None
        self._incoming: Any = None
        self._txn: Transaction | None = None
        self._observer: Any = None

    @property
    def tls(self) -> bool:
        return ISSLTransport.providedBy(self.transport)

    # -- connection -----------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", "") or ""
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except Exception:  # not a TCP socket (tests, TLS wrappers over pipes)
                pass
        # Back-pressure on output: a client that pipelines commands and never reads
        # the replies would otherwise grow our write buffer without bound.  As a
        # streaming producer, the transport tells us when its buffer is full and
        # we stop reading until it drains (but see _handshaking).
        self._handshaking = self.tls
        register = getattr(self.transport, "registerProducer", None)
        if register is not None:
            register(self, True)
        self._conn = Connection(self.peer, self.policy.kind, self.config.hostname)
        self._arm_timer()
        self._then(self._greet, self.factory.pipeline.connect, self._connection())
        self._flush()

    def _greet(self, result: Any) -> None:
        """The banner, or the connect checks' refusal in its place (RFC 5321 section 3.1)."""
        if result is None:
            self._write_raw(self.factory.banner)
            return
        result = self._refusal(result)
        if result.temporary:
            self._reply(Reply(421, result.enhanced, result.text))
            self._close()
            return
        # 554 instead of 220; the client may only QUIT now (503 to anything else).
        self._refused = True
        self._reply(Reply(554, result.enhanced, result.text))

    def _refusal(self, result: Reply | Failure) -> Reply:
        """The checks' refusal; a Failure (a bug in the pipeline itself) is logged, 451."""
        if isinstance(result, Failure):
            self.log.failure("smtp: message checks failed", result, peer=self.peer)
            return R.LOCAL_ERROR
        return result

    def _connection(self) -> Connection:
        """The connection facts the checks read, brought up to date."""
        conn = self._conn
        conn.helo = self.helo or ""
        conn.user = self.user
        if self.tls and not conn.tls:  # known once the handshake is done; it never changes
            conn.tls = self._tls_description()
        return conn

    # IPushProducer, for the transport (see connectionMade).
    def pauseProducing(self) -> None:
        if self._handshaking:
            # Twisted's TLS layer buffers what we write until its handshake is
            # done and pauses its producer meanwhile; stopping our reads then
            # would starve the handshake itself (deadlock).  The client sends
            # nothing of ours before the handshake, so there is nothing to hold.
            return
        self._write_full = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._write_full = False
        self._update_reading()

    def stopProducing(self) -> None:
        pass

    def _update_reading(self) -> None:
        want = self._paused or self._write_full
        if want != self._reading_paused and self.mode != _CLOSED:
            self._reading_paused = want
            (self.transport.pauseProducing if want else self.transport.resumeProducing)()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.mode = _CLOSED
        for call in (self._timer, self._delayed):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._delayed = None
        if self._incoming is not None:
            # Connection lost mid-DATA or in its checks: nothing was acknowledged, discard it.
            self._abort_incoming()
        self.factory._unregister(self)
        if self.messages and not self.errors:
            # A clean session: each of its messages was logged on acceptance
            # (intake: queue id, peer, user, sender, recipients, size).  One
            # event less per connection on the hot path.
            return
        self.log.info(
            "smtp session ended peer={peer} user={user} messages={messages} errors={errors}",
            peer=self.peer,
            user=self.user,
            messages=self.messages,
            errors=self.errors,
            listener=self.policy.kind,
        )

    def _close(self) -> None:
        if self.mode == _CLOSED:
            return
        if self._incoming is not None:
            self._abort_incoming()
        self.mode = _CLOSED
        self._flush()
        self.transport.loseConnection()

    def _abort_incoming(self) -> None:
        incoming, self._incoming = self._incoming, None
        self._decoder = None
        if incoming is not None:
            try:
                incoming.abort()
            except Exception:
                self.log.failure("smtp: aborting an incoming message failed", peer=self.peer)

    # -- timers (RFC 5321 4.5.3.2) --------------------------------------------

    def _arm_timer(self) -> None:
        if self.mode == _CLOSED:
            return
        timeout = self.config.smtp.data_timeout if self.mode == _DATA else self.config.smtp.command_timeout
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.clock.callLater(timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self.mode == _CLOSED:
            return
        if self._blocked:  # our own work is slow, not the client
            self._arm_timer()
            return
        self.log.info("smtp timeout peer={peer} user={user} mode={mode}", peer=self.peer, user=self.user, mode=self.mode)
        self._reply(R.TIMEOUT)
        self._close()

    # -- input ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.mode == _CLOSED:
            return
        self._handshaking = False  # application data: any TLS handshake is over
        self._buf += data
        self._process()
        if self._blocked and not self._paused and len(self._buf) > _PAUSE_AT:
            self._paused = True
            self._update_reading()
        self._flush()
        self._arm_timer()

    def _resume(self) -> None:
        """A pending command finished: carry on with buffered input."""
        if self.mode == _CLOSED:
            return
        if self._paused and not self._blocked:
            self._paused = False
            self._update_reading()
        self._process()
        self._flush()
        self._arm_timer()

    def _process(self) -> None:
        try:
            self._process_buffer()
        finally:
            # Lines are consumed by moving _pos; drop them once per read, not per line.
            if self._pos:
                self._buf = self._buf[self._pos :]
                self._pos = 0

    def _process_buffer(self) -> None:
        while not self._blocked and self.mode != _CLOSED:
            if self.mode == _DATA:
                if self._pos >= len(self._buf):
                    return
                chunk = self._buf[self._pos :] if self._pos else self._buf
                self._buf, self._pos = b"", 0
                assert self._decoder is not None
                rest = self._decoder.feed(chunk)
                if rest is None:
                    return
                self._buf = rest
                self._end_data()
                continue
            if self._draining and not self.in_transaction and self.mode == _COMMAND:
                self._reply(R.SHUTTING_DOWN)
                self._close()
                return
            line = self._next_line()
            if line is None:
                return
            if line is _SKIP:
                continue
            if self.mode == _AUTH:
                self._auth_response(line)
            else:
                self._command(line)

    def _next_line(self) -> Any:
        """The next complete command line without CRLF; None if there is none yet."""
        limit = self.config.smtp.max_line_length
        while True:
            start = self._pos
            end = self._buf.find(_CRLF, start)
            if self._discarding:
                if end < 0:
                    # Keep a final CR: it may be the start of the CRLF we wait for.
                    self._buf = b"\r" if self._buf.endswith(b"\r") else b""
                    self._pos = 0
                    return None
                self._pos = end + 2
                self._discarding = False
                continue
            if end < 0:
                if limit and len(self._buf) - start > limit:
                    # RFC 5321 4.5.3.1.4 / 4.2.2: 500 5.5.6, then stay in sync by
                    # discarding up to the next CRLF.
                    self._reply(R.LINE_TOO_LONG, error="line")
                    self._discarding = True
                    if self.mode == _AUTH:
                        self.mode = _COMMAND
                        self._auth = None
                    continue
                return None
            line = self._buf[start:end]
            self._pos = end + 2
            if limit and len(line) + 2 > limit:
                self._reply(R.LINE_TOO_LONG, error="line")
                if self.mode == _AUTH:
                    self.mode = _COMMAND
                    self._auth = None
                return _SKIP
            return line

    # -- output ---------------------------------------------------------------

    def _reply(self, reply: Reply, error: str = "") -> None:
        """Queue a reply; ``error`` names the rejected command and counts it."""
        if self.mode == _CLOSED:
            return
        wire = _WIRE.get(reply)
        self._out.append(wire if wire is not None else reply.encode())
        if error:
            self.errors += 1
            self.log.info(
                "smtp rejected {command} peer={peer} user={user}: {reply}",
                command=error,
                peer=self.peer,
                user=self.user,
                reply=str(reply),
            )
            limit = self.config.smtp.max_errors
            if limit and self.errors >= limit:
                self._out.append(R.TOO_MANY_ERRORS.encode())
                self._close()

    def _write_raw(self, data: bytes) -> None:
        if self.mode != _CLOSED:
            self._out.append(data)

    def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out = []
            send(self.transport, data)

    # -- waiting on Deferreds, in order ----------------------------------------

    def _wait(self, d: Deferred, handler: Callable[[Any], None]) -> None:
        """Run ``handler(result or Failure)`` when ``d`` fires; nothing else meanwhile."""
        self._blocked = True
        sync = [True]

        def fire(result: Any) -> None:
            self._blocked = False
            if self.mode == _CLOSED:
                if isinstance(result, Failure) and not result.check(MailError, LoginFailed):
                    self.log.failure("smtp: failure after the client left", result, peer=self.peer)
                return None
            try:
                handler(result)
            except Exception:
                self.log.failure("smtp: internal error", peer=self.peer)
                self._reply(R.LOCAL_ERROR)
                self._close()
            if not sync[0]:
                self._resume()
            return None

        d.addBoth(fire)
        sync[0] = False

    def _then(self, handler: Callable[[Any], None], f: Callable[..., Any], *args: Any) -> None:
        """``handler(result or Failure)`` of ``f(*args)``: at once unless ``f`` returns a Deferred.

        The router answers synchronously in production; a Deferred per RCPT
        only to be fired at once was a measurable share of a session's CPU.
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

    # -- commands -------------------------------------------------------------

    def _command(self, raw: bytes) -> None:
        if b"\r" in raw or b"\n" in raw:
            self._reply(R.BARE_CR_LF_COMMAND, error="line")
            return
        text = raw.decode("ascii", "replace")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler = self._COMMANDS.get(verb)
        if self._refused and verb != "QUIT":
            self._reply(R.SESSION_REFUSED, error=verb)
            return
        if handler is None:
            self._reply(R.UNKNOWN_COMMAND, error="unknown")
            return
        try:
            handler(self, arg.strip())
        except Exception:
            # A bug must not kill the session silently or leak its text: 451, logged.
            self.log.failure("smtp: internal error in {command}", command=verb, peer=self.peer)
            self._abort_incoming()
            self.mode = _COMMAND
            self._reset_transaction()
            self._reply(R.LOCAL_ERROR)

    def do_EHLO(self, arg: str) -> None:
        self._hello(arg, esmtp=True)

    def do_HELO(self, arg: str) -> None:
        self._hello(arg, esmtp=False)

    def _hello(self, arg: str, esmtp: bool) -> None:
        # RFC 5321 4.1.1.1: one argument, the client's domain or address literal
        # (ASCII without controls: it is echoed in the reply and goes into Received:).
        if not arg or " " in arg or not (arg.isascii() and arg.isprintable()):
            self._reply(R.HELO_SYNTAX, error="EHLO" if esmtp else "HELO")
            return
        # RFC 5321 4.1.4: EHLO resets the transaction.
        self._reset_transaction()
        self.helo = arg
        self.esmtp = esmtp
        hostname = self.config.hostname
        shown = _UNPRINTABLE.sub("?", arg[:255])  # never echo raw client bytes
        if not esmtp:
            self._reply(R.helo(hostname, shown))
            return
        self._write_raw(R.ehlo_wire(hostname, shown, self._extensions()))

    def _extensions(self) -> tuple[str, ...]:
        kw = self.factory.extensions
        if self._starttls_available():
            kw += ("STARTTLS",)
        if self._auth_allowed():
            kw += ("AUTH PLAIN LOGIN",)
        return kw

    def _starttls_available(self) -> bool:
        return (
            self.policy.offers_starttls
            and not self.tls
            and getattr(self.runtime, "tls", None) is not None
            and ITLSTransport.providedBy(self.transport)
        )

    def _auth_allowed(self) -> bool:
        return getattr(self.runtime, "checker", None) is not None and auth_allowed(
            self.tls, self.peer, self.config.auth.plaintext_on_loopback
        )

    def do_NOOP(self, arg: str) -> None:
        self._reply(R.NOOP_OK)

    def do_RSET(self, arg: str) -> None:
        if arg:
            self._reply(R.SYNTAX, error="RSET")
            return
        self._reset_transaction()
        self._reply(R.RESET_OK)

    def do_QUIT(self, arg: str) -> None:
        self._reply(R.BYE)
        self._close()

    def do_VRFY(self, arg: str) -> None:
        # RFC 5321 3.5.3: 252 when the server will not verify.
        if not arg:
            self._reply(R.SYNTAX, error="VRFY")
            return
        self._reply(R.VRFY_CANNOT)

    def do_EXPN(self, arg: str) -> None:
        self._reply(R.NOT_IMPLEMENTED, error="EXPN")

    def do_HELP(self, arg: str) -> None:
        self._reply(R.HELP)

    # STARTTLS, RFC 3207
    def do_STARTTLS(self, arg: str) -> None:
        if arg:
            self._reply(R.SYNTAX, error="STARTTLS")
            return
        if self.tls:
            self._reply(R.ALREADY_TLS, error="STARTTLS")
            return
        if not self._starttls_available():
            self._reply(R.TLS_NOT_AVAILABLE, error="STARTTLS")
            return
        try:
            context = self.runtime.tls.context_factory()
        except Exception:
            self.log.failure("smtp: no TLS context", peer=self.peer)
            self._reply(R.TLS_FAILED)
            return
        self._reply(R.START_TLS)
        self._flush()  # the 220 goes out in plaintext
        # RFC 3207 section 4.2 (CVE-2011-0411): whatever the client pipelined
        # after STARTTLS arrived in plaintext; it is discarded, never executed.
        if len(self._buf) > self._pos:
            self.log.info(
                "smtp discarded {size} bytes pipelined after STARTTLS peer={peer}",
                size=len(self._buf) - self._pos,
                peer=self.peer,
            )
        self._buf, self._pos = b"", 0
        self._discarding = False
        self._handshaking = True
        self.transport.startTLS(context)
        # RFC 3207 section 4.2: forget everything learnt before TLS.
        self._reset_session()

    # AUTH, RFC 4954
    def do_AUTH(self, arg: str) -> None:
        if self.helo is None or not self.esmtp:
            self._reply(R.NEED_HELO, error="AUTH")
            return
        if self.user:
            self._reply(R.ALREADY_AUTHENTICATED, error="AUTH")
            return
        if self.in_transaction:
            self._reply(R.AUTH_IN_TRANSACTION, error="AUTH")
            return
        if not self._auth_allowed():
            if getattr(self.runtime, "checker", None) is not None and not self.tls:
                self._reply(R.TLS_REQUIRED, error="AUTH")
            else:
                self._reply(R.AUTH_NOT_AVAILABLE, error="AUTH")
            return
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        initial = initial.strip()
        if mech not in ("PLAIN", "LOGIN"):
            self._reply(R.UNKNOWN_MECHANISM, error="AUTH")
            return
        if not initial:
            self.mode = _AUTH
            self._auth = (mech, b"")
            self._write_raw(R.auth_challenge(b"" if mech == "PLAIN" else _LOGIN_USER))
            return
        self._auth = (mech, b"")
        self.mode = _AUTH
        self._auth_response(initial.encode("ascii", "replace"))

    def _auth_response(self, line: bytes) -> None:
        assert self._auth is not None
        mech, state = self._auth
        if line == b"*":
            self.mode = _COMMAND
            self._auth = None
            self._reply(R.AUTH_CANCELLED, error="AUTH")
            return
        try:
            # RFC 4954 section 4: "=" is an empty initial response.
            decoded = b"" if line == b"=" else base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self.mode = _COMMAND
            self._auth = None
            self._reply(R.AUTH_BAD_BASE64, error="AUTH")
            return
        if mech == "LOGIN" and not state:
            # draft-murchison-sasl-login: username, then password.
            self._auth = (mech, b"u:" + decoded)
            self._write_raw(R.auth_challenge(_LOGIN_PASS))
            return
        self.mode = _COMMAND
        self._auth = None
        if mech == "LOGIN":
            username, password = state[2:], decoded
        else:
            # RFC 4616: [authzid] NUL authcid NUL passwd
            parts = decoded.split(b"\x00")
            if len(parts) != 3 or not parts[1]:
                self._reply(R.AUTH_BAD_BASE64, error="AUTH")
                return
            authzid, username, password = parts
            if authzid and authzid != username:
                self._auth_failed(username, count=False)
                return
        self._check_credentials(username, password)

    def _account(self, username: bytes) -> str:
        text = username.decode("utf-8", "replace")
        try:
            return parse_address(text).key
        except AddressError:
            return text.lower()

    def _check_credentials(self, username: bytes, password: bytes) -> None:
        account = self._account(username)
        throttle = getattr(self.runtime, "throttle", None)
        if throttle is not None and throttle.locked(self.peer, account):
            self._reply(R.AUTH_LOCKED, error="AUTH")
            return
        d = cred.login(self.factory.portal, username, password)

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                if result.check(LoginFailed):
                    self._auth_failed(username)
                    return
                self.log.failure("smtp: credential check failed", result, peer=self.peer)
                self._reply(R.AUTH_TEMPFAIL, error="AUTH")
                return
            user = result.decode("utf-8") if isinstance(result, bytes) else str(result)
            if throttle is not None:
                throttle.succeeded(self.peer, account)
            self.user = user
            self.log.info("smtp authenticated peer={peer} user={user}", peer=self.peer, user=user)
            self._reply(R.AUTH_OK)

        self._wait(d, done)

    def _auth_failed(self, username: bytes, count: bool = True) -> None:
        throttle = getattr(self.runtime, "throttle", None)
        delay = 0.0
        if throttle is not None:
            delay = float(throttle.failed(self.peer, self._account(username)) or 0.0)
        # Slow the guesser down: the 535 comes only after the throttle's delay.
        self._delay(delay, lambda: self._reply(R.AUTH_FAILED, error="AUTH"))

    # MAIL, RFC 5321 4.1.1.2 and RFC 1870 / 6152 / 4954 section 5
    def do_MAIL(self, arg: str) -> None:
        if self.helo is None:
            self._reply(R.NEED_HELO, error="MAIL")
            return
        if self.in_transaction:
            self._reply(R.NESTED_MAIL, error="MAIL")
            return
        if self.policy.auth_required and not self.user:
            self._reply(R.AUTH_REQUIRED, error="MAIL")
            return
        if arg[:5].upper() != "FROM:":
            self._reply(R.SYNTAX, error="MAIL")
            return
        m = _PATH_ARGS.match(arg[5:])
        if not m:
            self._reply(R.BAD_SENDER, error="MAIL")
            return
        try:
            sender = parse_path(m.group(1), null_ok=True)
        except AddressError:
            self._reply(R.BAD_SENDER, error="MAIL")
            return
        params = m.group(2).split()
        given: dict[str, str] = {}
        if params and not self.esmtp:
            self._reply(R.UNKNOWN_PARAMETER, error="MAIL")
            return
        for param in params:
            if not _ESMTP_PARAM.match(param):
                self._reply(R.SYNTAX, error="MAIL")
                return
            name, _, value = param.partition("=")
            name = name.upper()
            given[name] = value
            if name == "SIZE":
                # RFC 1870 section 6
                if not value.isdigit() or len(value) > 20:
                    self._reply(R.SYNTAX, error="MAIL")
                    return
                limit = self.config.smtp.max_message_size
                if limit and int(value) > limit:
                    self._reply(R.MESSAGE_TOO_BIG, error="MAIL")
                    return
            elif name == "BODY":
                # RFC 6152: 8BITMIME
                if value.upper() not in ("7BIT", "8BITMIME"):
                    self._reply(R.SYNTAX, error="MAIL")
                    return
            elif name == "AUTH" and value:
                pass  # RFC 4954 section 5: accepted, not trusted
            else:
                self._reply(R.UNKNOWN_PARAMETER, error="MAIL")
                return
        if self.user:
            if sender is None:
                self._reply(R.NULL_SENDER_NOT_ALLOWED, error="MAIL")
                return
            if not sender_owned(sender, self.user, getattr(self.runtime, "aliases", None)):
                self._reply(R.SENDER_NOT_OWNED, error="MAIL")
                return
            if not self.factory.shared.rate.allowed(self.user):
                self._reply(R.RATE_LIMITED, error="MAIL")
                return
        txn = Transaction(sender, given)

        def checked(result: Any) -> None:
            if result is not None:
                self._reply(self._refusal(result), error="MAIL")
                return
            self._reset_transaction()
            self.sender = sender
            self.in_transaction = True
            self._txn = txn
            self.recipients = txn.recipients
            self._reply(R.SENDER_OK)

        self._then(checked, self.factory.pipeline.mail, self._connection(), txn)

    # RCPT, RFC 5321 4.1.1.3
    def do_RCPT(self, arg: str) -> None:
        if not self.in_transaction:
            self._reply(R.NEED_MAIL, error="RCPT")
            return
        if arg[:3].upper() != "TO:":
            self._reply(R.SYNTAX, error="RCPT")
            return
        m = _PATH_ARGS.match(arg[3:])
        if not m:
            self._reply(R.BAD_RECIPIENT, error="RCPT")
            return
        path = m.group(1)
        if m.group(2).split():
            self._reply(R.UNKNOWN_PARAMETER, error="RCPT")
            return
        self._rcpt_tried = True
        try:
            if path.lower() == "<postmaster>":
                # RFC 5321 4.1.1.3: "Postmaster" without a domain must be accepted.
                local = self.config.domains.local
                address = Address("postmaster", local[0] if local else self.config.hostname)
            else:
                address = parse_path(path)
        except AddressError:
            self._reply(R.BAD_RECIPIENT, error="RCPT")
            return
        if address is None:
            self._reply(R.BAD_RECIPIENT, error="RCPT")
            return
        # RFC 5321 4.5.3.1.8: at least 100 recipients must be accepted; beyond the cap 452.
        limit = self.config.smtp.max_recipients
        if limit and self._rcpt_count >= limit:
            # Not a client error: the client is expected to send the rest later
            # (4.5.3.1.10), so it must not count towards the error cap.
            self._reply(R.TOO_MANY_RECIPIENTS)
            return
        def done(result: Any) -> None:
            if isinstance(result, Failure):
                if result.check(MailError):
                    self._reply(result.value.reply, error="RCPT")
                    return
                self.log.failure("smtp: routing failed", result, peer=self.peer)
                self._reply(R.LOCAL_ERROR, error="RCPT")
                return
            if not self.in_transaction:  # RSET/EHLO cannot overtake us; defensive
                return
            self._then(lambda checked: accept(result, checked), self.factory.pipeline.rcpt,
                       self._connection(), self._txn, address)

        def accept(result: Any, checked: Any) -> None:
            if checked is not None:
                self._reply(self._refusal(checked), error="RCPT")
                return
            if not self.in_transaction:
                return
            known = {(d.address.key, d.local) for d in self.recipients}
            for dest in result:
                if (dest.address.key, dest.local) not in known:
                    known.add((dest.address.key, dest.local))
                    self.recipients.append(dest)
            self._rcpt_count += 1
            self._reply(R.RECIPIENT_OK)

        self._then(done, self.runtime.router.resolve, address, bool(self.user))

    # DATA, RFC 5321 4.1.1.4
    def do_DATA(self, arg: str) -> None:
        if arg:
            self._reply(R.SYNTAX, error="DATA")
            return
        if not self.in_transaction:
            self._reply(R.NEED_MAIL, error="DATA")
            return
        if not self.recipients:
            self._reply(R.NO_VALID_RECIPIENTS if self._rcpt_tried else R.NEED_RCPT, error="DATA")
            return
        envelope = Envelope(
            sender=self.sender,
            recipients=tuple(self.recipients),
            helo=self.helo or "",
            peer=self.peer,
            protocol=self._protocol_name(),
            tls=self._tls_description(),
            user=self.user,
        )
        try:
            self._incoming = self.runtime.intake.begin(envelope)
        except MailError as e:
            self._reply(e.reply)
            self._reset_transaction()
            return
        except Exception:
            self.log.failure("smtp: intake.begin failed", peer=self.peer)
            self._reply(R.LOCAL_ERROR)
            self._reset_transaction()
            return
        self._envelope = envelope
        self._write_failed = False
        self._observer = self.factory.pipeline.data_begin(self._connection(), self._txn)
        self._decoder = DataDecoder(self._sink, self.config.smtp.max_message_size)
        self.mode = _DATA
        self._reply(R.START_DATA)

    def _sink(self, chunk: bytes) -> None:
        if self._observer is not None:
            self._observer.write(chunk)
        if self._write_failed or self._incoming is None:
            return
        try:
            self._incoming.write(chunk)
        except Exception:
            # Keep reading to the terminator; the reply comes then (451).
            self.log.failure("smtp: writing message data failed", peer=self.peer)
            self._write_failed = True

    def _end_data(self) -> None:
        decoder, incoming = self._decoder, self._incoming
        assert decoder is not None
        self.mode = _COMMAND
        self._decoder = None
        if decoder.too_big or decoder.bare_newline or self._write_failed:
            self._abort_incoming()
            if decoder.too_big:
                reply = R.MESSAGE_TOO_BIG  # RFC 1870 section 6.2
            elif decoder.bare_newline:
                reply = R.BARE_CR_LF_DATA
            else:
                reply = R.LOCAL_ERROR
            self._reset_transaction()
            self._reply(reply, error="DATA")
            return
        self._then(lambda result: self._commit(incoming, result), self.factory.pipeline.data,
                   self._connection(), self._txn, incoming.message())

    def _commit(self, incoming: Any, changes: Any) -> None:
        """The end-of-data checks answered: refuse, or commit with their header changes."""
        if isinstance(changes, (Reply, Failure)):
            self._abort_incoming()
            self._reset_transaction()
            self._reply(self._refusal(changes), error="DATA")
            return
        d = maybeDeferred(incoming.finish, changes)

        def done(result: Any) -> None:
            self._incoming = None
            self._reset_transaction()
            if isinstance(result, Failure):
                # Our failure, not the client's: answered, logged, not counted as an error.
                if result.check(MailError):
                    reply = result.value.reply
                    self.log.info("smtp commit refused peer={peer} user={user}: {reply}",
                                  peer=self.peer, user=self.user, reply=str(reply))
                else:
                    self.log.failure("smtp: commit failed", result, peer=self.peer)
                    reply = R.LOCAL_ERROR
                self._reply(reply)
                return
            queue_id = str(result)
            self.messages += 1
            if self.user:
                self.factory.shared.rate.record(self.user)
            # The intake logged the acceptance (one event per message, issue 3).
            # The only 250 after DATA: from the commit's callback (style.md 7).
            self._reply(R.queued(queue_id))

        # The incoming stays set until the commit resolves, but a lost
        # connection must no longer abort it: the data is complete.
        self._incoming = None
        self._wait(d, done)

    def _protocol_name(self) -> str:
        # RFC 3848 with-protocol types.
        if not self.esmtp and not self.tls and not self.user:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.user else "")

    def _tls_description(self) -> str:
        if not self.tls:
            return ""
        try:
            handle = self.transport.getHandle()
            version = handle.get_protocol_version_name()
            cipher = handle.get_cipher_name()
        except Exception:
            return ""
        return " ".join(str(p) for p in (version, cipher) if p)

    # -- graceful shutdown ------------------------------------------------------

    def shutdown_when_idle(self) -> None:
        """Close with 421 4.3.2 now if idle, else when the transaction ends."""
        self._draining = True
        if self.mode == _CLOSED:
            return
        if not self._blocked:
            self._process()
            self._flush()

    def force_close(self) -> None:
        """Shutdown grace expired: drop the connection (an unacknowledged message is aborted)."""
        if self.mode != _CLOSED:
            self._reply(R.SHUTTING_DOWN)
            self._close()
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    _COMMANDS: dict[str, Callable[["SMTPServer", str], None]] = {}


SMTPServer._COMMANDS = {
    name[3:]: func for name, func in vars(SMTPServer).items() if name.startswith("do_") and callable(func)
}


class SMTPFactory(ServerFactory):
    """Builds sessions for one listener kind; enforces the connection caps."""

    log = Logger()
    noisy = False

    def __init__(self, kind: str, runtime: Any) -> None:
        self.kind = kind
        self.policy = ListenerPolicy.for_kind(kind)
        self.runtime = runtime
        checker = getattr(runtime, "checker", None)
        self.portal = cred.login_portal(checker) if checker is not None else None
        self.shared = _shared_for(runtime)
        self.pipeline = runtime.pipeline
        self.banner = R.banner(runtime.config.hostname).encode()
        # The EHLO keywords every session offers (RFC 2920, 1870, 6152, 2034).
        self.extensions = ("PIPELINING", f"SIZE {runtime.config.smtp.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES")
        self.protocols: set[SMTPServer] = set()
        self.draining = False
        self._idle_waiters: list[Deferred] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        host = getattr(addr, "host", "") or ""
        smtp = self.runtime.config.smtp
        shared = self.shared
        if self.draining:
            reply = R.SHUTTING_DOWN
        elif smtp.max_connections and shared.connections >= smtp.max_connections:
            reply = R.TOO_MANY_CONNECTIONS
        elif smtp.max_connections_per_ip and shared.per_ip[host] >= smtp.max_connections_per_ip:
            reply = R.TOO_MANY_CONNECTIONS_IP
        else:
            proto = SMTPServer(self)
            proto._cap_host = host  # type: ignore[attr-defined]
            shared.connections += 1
            shared.per_ip[host] += 1
            self.protocols.add(proto)
            return proto
        self.log.info("smtp connection refused peer={peer}: {reply}", peer=host, reply=str(reply))
        refuse = _Refuse(reply)
        refuse.factory = self
        return refuse

    def _unregister(self, proto: SMTPServer) -> None:
        if proto not in self.protocols:
            return
        self.protocols.discard(proto)
        host = getattr(proto, "_cap_host", "")
        self.shared.connections -= 1
        self.shared.per_ip[host] -= 1
        if self.shared.per_ip[host] <= 0:
            del self.shared.per_ip[host]
        if not self.protocols:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def drain(self, timeout: float) -> Deferred:
        """Graceful shutdown (SIGTERM): stop taking new sessions, finish what is in flight.

        New connections get 421 4.3.2.  Idle sessions get 421 4.3.2 at once;
        a session in a transaction (MAIL given, or DATA being received or
        committed) gets it after its final reply.  The Deferred fires (with
        None) when every session is gone, or after ``timeout`` seconds, when
        the remaining ones are dropped (messages not yet acknowledged are
        aborted; nothing acknowledged is lost).  Stop the listening port first.
        """
        self.draining = True
        d: Deferred = Deferred()
        if not self.protocols:
            d.callback(None)
            return self._intake_idle(d, timeout)
        self._idle_waiters.append(d)
        for proto in list(self.protocols):
            proto.shutdown_when_idle()
        clock = self.runtime.reactor

        def expire() -> None:
            for proto in list(self.protocols):
                proto.force_close()
            # abortConnection reports connectionLost later; don't wait for it.
            if not d.called:
                self._idle_waiters.remove(d)
                d.callback(None)

        call = clock.callLater(timeout, expire)

        def cancel_timer(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        d.addBoth(cancel_timer)
        return self._intake_idle(d, timeout)

    def _intake_idle(self, sessions_gone: Deferred, timeout: float) -> Deferred:
        """After the sessions: wait (at most ``timeout``) for the intake's commits in flight.

        A commit whose client already left then still finishes before the
        queue manager and the thread pool stop.
        """
        wait = getattr(self.runtime.intake, "wait_idle", None)
        if not callable(wait):
            return sessions_gone
        out: Deferred = Deferred()
        clock = self.runtime.reactor

        def then(_: Any) -> None:
            call = clock.callLater(timeout, lambda: out.called or out.callback(None))

            def idle(_: Any) -> None:
                if call.active():
                    call.cancel()
                if not out.called:
                    out.callback(None)

            wait().addBoth(idle)

        sessions_gone.addBoth(then)
        return out

    wait_idle = drain


def make_factory(kind: str, runtime: Any) -> SMTPFactory:
    """The ServerFactory of one SMTP listener: ``"smtp"``, ``"submission"`` or ``"submissions"``."""
    return SMTPFactory(kind, runtime)
