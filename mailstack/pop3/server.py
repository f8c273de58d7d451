# -*- test-case-name: tests.pop3.test_server -*-
"""The POP3 protocol (RFC 1939, 2449, 2595, 3206, 5034) over ``pop3.mailbox``.

Why not ``twisted.mail.pop3.POP3``: nearly all of it would have to be
overridden (STLS, CAPA, connection loss, the Maildir mailbox, blocking
size/UIDL calls, line limits), and its ``LineOnlyReceiver`` base can neither
discard input after STLS nor batch replies.  The session runs on
``session.CommandSession`` (framing, strict order, batched output,
back-pressure, idle timer, drain):

* Lines end with LF (a CR before it is dropped).  A command line may have 255
  octets with its CRLF (RFC 2449 section 4), AUTH lines and SASL responses
  ``MAX_AUTH_LINE`` (RFC 5034 section 4); a longer one gets one ``-ERR``.
* An asynchronous command (PASS, AUTH, RETR, TOP, QUIT in UPDATE) holds the
  ones pipelined behind it (RFC 2449 section 6.6).
* While the client leaves replies unread no command is processed, and reading
  stops once ``PAUSE_INPUT_AT`` of input waits; a client that reads nothing
  for a whole ``pop3.idle_timeout`` (also during a RETR) is aborted and its
  mailbox lock released.
* RETR/TOP: ``pop3.streamer`` (first chunk and read-ahead on the reactor
  thread, the rest of a big message streamed from the thread pool).

States (RFC 1939 section 3): ``AUTHORIZATION`` -> (login and lock) ->
``TRANSACTION`` -> QUIT -> ``UPDATE`` (deletions) -> closed.  Anything else that
ends the connection (drop, autologout, error) never enters UPDATE.

Login policy: USER/PASS and AUTH PLAIN only under TLS (pop3s, or after STLS),
or from loopback with ``auth.plaintext_on_loopback``; otherwise ``-ERR [AUTH]``
(RFC 3206: authenticating "in violation of policy"), and CAPA then hides USER and
SASL (RFC 2595 section 4).  Lockout, portal login and the failure delay are
``auth.login``; the delay holds the ``-ERR [AUTH]`` reply (and the session's
later commands) back.  Logs carry ``peer`` and ``user``, never passwords or
AUTH payloads.  The autologout timer is ``pop3.idle_timeout`` (RFC 1939
section 3) on the runtime's clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailstack import connlimit
from mailstack.address import AddressError, parse_address
from mailstack.auth import sasl
from mailstack.auth.login import LoginResult
from mailstack.logsafe import escape
from mailstack.net import is_loopback
from mailstack.pop3 import replies as R
from mailstack.pop3.mailbox import (
    MailboxInUse,
    Maildrop,
    MessageGone,
    WireEncoder,
    encode_message,
    plain_message,
)
from mailstack.pop3.streamer import MessageSender, read_ahead, read_first
from mailstack.session import CommandSession

if TYPE_CHECKING:
    from mailstack.pop3.factory import POP3Factory

AUTHORIZATION = "AUTHORIZATION"
TRANSACTION = "TRANSACTION"
UPDATE = "UPDATE"

MAX_COMMAND_LINE = 255  # RFC 2449 section 4, CRLF included
MAX_AUTH_LINE = 2048  # AUTH PLAIN with initial response, SASL responses
MAX_ERRORS = 20
PAUSE_INPUT_AT = 64 * 1024  # unprocessed pipelined input before we stop reading


def plain_reply(header: bytes, data: bytes) -> bytes | None:
    """The RETR reply to a message read whole, if it is its own wire form (``plain_message``)."""
    return b"".join((header, data, R.TERMINATOR)) if plain_message(data) else None


class POP3Server(CommandSession):
    """One POP3 session.  Built by ``pop3.factory.POP3Factory``; see the module docstring."""

    log = Logger()
    protocol = "pop3"
    delimiter = b"\n"
    pause_input_at = PAUSE_INPUT_AT
    # Reading goes on while the client leaves replies unread (only command
    # processing stops), so a TLS handshake gets the reads it needs.
    stop_reading_when_write_full = False
    # Clients download one message at a time, each command sent once the last
    # reply is read: take the next one without a reactor turn when it is there.
    inline_reads = 16
    quiet_after_close = (Exception,)  # every command handles its own failures
    limit_replies: ClassVar[dict[str, bytes]] = {
        connlimit.TOTAL: R.TOO_MANY_CONNECTIONS,
        connlimit.PER_IP: R.TOO_MANY_CONNECTIONS_IP,
    }
    too_many_errors_reply = R.TOO_MANY_ERRORS
    shutdown_reply = R.SHUTTING_DOWN  # like a drop, a shutdown never enters UPDATE: no DELE is done

    def __init__(self, factory: POP3Factory, implicit_tls: bool) -> None:
        rt = factory.runtime
        CommandSession.__init__(self, rt.reactor, factory.group, rt.pop3_connections, rt.metrics)
        self.factory = factory
        self.run_blocking = rt.run_blocking
        self.maildirs = rt.maildirs
        self.tls_config = rt.tls
        self.config = rt.config
        self.implicit_tls = implicit_tls
        self.state = AUTHORIZATION
        self.user: str | None = None  # the key after login
        self.maildrop: Maildrop | None = None
        self._tls = implicit_tls
        self._user_arg: bytes | None = None  # after USER, before PASS
        self._sasl_pending = False  # waiting for the AUTH PLAIN response line
        self._sender: MessageSender | None = None  # a RETR/TOP being streamed
        self._idle_chunks = -1  # the sender's progress when the idle timer last fired
        self._count = 0  # undeleted messages
        self._octets = 0  # and their size
        self._prefetch: int | None = None  # message to read ahead after this command (_read_ahead)
        # Read ahead: (index, whole content, its RETR reply if the content is its own wire form).
        self._ahead: tuple[int, bytes, bytes | None] | None = None

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        self._admit(self._start)

    def _start(self) -> None:
        self._send(R.GREETING)
        self._flush()
        self._arm_timer()
        self._set_deadline(self.config.pop3.login_timeout, self._login_expired)

    def _login_expired(self) -> None:
        """``pop3.login_timeout`` passed in AUTHORIZATION: close.

        RFC 1939 section 3 sets 10 minutes as the least autologout time, an
        inactivity timer for a client that has a session; this is a different
        limit, on how long a connection may hold a slot without logging in
        (so idle connections cannot fill ``pop3.max_connections``), like
        Dovecot's login processes closing a client slow to authenticate."""
        self.log.info("POP3 login timeout for {peer}", peer=self.peer)
        self._send(R.LOGIN_TIMEOUT)
        self._close()

    def _produce_again(self, result: Failure | None) -> Failure | None:
        """A MessageSender finished (and unregistered): be the transport's producer again.

        After a failure the connection is being dropped (``_stream_failed``)."""
        self._sender = None
        if not isinstance(result, Failure) and not self._lost:
            self._register_producer()
            self._update_reading()
        return result

    def ended(self, was_closed: bool) -> None:
        if self.maildrop is not None:
            # RFC 1939 section 6: no QUIT, no UPDATE: nothing is deleted.
            if self.state == TRANSACTION and not was_closed:
                self.log.info("POP3 session of {user} from {peer} ended without QUIT", user=self.user, peer=self.peer)
            self._release_maildrop()

    def _release_maildrop(self) -> None:
        drop, self.maildrop = self.maildrop, None
        if drop is not None:
            drop.close()

    def closing(self) -> None:
        # Release the mailbox now, not at connectionLost: a TLS close waits
        # for the client's close_notify, which a stuck client never sends.
        self._release_maildrop()

    def handler_failed(self) -> None:
        self.log.failure("POP3 command failed", peer=self.peer, user=self.user)
        self._send(R.INTERNAL_ERROR)

    # -- idle timer (RFC 1939 section 3: autologout, at least 10 minutes) --

    def idle_timeout(self) -> float:
        return self.config.pop3.idle_timeout

    def timed_out(self) -> None:
        if self._blocked:
            sender = self._sender
            if sender is not None and sender.chunks == self._idle_chunks:
                # A RETR/TOP made no progress for a whole idle period: the client
                # stopped reading.  Do not let it hold the mailbox forever.
                self._stalled()
                return
            # Otherwise we are the slow side (a long RETR, a slow password
            # check): not the client's idle time.
            self._idle_chunks = sender.chunks if sender is not None else -1
            self._arm_timer()
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

    def after_flush(self) -> None:
        if self._prefetch is not None:
            self._read_ahead()

    def _read_ahead(self) -> None:
        """After RETR n went out, read message n+1 while the client reads n
        (clients download in order), and make its RETR reply, so that the next
        RETR only sends it; one message per session is kept."""
        i, self._prefetch = self._prefetch, None
        drop = self.maildrop
        if i is None or drop is None or self._closed:
            return
        data = read_ahead(drop, i)
        if data is not None:
            self._ahead = (i, data, plain_reply(R.retr_header(drop.sizes[i]), data))

    def max_line_length(self) -> int:
        return MAX_AUTH_LINE

    def line_too_long(self) -> None:
        # RFC 2449 section 4: limit 255 octets; answer and keep in step.
        self._sasl_pending = False
        self._send(R.LINE_TOO_LONG)
        self._count_error()

    def max_errors(self) -> int:
        return MAX_ERRORS

    def line_received(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._sasl_pending:
            if len(line) + 2 > MAX_AUTH_LINE:
                self.line_too_long()
                return
            self._sasl_pending = False
            self._sasl_response(line)
            return
        keyword, _, arg = line.partition(b" ")
        keyword = keyword.upper()
        limit = MAX_AUTH_LINE if keyword == b"AUTH" else MAX_COMMAND_LINE
        if len(line) + 2 > limit:
            self.line_too_long()
            return
        entry = self._COMMANDS.get(keyword)
        if entry is None:
            self._user_arg = None
            self._send(R.UNKNOWN_COMMAND)
            self._count_error()
            return
        if keyword != b"PASS":
            self._user_arg = None  # RFC 1939: PASS only right after USER
        handler, states = entry
        if self.state not in states:
            self._send(R.BAD_STATE)
            self._count_error()
            return
        try:
            result = handler(self, arg)
        except Exception:
            self.log.failure("POP3 command {command} failed", command=escape(keyword), peer=self.peer)
            self._send(R.INTERNAL_ERROR)
            return
        if isinstance(result, defer.Deferred):
            self._wait(result, self._command_done)

    def _command_done(self, result: object) -> None:
        """An asynchronous command finished; its callbacks answered unless it failed."""
        if isinstance(result, Failure):
            self.log.failure("POP3 command failed", result, peer=self.peer, user=self.user)
            self._send(R.INTERNAL_ERROR)

    def _send(self, data: bytes) -> None:
        self._queue(data)

    # -- policy ------------------------------------------------------------

    def _login_allowed(self) -> bool:
        """RFC 2595 section 4: no cleartext passwords before TLS (loopback by config)."""
        if self._tls or self.tls:
            return True
        return bool(self.config.auth.plaintext_on_loopback and is_loopback(self.peer))

    def _can_stls(self) -> bool:
        return not self._tls and not self.tls

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
        out += [R.CAPA_UTF8, R.TERMINATOR]
        self._send(b"".join(out))

    def do_QUIT(self, arg: bytes) -> defer.Deferred[None] | None:
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

        if not drop.changed:
            updated(0)
            return None
        return self.run_blocking(drop.update).addCallbacks(updated, trouble)

    def do_NOOP(self, arg: bytes) -> None:
        self._send(R.NOOP)

    # -- commands: AUTHORIZATION ------------------------------------------------

    def do_UTF8(self, arg: bytes) -> None:
        """RFC 6856 section 2: messages are sent as stored (UTF-8 headers included), never downgraded."""
        if arg:
            self._send(R.BAD_ARGUMENTS)
            return
        self._send(R.UTF8_OK)

    def do_STLS(self, arg: bytes) -> None:
        """RFC 2595 section 4."""
        if not self._can_stls():
            self._send(R.STLS_ALREADY if self._tls else R.STLS_UNAVAILABLE)
            return
        self._send(R.STLS_BEGIN)
        # The +OK goes out in the clear, before the handshake; anything
        # pipelined after STLS was sent in the clear and is discarded (the
        # CVE-2011-0411 class of injection); USER is forgotten (section 4).
        self._user_arg = None
        self.errors = 0
        self._start_tls(self.tls_config.context_factory())
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

    def do_PASS(self, arg: bytes) -> None:
        user, self._user_arg = self._user_arg, None
        if not self._login_allowed():
            self._send(R.TLS_REQUIRED)
            return None
        if user is None:
            self._send(R.USER_FIRST)
            return None
        # RFC 1939 section 7: the password is the rest of the line, spaces included.
        return self._login(user, arg, "USER")

    def do_AUTH(self, arg: bytes) -> None:
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

    def _sasl_response(self, line: bytes, initial: bool = False) -> None:
        line = line.strip()
        try:
            # RFC 5034 section 4: "*" cancels a continuation; "=" is an empty initial response.
            username, password = sasl.plain_credentials(
                sasl.decode_response(line, cancel_ok=not initial, empty_ok=initial)
            )
        except sasl.Cancelled:
            self._send(R.AUTH_CANCELLED)
            return
        except sasl.BadBase64:
            self._send(R.AUTH_BAD_BASE64)
            return
        except sasl.Malformed:
            self._send(R.AUTH_MALFORMED)
            return
        # A foreign authorization identity (no proxy login) comes back as password None: refused.
        self._login(username, password, "AUTH PLAIN")

    def _login(self, user: bytes, password: bytes | None, method: str) -> None:
        def done(result: LoginResult | Failure) -> None:
            if isinstance(result, Failure):
                self.log.failure("POP3 credential check failed for {user}", result, user=escape(user), peer=self.peer)
                self._send(R.AUTH_SERVICE_FAILED)
                return
            if result.locked:
                self.log.warn(  # noqa: G010 (twisted.logger's name)
                    "POP3 login refused (locked out) for {user} from {peer}",
                    user=escape(result.account),
                    peer=self.peer,
                )
                self._send(R.LOCKED_OUT)
                return
            if result.key is None:
                self.log.warn(  # noqa: G010 (twisted.logger's name)
                    "POP3 login failed ({method}) for {user} from {peer}; reply delayed {delay}s",
                    method=method,
                    user=escape(result.account),
                    peer=self.peer,
                    delay=result.delay,
                )
                if result.delay:
                    self._delay(result.delay, lambda: self._send(R.LOGIN_FAILED))
                else:
                    self._send(R.LOGIN_FAILED)
                return
            self._authenticated(result.key, method)

        self._wait(self.factory.authenticator.login(self.peer, user, password), done)

    def _authenticated(self, key: str, method: str) -> None:
        try:
            path = self.maildirs.path_for(parse_address(key))
        except (AddressError, ValueError):
            self.log.error("POP3 user {user} has no usable maildir path", user=key, peer=self.peer)
            self._send(R.MAILDROP_INVALID)
            return

        def opened(result: Maildrop | Failure) -> None:
            if isinstance(result, Failure):
                if result.check(MailboxInUse):
                    self.log.info("POP3 mailbox of {user} in use; refused {peer}", user=key, peer=self.peer)
                    self._send(R.IN_USE)
                else:
                    self.log.failure("POP3 cannot open the mailbox of {user}", result, user=key, peer=self.peer)
                    self._send(R.MAILDROP_UNAVAILABLE)
                return
            drop = result
            self.maildrop = drop
            self.user = key
            self.state = TRANSACTION
            self._clear_deadline()
            self._count = len(drop)
            self._octets = sum(drop.sizes)
            self.log.info(
                "POP3 login ({method}) of {user} from {peer}: {count} messages",
                method=method,
                user=key,
                peer=self.peer,
                count=self._count,
            )
            self._send(R.login_ok(self._count, self._octets))

        self._wait(self.run_blocking(Maildrop.open, path), opened)

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

    def do_RETR(self, arg: bytes) -> defer.Deferred[None] | None:
        i = self._message(arg)
        if i is None:
            return None
        ahead = self._ahead
        if ahead is not None and ahead[0] == i and ahead[2] is not None:
            self._ahead = None
            self._send(ahead[2])
            self._prefetch = i + 1
            return None
        assert self.maildrop is not None
        return self._send_message(i, R.retr_header(self.maildrop.sizes[i]), None)

    def do_TOP(self, arg: bytes) -> defer.Deferred[None] | None:
        """RFC 1939 section 7: TOP msg n -- header, blank line, n body lines."""
        number, _, lines = arg.partition(b" ")
        if not lines.isdigit() or len(lines) > 10:
            self._send(R.BAD_ARGUMENTS)
            return None
        i = self._message(number)
        if i is None:
            return None
        return self._send_message(i, R.TOP_HEADER, int(lines))

    def _send_message(self, i: int, header: bytes, body_lines: int | None) -> defer.Deferred[None] | None:
        drop = self.maildrop
        assert drop is not None
        ahead, self._ahead = self._ahead, None
        first = (None, ahead[1]) if ahead is not None and ahead[0] == i else read_first(drop, i, self.run_blocking)
        if not isinstance(first, defer.Deferred):
            fileobj, data = first
            if fileobj is None:
                # The common case, a message under CHUNK: the whole reply is
                # queued now, no Deferred and no callbacks.
                reply = plain_reply(header, data) if body_lines is None else None
                if reply is not None:
                    self._send(reply)
                    self._prefetch = i + 1
                else:
                    self._send(header + encode_message(data, body_lines))
                return None
            first = defer.succeed(first)
        return self._send_read(first, i, header, body_lines)

    def _send_read(
        self, first: defer.Deferred[tuple[Any, bytes]], i: int, header: bytes, body_lines: int | None
    ) -> defer.Deferred[None]:
        """The reply once ``first`` (``read_first``'s answer) fires: whole, or
        its first chunk and then a MessageSender for the rest."""

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
            sender = self._sender = MessageSender(self.transport, fileobj, encoder, self.run_blocking)
            self._idle_chunks = -1
            self._unregister_producer()  # the sender is the producer until it is done
            return sender.start().addBoth(self._produce_again).addErrback(self._stream_failed, i + 1)

        def failed(f: Failure) -> None:
            if f.check(MessageGone):
                self._send(R.MESSAGE_GONE)
            else:
                self.log.failure(
                    "POP3 cannot read message {number} of {user}", f, number=i + 1, user=self.user, peer=self.peer
                )
                self._send(R.READ_FAILED)

        return first.addCallbacks(started, failed)

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

    _COMMANDS: ClassVar[dict[bytes, tuple[Callable[..., Any], tuple[str, ...]]]] = {
        b"CAPA": (do_CAPA, (AUTHORIZATION, TRANSACTION)),
        b"QUIT": (do_QUIT, (AUTHORIZATION, TRANSACTION)),
        b"NOOP": (do_NOOP, (TRANSACTION,)),  # RFC 1939 section 5
        b"STLS": (do_STLS, (AUTHORIZATION,)),
        b"UTF8": (do_UTF8, (AUTHORIZATION,)),  # RFC 6856 section 2
        b"USER": (do_USER, (AUTHORIZATION,)),
        b"PASS": (do_PASS, (AUTHORIZATION,)),
        b"AUTH": (do_AUTH, (AUTHORIZATION,)),
        b"STAT": (do_STAT, (TRANSACTION,)),
        b"LIST": (do_LIST, (TRANSACTION,)),
        b"UIDL": (do_UIDL, (TRANSACTION,)),
        b"DELE": (do_DELE, (TRANSACTION,)),
        b"RSET": (do_RSET, (TRANSACTION,)),
        b"RETR": (do_RETR, (TRANSACTION,)),
        b"TOP": (do_TOP, (TRANSACTION,)),
    }
