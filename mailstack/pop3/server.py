# -*- test-case-name: tests.pop3.test_server -*-
"""The POP3 protocol (RFC 1939, 2449, 2595, 3206, 5034) over ``pop3.mailbox``.

Why not ``twisted.mail.pop3.POP3``: anchors 4.3 lists what would have to be
overridden (STLS with buffer flush, CAPA, state handling on connection loss, the
Maildir mailbox, blocking size/UIDL calls, line limits); that is nearly all of it,
and its ``LineOnlyReceiver`` base cannot discard input after STLS nor batch
replies.  So this is a small ``Protocol`` with its own line buffer:

* Lines end with LF (CR before it is dropped).  A command line may have 255
  octets with its CRLF (RFC 2449 section 4); AUTH lines and SASL responses up to
  ``MAX_AUTH_LINE`` (RFC 5034 section 4 lets an initial response exceed 255).  A
  longer line gets one ``-ERR`` and is skipped up to its end, so the session
  stays in step.
* Commands are handled one at a time in order.  A command whose work is
  asynchronous (PASS, AUTH, RETR, TOP, QUIT in UPDATE) holds the queue until it
  is done, so pipelined replies (RFC 2449 section 6.6) come out in order.
* All replies produced by one read go out in one ``transport.write`` (up to
  ``FLUSH_AT``).  The session is the transport's push producer: while the
  client leaves replies unread (buffer full) no further command is processed,
  and reading stops once ``PAUSE_INPUT_AT`` of input waits; a client that reads
  nothing for a whole ``pop3.idle_timeout`` (also in the middle of a RETR) is
  aborted and its mailbox lock released.
* On a plain TCP connection a reply goes straight to the socket when nothing
  is waiting in the transport's buffer (``mailstack.directsend``): one send()
  instead of Twisted's queue, poll-set registration and send on the next loop
  turn.
* After a RETR of a small message, the next message is read ahead between
  commands (``_read_ahead``), so the next RETR's reply needs no file access.
* RETR/TOP read the first 64 KiB on the reactor thread (an open and a read
  from the page cache are cheaper than a thread hop); the rest of a large
  message streams through ``_MessageSender``, a push producer reading 64 KiB
  chunks in the thread pool.  Memory per session does not grow with message
  size.

States (RFC 1939 section 3): ``AUTHORIZATION`` -> (login and lock) ->
``TRANSACTION`` -> QUIT -> ``UPDATE`` (deletions) -> closed.  Anything else that
ends the connection (drop, autologout, error) never enters UPDATE.

Login policy: USER/PASS and AUTH PLAIN only under TLS (pop3s, or after STLS),
or from loopback with ``auth.plaintext_on_loopback``; otherwise ``-ERR [AUTH]``
(RFC 3206: authenticating "in violation of policy"), and CAPA then hides USER and
SASL (RFC 2595 section 4).  Every failure goes to ``runtime.throttle``; its delay
holds the ``-ERR [AUTH]`` reply (and the session's later commands) back, a locked
out peer or account is refused before the password is checked.  Logs carry
``peer`` and ``user``, never passwords or AUTH payloads.  The autologout timer is
``pop3.idle_timeout`` (RFC 1939 section 3) on the runtime's clock.

File work lives in ``pop3.mailbox`` and runs through ``run_blocking``, except
the first RETR/TOP chunk (above).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import weakref
from typing import Any, Callable

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.address import AddressError, parse_address
from mailstack.auth import cred
from mailstack.directsend import send
from mailstack.pop3 import replies as R
from mailstack.pop3.mailbox import Maildrop, MailboxInUse, MessageGone, WireEncoder, encode_message, plain_message

AUTHORIZATION = "AUTHORIZATION"
TRANSACTION = "TRANSACTION"
UPDATE = "UPDATE"

MAX_COMMAND_LINE = 255  # RFC 2449 section 4, CRLF included
MAX_AUTH_LINE = 2048  # AUTH PLAIN with initial response, SASL responses
MAX_ERRORS = 20
CHUNK = 64 * 1024  # read size for RETR/TOP
PAUSE_INPUT_AT = 64 * 1024
FLUSH_AT = 64 * 1024  # replies of one read are written in one go up to this size
CLOSE_GRACE = 10.0  # seconds a closing connection may take before it is aborted  # unprocessed pipelined input before we stop reading


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


@implementer(IPushProducer)
class _MessageSender:
    """Streams the rest of a message file to the transport (RETR/TOP).

    Reads ``CHUNK`` bytes at a time through ``run_blocking`` while the transport
    wants more; ``pauseProducing`` from the transport stops the reads, so at most
    one chunk plus the transport's buffer is in memory.
    """

    def __init__(self, transport: Any, fileobj: Any, encoder: WireEncoder, run_blocking: Callable[..., Any]) -> None:
        self._transport = transport
        self._file = fileobj
        self._encoder = encoder
        self._run_blocking = run_blocking
        self._paused = False
        self._reading = False
        self._finished = False
        self._in_next = False
        self.chunks = 0  # read so far (progress, for the autologout timer)
        self.done: defer.Deferred[None] = defer.Deferred()

    def start(self) -> "defer.Deferred[None]":
        self._transport.registerProducer(self, True)
        self._next()
        return self.done

    def _next(self) -> None:
        while not (self._paused or self._reading or self._finished):
            self._reading = True
            self._in_next = True
            self._run_blocking(self._file.read, CHUNK).addBoth(self._got)
            self._in_next = False
            if self._reading:
                return  # the read is in a thread; _got continues

    def _got(self, data: Any) -> None:
        self._reading = False
        if self._finished:
            self._close_file()  # stopProducing left the close to us
            return
        if isinstance(data, Failure):
            self._finish(data)
            return
        if not data:
            self._transport.write(self._encoder.end())
            self._finish(None)
            return
        self.chunks += 1
        out = self._encoder.feed(data)
        if self._encoder.done:
            self._transport.write(out + self._encoder.end())
            self._finish(None)
            return
        if out:
            self._transport.write(out)
        if not self._in_next:
            self._next()

    def _close_file(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass

    def _finish(self, result: Failure | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._close_file()
        self._transport.unregisterProducer()
        if result is None:
            self.done.callback(None)
        else:
            self.done.errback(result)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._next()

    def stopProducing(self) -> None:
        if not self._finished:
            self._finished = True
            if not self._reading:
                self._close_file()
            self.done.errback(Failure(ConnectionDone("stopped while sending a message")))


class POP3Server(Protocol):
    """One POP3 session.  Built by ``POP3Factory``; see the module docstring."""

    log = Logger()

    def __init__(self, factory: "POP3Factory", implicit_tls: bool) -> None:
        self.factory = factory
        rt = factory.runtime
        self.clock = rt.reactor
        self.run_blocking = rt.run_blocking
        self.portal = factory.portal
        self.throttle = rt.throttle
        self.maildirs = rt.maildirs
        self.tls_config = rt.tls
        self.config = rt.config
        self.idle_timeout = rt.config.pop3.idle_timeout
        self.implicit_tls = implicit_tls
        self.state = AUTHORIZATION
        self.peer = ""
        self.user: str | None = None  # the key after login
        self.maildrop: Maildrop | None = None
        self._tls = implicit_tls
        self._buf = bytearray()
        self._discarding = False  # skipping the rest of an overlong line
        self._out: list[bytes] = []
        self._out_size = 0
        self._busy = False
        self._processing = False
        self._closed = False
        self._lost = False
        self._input_paused = False
        self._write_full = False  # the transport's write buffer is full (we are its producer)
        self._registered = False  # we are the transport's registered producer
        self._errors = 0
        self._user_arg: bytes | None = None  # after USER, before PASS
        self._sasl_pending = False  # waiting for the AUTH PLAIN response line
        self._idle_call: Any = None
        self._delayed: Any = None  # a slowed failure reply
        self._abort_call: Any = None  # hard close if a polite one does not finish
        self._sender: _MessageSender | None = None  # a RETR/TOP being streamed
        self._idle_chunks = -1  # the sender's progress when the idle timer last fired
        self._count = 0  # undeleted messages
        self._octets = 0  # and their size
        self._prefetch: int | None = None  # message to read ahead after this command (_read_ahead)
        self._ahead: tuple[int, bytes] | None = None  # (index, whole content) read ahead

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer = getattr(self.transport.getPeer(), "host", "") or ""
        self._tcp_nodelay()
        if not self.factory.admit(self):
            send(self.transport, R.TOO_MANY_CONNECTIONS)
            self._closed = True
            self.transport.loseConnection()
            return
        # Back-pressure on output: pipelined commands whose responses the client
        # never reads must not grow our write buffer without bound, so the session
        # is the transport's producer and stops reading while the buffer is full
        # (except while a _MessageSender streams a message: it is the producer then).
        self.transport.registerProducer(self, True)
        self._registered = True
        send(self.transport, R.GREETING)
        self._reset_idle()

    # IPushProducer, for the transport (see connectionMade).
    def pauseProducing(self) -> None:
        self._write_full = True
        self._throttle_input()

    def resumeProducing(self) -> None:
        self._write_full = False
        self._throttle_input()
        if not self._busy and not self._processing and not self._closed:
            self._process()  # commands that arrived while the client was not reading
            self._flush()

    def stopProducing(self) -> None:
        pass

    def _produce_again(self, result: Any) -> Any:
        """A _MessageSender finished (and unregistered): be the transport's producer again.

        After a failure the connection is being dropped (``_stream_failed``)."""
        self._sender = None
        if not isinstance(result, Failure) and not self._lost:
            self._write_full = False
            self.transport.registerProducer(self, True)
            self._registered = True
            self._throttle_input()
        return result

    def _tcp_nodelay(self) -> None:
        t = self.transport
        for candidate in (t, getattr(t, "transport", None)):
            setter = getattr(candidate, "setTcpNoDelay", None)
            if setter is not None:
                try:
                    setter(True)
                except Exception:  # not a TCP socket after all
                    pass
                return

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:
        was_closed = self._closed
        self._closed = True
        self._lost = True
        self.factory.release(self)
        for call in (self._idle_call, self._delayed, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._delayed = self._abort_call = None
        if self.maildrop is not None:
            # RFC 1939 section 6: no QUIT, no UPDATE: nothing is deleted.
            if self.state == TRANSACTION and not was_closed:
                self.log.info("POP3 session of {user} from {peer} ended without QUIT", user=self.user, peer=self.peer)
            self._release_maildrop()

    def _release_maildrop(self) -> None:
        drop, self.maildrop = self.maildrop, None
        if drop is not None:
            drop.close()

    def _close(self) -> None:
        """End the session from our side: no command will run any more."""
        self._flush()
        self._closed = True
        if self.maildrop is not None:
            # Release the mailbox now, not at connectionLost: a TLS close waits
            # for the client's close_notify, which a stuck client never sends.
            self._release_maildrop()
        if self._registered:
            # A paused producer would keep a closing TCP transport waiting for
            # it instead of closing once the buffer is written.
            self._registered = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._abort_call = self.clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if not self._lost:
            self.transport.abortConnection()

    def shutdown(self) -> None:
        """Server stopping: end the session now unless a command is in progress
        (that one finishes first).  Like a drop, this never enters UPDATE."""
        if self._closed or self._busy:
            return
        self._send(R.SHUTTING_DOWN)
        self._close()

    # -- idle timer (RFC 1939 section 3: autologout, at least 10 minutes) --

    def _reset_idle(self) -> None:
        if not self.idle_timeout or self._closed:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.idle_timeout)
        else:
            self._idle_call = self.clock.callLater(self.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_call = None
        if self._busy:
            sender = self._sender
            if sender is not None and sender.chunks == self._idle_chunks:
                # A RETR/TOP made no progress for a whole idle period: the client
                # stopped reading.  Do not let it hold the mailbox forever.
                self._stalled()
                return
            # Otherwise we are the slow side (a long RETR, a slow password
            # check): not the client's idle time.
            self._idle_chunks = sender.chunks if sender is not None else -1
            self._reset_idle()
            return
        if self._write_full:
            self._stalled()  # replies wait for a client that does not read them
            return
        self.log.info("POP3 autologout of {peer} ({user})", peer=self.peer, user=self.user)
        # RFC 1939 section 3: the session ends without entering UPDATE.
        self._send(R.AUTOLOGOUT)
        self._close()

    def _stalled(self) -> None:
        self.log.info("POP3 client {peer} ({user}) stopped reading; aborting", peer=self.peer, user=self.user)
        self._closed = True
        self._release_maildrop()
        self.transport.abortConnection()

    # -- input -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if (
            not self._buf
            and data[-1:] == b"\n"
            and data.find(b"\n") == len(data) - 1
            and not (self._busy or self._processing or self._write_full or self._discarding)
        ):
            # The usual case (a client that waits for each reply): exactly one
            # whole line and nothing buffered.  What _process would do for it,
            # minus the buffer copies.
            self._processing = True
            try:
                self._line(data[:-2] if data[-2:-1] == b"\r" else data[:-1])
            finally:
                self._processing = False
            if self._input_paused:
                self._throttle_input()
            self._flush()
            # Off the critical path: the reply is on its way, the client is busy.
            self._reset_idle()
            if self._prefetch is not None:
                self._read_ahead()
            return
        self._reset_idle()
        self._buf += data
        self._process()
        self._flush()

    def _read_ahead(self) -> None:
        """After RETR n went out, read message n+1 while the client reads n.

        Clients download in order, so the next RETR is answered from memory:
        its open/read/close happen here, between two commands, not between a
        command and its reply.  Only a message that fits in one ``CHUNK`` is
        kept (one per session); any error is left for the RETR itself.
        """
        i, self._prefetch = self._prefetch, None
        drop = self.maildrop
        if drop is None or self._closed or i >= len(drop) or drop.deleted[i]:
            return
        try:
            fileobj, data = drop.read_start(i, CHUNK, relocate=False)
        except Exception:
            return
        if fileobj is not None:
            fileobj.close()
            return
        self._ahead = (i, data)

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            buf = self._buf
            while not (self._busy or self._closed or self._write_full):
                i = buf.find(b"\n")
                if self._discarding:
                    if i < 0:
                        del buf[:]
                        break
                    del buf[: i + 1]
                    self._discarding = False
                    continue
                if i < 0:
                    if len(buf) > MAX_AUTH_LINE:
                        del buf[:]
                        self._discarding = True
                        self._line_too_long()
                    break
                line = bytes(buf[:i])
                del buf[: i + 1]
                if line.endswith(b"\r"):
                    line = line[:-1]
                self._line(line)
                if self._out_size > FLUSH_AT:
                    # Big answers (LIST/UIDL of a large mailbox, pipelined): hand
                    # them over now; a full transport buffer then calls
                    # pauseProducing and the loop stops until resumeProducing.
                    self._flush()
        finally:
            self._processing = False
        self._throttle_input()

    def _throttle_input(self) -> None:
        # Pipelined input waiting behind a slow command, or behind replies the
        # client does not read, is bounded.  Reading is not stopped merely
        # because the write buffer is full: under TLS the handshake itself
        # needs reads while writes wait (TLSMemoryBIOProtocol pauses its
        # producer until then), so only a flood of unprocessed input stops it.
        # A client that stops reading altogether meets the autologout timer.
        want_pause = (self._busy or self._write_full) and len(self._buf) > PAUSE_INPUT_AT
        if want_pause != self._input_paused and not self._closed:
            self._input_paused = want_pause
            (self.transport.pauseProducing if want_pause else self.transport.resumeProducing)()

    def _line_too_long(self) -> None:
        # RFC 2449 section 4: limit 255 octets; answer and keep in step.
        if self._sasl_pending:
            self._sasl_pending = False
        self._send(R.LINE_TOO_LONG)
        self._error()

    def _error(self) -> None:
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self._send(R.TOO_MANY_ERRORS)
            self._close()

    def _line(self, line: bytes) -> None:
        if self._sasl_pending:
            if len(line) + 2 > MAX_AUTH_LINE:
                self._line_too_long()
                return
            self._sasl_pending = False
            result = self._sasl_response(line)
            if isinstance(result, defer.Deferred):
                self._run(result)
            return
        keyword, _, arg = line.partition(b" ")
        keyword = keyword.upper()
        limit = MAX_AUTH_LINE if keyword == b"AUTH" else MAX_COMMAND_LINE
        if len(line) + 2 > limit:
            self._line_too_long()
            return
        handler = self._handlers.get(keyword)
        if handler is None:
            self._user_arg = None
            self._send(R.UNKNOWN_COMMAND)
            self._error()
            return
        if keyword != b"PASS":
            self._user_arg = None  # RFC 1939: PASS only right after USER
        states = self._states[keyword]
        if self.state not in states:
            self._send(R.BAD_STATE)
            self._error()
            return
        try:
            result = handler(self, arg)
        except Exception:
            self.log.failure(
                "POP3 command {command} failed", command=keyword.decode("ascii", "replace"), peer=self.peer
            )
            self._send(R.INTERNAL_ERROR)
            return
        if isinstance(result, defer.Deferred):
            self._run(result)

    def _run(self, d: "defer.Deferred[Any]") -> None:
        """Hold the command queue until ``d`` fires."""
        self._busy = True

        def failed(f: Failure) -> None:
            if not self._closed:
                self.log.failure("POP3 command failed", f, peer=self.peer, user=self.user)
                self._send(R.INTERNAL_ERROR)

        def done(_: Any) -> None:
            self._busy = False
            if self._closed:
                return
            if self.factory.draining:
                self.shutdown()
                return
            self._reset_idle()
            if not self._processing:
                self._process()
                self._flush()

        d.addErrback(failed)
        d.addBoth(done)

    # -- output ----------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)

    def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out = []
            self._out_size = 0
            if not self._lost:
                send(self.transport, data)

    # -- policy ------------------------------------------------------------

    def _login_allowed(self) -> bool:
        """RFC 2595 section 4: no cleartext passwords before TLS (loopback by config)."""
        if self._tls or ISSLTransport.providedBy(self.transport):
            return True
        return bool(self.config.auth.plaintext_on_loopback and _is_loopback(self.peer))

    def _can_stls(self) -> bool:
        return not self._tls and not ISSLTransport.providedBy(self.transport) and self.tls_config is not None

    # -- commands: any state -----------------------------------------------

    def do_CAPA(self, arg: bytes) -> None:
        """RFC 2449 section 5."""
        out = [R.CAPA_HEADER, R.CAPA_TOP, R.CAPA_UIDL]
        if self.state == AUTHORIZATION:
            if self._login_allowed():
                out += [R.CAPA_USER, R.CAPA_SASL]
            if self._can_stls():
                out.append(R.CAPA_STLS)
        out += [R.CAPA_RESP_CODES, R.CAPA_AUTH_RESP_CODE, R.CAPA_PIPELINING, R.CAPA_EXPIRE, R.CAPA_IMPLEMENTATION]
        out.append(R.TERMINATOR)
        self._send(b"".join(out))

    def do_QUIT(self, arg: bytes) -> Any:
        if self.state == AUTHORIZATION:
            self._send(R.BYE)
            self._close()
            return None
        # RFC 1939 section 6: the UPDATE state.
        self.state = UPDATE
        drop = self.maildrop
        assert drop is not None
        left = self._count

        def updated(failed: int) -> None:
            self._release_maildrop()
            self.log.info(
                "POP3 QUIT for {user} from {peer}: {left} messages left", user=self.user, peer=self.peer, left=left
            )
            self._send(R.NOT_REMOVED if failed else R.signing_off(left))
            self._close()

        def trouble(f: Failure) -> None:
            self.log.failure("POP3 UPDATE failed for {user}", f, user=self.user, peer=self.peer)
            self._release_maildrop()
            self._send(R.NOT_REMOVED)
            self._close()

        if not any(drop.deleted):
            updated(0)
            return None
        return self.run_blocking(drop.expunge).addCallbacks(updated, trouble)

    def do_NOOP(self, arg: bytes) -> None:
        self._send(R.NOOP)

    # -- commands: AUTHORIZATION ------------------------------------------------

    def do_STLS(self, arg: bytes) -> None:
        """RFC 2595 section 4."""
        if not self._can_stls():
            self._send(R.STLS_ALREADY if self._tls else R.STLS_UNAVAILABLE)
            return
        self._send(R.STLS_BEGIN)
        self._flush()  # the +OK goes out in the clear, before the handshake
        # Anything pipelined after STLS was sent in the clear: discard it
        # (the CVE-2011-0411 class of injection), and forget USER (section 4).
        del self._buf[:]
        self._discarding = False
        self._user_arg = None
        self._errors = 0
        self.transport.startTLS(self.tls_config.context_factory())
        self._tls = True

    def do_USER(self, arg: bytes) -> None:
        if not self._login_allowed():
            self._send(R.TLS_REQUIRED)
            return
        if not arg or len(arg) > MAX_COMMAND_LINE:
            self._send(R.USER_BAD)
            return
        self._user_arg = arg
        self._send(R.USER_OK)

    def do_PASS(self, arg: bytes) -> Any:
        user, self._user_arg = self._user_arg, None
        if not self._login_allowed():
            self._send(R.TLS_REQUIRED)
            return None
        if user is None:
            self._send(R.USER_FIRST)
            return None
        # RFC 1939 section 7: the password is the rest of the line, spaces included.
        return self._login(user, arg, "USER")

    def do_AUTH(self, arg: bytes) -> Any:
        """RFC 5034 section 4, PLAIN (RFC 4616) only."""
        if not arg:
            self._send(b"".join(R.AUTH_MECHANISMS))
            return None
        if not self._login_allowed():
            self._send(R.TLS_REQUIRED)
            return None
        mech, _, initial = arg.partition(b" ")
        if mech.upper() != b"PLAIN":
            self._send(R.AUTH_BAD_MECHANISM)
            return None
        initial = initial.strip()
        if not initial:
            self._send(R.AUTH_CONTINUE)
            self._sasl_pending = True
            return None
        return self._sasl_response(initial, initial=True)

    def _sasl_response(self, line: bytes, initial: bool = False) -> Any:
        line = line.strip()
        if line == b"*" and not initial:
            self._send(R.AUTH_CANCELLED)
            return None
        if line == b"=" and initial:  # RFC 5034 section 4: empty initial response
            line = b""
        try:
            decoded = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._send(R.AUTH_BAD_BASE64)
            return None
        parts = decoded.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            self._send(R.AUTH_MALFORMED)
            return None
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            # No proxy authorization: acting as another user is refused.
            return self._login(authcid, None, "AUTH PLAIN")
        return self._login(authcid, password, "AUTH PLAIN")

    def _account(self, user: bytes) -> str:
        text = user.decode("utf-8", "replace")
        try:
            return parse_address(text).key
        except AddressError:
            return text.lower()

    def _login(self, user: bytes, password: bytes | None, method: str) -> "defer.Deferred[None] | None":
        account = self._account(user)
        if self.throttle.locked(self.peer, account):
            self.log.warn("POP3 login refused (locked out) for {user} from {peer}", user=account, peer=self.peer)
            self._send(R.LOCKED_OUT)
            return None
        if password is None:
            d: defer.Deferred[Any] = defer.fail(UnauthorizedLogin("authorization identity differs"))
        else:
            d = cred.login(self.portal, user, password)
        return d.addCallbacks(
            self._authenticated, self._login_failed, callbackArgs=(method,), errbackArgs=(account, method)
        )

    def _login_failed(self, f: Failure, account: str, method: str) -> Any:
        if not f.check(UnauthorizedLogin, UnhandledCredentials):
            self.log.failure("POP3 credential check failed for {user}", f, user=account, peer=self.peer)
            self._send(R.AUTH_SERVICE_FAILED)
            return None
        # Counted even if the client has already gone: hanging up right after
        # PASS must not dodge the lockout.
        delay = self.throttle.failed(self.peer, account)
        self.log.warn(
            "POP3 login failed ({method}) for {user} from {peer}; reply delayed {delay}s",
            method=method, user=account, peer=self.peer, delay=delay,
        )
        if self._closed:
            return None
        if not delay:
            self._send(R.LOGIN_FAILED)
            return None
        d: defer.Deferred[None] = defer.Deferred()

        def reply() -> None:
            self._delayed = None
            self._send(R.LOGIN_FAILED)
            d.callback(None)

        self._delayed = self.clock.callLater(delay, reply)
        return d

    def _authenticated(self, key: Any, method: str) -> Any:
        if isinstance(key, bytes):
            key = key.decode("utf-8")
        self.throttle.succeeded(self.peer, key)
        if self._closed:
            return None
        try:
            path = self.maildirs.path_for(parse_address(key))
        except (AddressError, ValueError):
            self.log.error("POP3 user {user} has no usable maildir path", user=key, peer=self.peer)
            self._send(R.MAILDROP_INVALID)
            return None

        def opened(drop: Maildrop) -> None:
            if self._closed:  # the client left while we were locking
                drop.close()
                return
            self.maildrop = drop
            self.user = key
            self.state = TRANSACTION
            self._count = len(drop)
            self._octets = sum(drop.sizes)
            self.log.info(
                "POP3 login ({method}) of {user} from {peer}: {count} messages",
                method=method, user=key, peer=self.peer, count=self._count,
            )
            self._send(R.login_ok(self._count, self._octets))

        def failed(f: Failure) -> None:
            if f.check(MailboxInUse):
                self.log.info("POP3 mailbox of {user} in use; refused {peer}", user=key, peer=self.peer)
                self._send(R.IN_USE)
            else:
                self.log.failure("POP3 cannot open the mailbox of {user}", f, user=key, peer=self.peer)
                self._send(R.MAILDROP_UNAVAILABLE)

        return self.run_blocking(Maildrop.open, path).addCallbacks(opened, failed)

    # -- commands: TRANSACTION -----------------------------------------------

    def _message(self, arg: bytes) -> int | None:
        """The index (number - 1) named by a decimal argument, or None after -ERR."""
        drop = self.maildrop
        assert drop is not None
        if not arg.isdigit() or len(arg) > 10:
            self._send(R.BAD_ARGUMENTS)
            return None
        i = int(arg) - 1
        if not 0 <= i < len(drop):
            self._send(R.NO_SUCH_MESSAGE)
            return None
        if drop.deleted[i]:
            self._send(R.ALREADY_DELETED)
            return None
        return i

    def do_STAT(self, arg: bytes) -> None:
        self._send(R.stat(self._count, self._octets))

    def _listing(self, header: bytes, values: list[Any]) -> bytes:
        # One str join and one encode: 50,000 lines in a few tens of ms.
        drop = self.maildrop
        assert drop is not None
        if self._count == len(drop):
            body = "".join([f"{n} {v}\r\n" for n, v in enumerate(values, 1)])
        else:
            deleted = drop.deleted
            body = "".join([f"{i + 1} {v}\r\n" for i, v in enumerate(values) if not deleted[i]])
        return header + body.encode("ascii") + R.TERMINATOR

    def do_LIST(self, arg: bytes) -> None:
        drop = self.maildrop
        assert drop is not None
        if arg:
            i = self._message(arg)
            if i is not None:
                self._send(R.scan_listing(i + 1, drop.sizes[i]))
            return
        self._send(self._listing(R.list_header(self._count, self._octets), drop.sizes))

    def do_UIDL(self, arg: bytes) -> None:
        drop = self.maildrop
        assert drop is not None
        if arg:
            i = self._message(arg)
            if i is not None:
                self._send(R.uidl_listing(i + 1, drop.uidls[i]))
            return
        self._send(self._listing(R.UIDL_HEADER, drop.uidls))

    def do_DELE(self, arg: bytes) -> None:
        drop = self.maildrop
        assert drop is not None
        i = self._message(arg)
        if i is not None:
            drop.deleted[i] = 1
            self._count -= 1
            self._octets -= drop.sizes[i]
            self._send(R.deleted(i + 1))

    def do_RSET(self, arg: bytes) -> None:
        drop = self.maildrop
        assert drop is not None
        drop.deleted[:] = bytes(len(drop))
        self._count = len(drop)
        self._octets = sum(drop.sizes)
        self._send(R.rset(self._count, self._octets))

    def do_RETR(self, arg: bytes) -> Any:
        i = self._message(arg)
        if i is None:
            return None
        assert self.maildrop is not None
        return self._send_message(i, R.retr_header(self.maildrop.sizes[i]), None)

    def do_TOP(self, arg: bytes) -> Any:
        """RFC 1939 section 7: TOP msg n -- header, blank line, n body lines."""
        number, _, lines = arg.partition(b" ")
        if not lines.isdigit() or len(lines) > 10:
            self._send(R.BAD_ARGUMENTS)
            return None
        i = self._message(number)
        if i is None:
            return None
        return self._send_message(i, R.TOP_HEADER, int(lines))

    def _send_message(self, i: int, header: bytes, body_lines: int | None) -> "defer.Deferred[None]":
        drop = self.maildrop
        assert drop is not None

        def started(result: tuple[Any, bytes]) -> Any:
            fileobj, data = result
            if self._closed:
                if fileobj is not None:
                    fileobj.close()
                return None
            encoder = WireEncoder(body_lines)
            if fileobj is None:  # the whole message was read
                self._send(header + encoder.feed(data) + encoder.end())
                return None
            first = encoder.feed(data)
            if encoder.done:
                fileobj.close()
                self._send(header + first + encoder.end())
                return None
            self._send(header + first)
            self._flush()
            sender = self._sender = _MessageSender(self.transport, fileobj, encoder, self.run_blocking)
            self._idle_chunks = -1
            self.transport.unregisterProducer()
            self._registered = False
            self._write_full = False
            return sender.start().addBoth(self._produce_again).addErrback(self._stream_failed, i + 1)

        def failed(f: Failure) -> None:
            if f.check(MessageGone):
                self._send(R.MESSAGE_GONE)
            else:
                self.log.failure(
                    "POP3 cannot read message {number} of {user}", f, number=i + 1, user=self.user, peer=self.peer
                )
                self._send(R.READ_FAILED)

        # The first chunk is read here, on the reactor thread: one open() and one
        # read() of at most CHUNK bytes, almost always from the page cache, cost
        # less than a thread hop, and most messages are that small.  Listing
        # cur/ to find a renamed file, and the rest of a big message, go to
        # the thread pool.
        ahead, self._ahead = self._ahead, None
        try:
            if ahead is not None and ahead[0] == i:
                fileobj, data = None, ahead[1]
            else:
                fileobj, data = drop.read_start(i, CHUNK, relocate=False)
        except FileNotFoundError:
            d = self.run_blocking(drop.read_start, i, CHUNK)
        except Exception:
            d = defer.fail()
        else:
            if fileobj is None:
                # The common case, a message under CHUNK: the whole reply is
                # queued now, no Deferred and no callbacks.
                if body_lines is None and plain_message(data):
                    self._send(b"".join((header, data, R.TERMINATOR)))
                    self._prefetch = i + 1
                else:
                    self._send(header + encode_message(data, body_lines))
                return None
            d = defer.succeed((fileobj, data))
        return d.addCallbacks(started, failed)

    def _stream_failed(self, f: Failure, number: int) -> None:
        if self._closed or f.check(ConnectionDone):
            return
        # Part of the message is out: the only honest thing left is to hang up.
        self.log.failure(
            "POP3 read error in message {number} of {user}", f, number=number, user=self.user, peer=self.peer
        )
        self._closed = True
        self.transport.abortConnection()

    # -- dispatch ----------------------------------------------------------

    _handlers: dict[bytes, Callable[..., Any]] = {
        b"CAPA": do_CAPA,
        b"QUIT": do_QUIT,
        b"NOOP": do_NOOP,
        b"STLS": do_STLS,
        b"USER": do_USER,
        b"PASS": do_PASS,
        b"AUTH": do_AUTH,
        b"STAT": do_STAT,
        b"LIST": do_LIST,
        b"UIDL": do_UIDL,
        b"DELE": do_DELE,
        b"RSET": do_RSET,
        b"RETR": do_RETR,
        b"TOP": do_TOP,
    }
    _auth = (AUTHORIZATION,)
    _trans = (TRANSACTION,)
    _states: dict[bytes, tuple[str, ...]] = {
        b"CAPA": (AUTHORIZATION, TRANSACTION),
        b"QUIT": (AUTHORIZATION, TRANSACTION),
        b"NOOP": _trans,  # RFC 1939 section 5
        b"STLS": _auth,
        b"USER": _auth,
        b"PASS": _auth,
        b"AUTH": _auth,
        b"STAT": _trans,
        b"LIST": _trans,
        b"UIDL": _trans,
        b"DELE": _trans,
        b"RSET": _trans,
        b"RETR": _trans,
        b"TOP": _trans,
    }


class POP3Factory(ServerFactory):
    """Builds ``POP3Server`` sessions; counts them against ``pop3.max_connections``."""

    noisy = False

    def __init__(self, kind: str, runtime: Any) -> None:
        if kind not in ("pop3", "pop3s"):
            raise ValueError(f"unknown POP3 listener kind {kind!r}")
        self.kind = kind
        self.runtime = runtime
        self.portal = cred.login_portal(runtime.checker)
        self.max_connections = runtime.config.pop3.max_connections
        self.sessions: set[POP3Server] = set()
        # pop3.max_connections counts the pop3 and pop3s listeners together.
        self._all = _all_sessions(runtime)

    draining = False

    def drain(self, timeout: float) -> "defer.Deferred[None]":
        """Called by service.py on SIGTERM after the listeners closed.

        Idle sessions get ``-ERR [SYS/TEMP]`` and are closed at once; a command in
        progress (a RETR being sent, the deletions of QUIT) may finish for up to
        ``timeout`` seconds, then the rest are aborted.  Nothing enters UPDATE
        that the client did not QUIT, so no DELE is carried out by a shutdown.
        """
        self.draining = True
        done: defer.Deferred[None] = defer.Deferred()
        clock = self.runtime.reactor
        for proto in list(self.sessions):
            proto.shutdown()

        def check(deadline: float) -> None:
            if not self.sessions:
                done.callback(None)
            elif clock.seconds() >= deadline:
                for proto in list(self.sessions):
                    proto.transport.abortConnection()
                done.callback(None)
            else:
                clock.callLater(0.05, check, deadline)

        check(clock.seconds() + timeout)
        return done

    def buildProtocol(self, addr: Any) -> POP3Server:
        return POP3Server(self, implicit_tls=self.kind == "pop3s")

    def admit(self, proto: POP3Server) -> bool:
        if self.max_connections and len(self._all) >= self.max_connections:
            return False
        self.sessions.add(proto)
        self._all.add(proto)
        return True

    def release(self, proto: POP3Server) -> None:
        self.sessions.discard(proto)
        self._all.discard(proto)


_SESSIONS: "weakref.WeakKeyDictionary[Any, set[POP3Server]]" = weakref.WeakKeyDictionary()


def _all_sessions(runtime: Any) -> set[POP3Server]:
    """The one set of POP3 sessions of a runtime, shared by its factories."""
    try:
        return _SESSIONS.setdefault(runtime, set())
    except TypeError:  # not weakly referenceable: count per factory
        return set()


def make_factory(kind: str, runtime: Any) -> POP3Factory:
    """The factory for a ``pop3`` (STLS offered) or ``pop3s`` (implicit TLS) listener.

    For ``pop3s``, ``service.py`` wraps it in ``TLSMemoryBIOFactory``.
    """
    return POP3Factory(kind, runtime)
