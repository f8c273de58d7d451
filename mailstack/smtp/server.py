# -*- test-case-name: tests.smtp.test_smtp_server -*-
"""The ESMTP server protocol (RFC 5321) behind the MX, submission and submissions listeners.

Why not ``twisted.mail.smtp.ESMTP``: its ``LineOnlyReceiver`` base keeps
splitting already-received plaintext after ``STARTTLS`` (CVE-2011-0411 class),
drops back to command mode and executes the body when a line inside DATA is
overlong, and keeps reading commands while a Deferred is pending, so pipelined
replies come out of order (twisted#8126).  The session runs on
``session.CommandSession`` (framing, strict order, batched output,
back-pressure, idle timer, drain); here are the ESMTP semantics:

* Commands are processed strictly in order (RFC 2920 section 3); one waiting
  on a Deferred (AUTH check, DATA commit) holds the ones behind it.
* DATA is decoded by ``smtp.data.DataDecoder`` in chunks (only ``CRLF.CRLF``
  ends it; no content byte is ever read as a command; bare CR/LF is refused
  after the terminator), streamed to ``IIntake`` and answered 250 only from
  the commit Deferred's callback.
* ``STARTTLS`` discards whatever the client sent behind it (RFC 3207 section
  4.2) and resets the session.
* Policy checks are not done here: the session calls ``runtime.pipeline``
  (``mailstack.pipeline``) at connect, after MAIL, per RCPT after routing,
  when DATA starts and at the end of data, and answers what it returns.

MAIL/RCPT argument syntax is ``smtp.syntax``; the login policy is
``auth.login``; the listener factory, its caps and drain are ``smtp.factory``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITLSTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailstack import connlimit
from mailstack.address import Address
from mailstack.auth import sasl
from mailstack.auth.login import LoginResult
from mailstack.envelope import Destination
from mailstack.errors import MailError, Reply
from mailstack.interfaces import IIncoming, IReservation
from mailstack.logsafe import escape
from mailstack.pipeline import Connection, Transaction
from mailstack.smtp import replies as R
from mailstack.smtp.bdat import ChunkDecoder
from mailstack.smtp.data import DataDecoder
from mailstack.smtp.policy import auth_allowed, sender_owned
from mailstack.smtp.syntax import MailFrom, parse_mail_from, parse_rcpt, recipient
from mailstack.smtp.transfer import AUTH, COMMAND, DATA, MessageTransfer

if TYPE_CHECKING:
    from mailstack.smtp.factory import SMTPFactory


_WIRE: dict[Reply, bytes] = {r: r.encode() for r in R.ALL.values()}  # the constants, pre-encoded
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")
# Refusals counted in ``messages_refused_total`` by reason (the checks' own are
# counted by the pipeline, the sending limits' by ``_reserve``).
_REFUSAL_REASONS: dict[Reply, str] = {
    R.RELAY_DENIED: "relay",
    R.PRIVATE_LITERAL: "relay",
    R.UNKNOWN_USER: "unknown_user",
    R.MESSAGE_TOO_BIG: "size",
    R.AUTH_FAILED: "auth",
    R.AUTH_LOCKED: "auth",
    R.AUTH_REQUIRED: "auth",
    R.SENDER_NOT_OWNED: "auth",
    R.NULL_SENDER_NOT_ALLOWED: "auth",
}


class SMTPServer(MessageTransfer):
    """One ESMTP session.  Built by ``smtp.factory.SMTPFactory``."""

    log = Logger()
    protocol = "smtp"
    quiet_after_close = (MailError,)
    limit_replies: ClassVar[dict[str, bytes]] = {
        connlimit.TOTAL: _WIRE[R.TOO_MANY_CONNECTIONS],
        connlimit.PER_IP: _WIRE[R.TOO_MANY_CONNECTIONS_IP],
    }
    too_many_errors_reply = _WIRE[R.TOO_MANY_ERRORS]
    shutdown_reply = _WIRE[R.SHUTTING_DOWN]  # RFC 5321 section 3.8
    forced_close_reply = shutdown_reply  # an unacknowledged message is aborted (closing)

    def __init__(self, factory: SMTPFactory) -> None:
        rt = factory.runtime
        super().__init__(rt.reactor, factory.group, factory.limiter, rt.metrics)
        self.factory = factory
        self.runtime = rt
        self.config = rt.config
        self.policy = factory.policy
        self.mode = COMMAND
        self._write_failed = False  # the intake refused message bytes; answered at the end of DATA
        self.messages = 0
        self._refused = False  # the connect checks refused: only QUIT is accepted (RFC 5321 3.1)
        self._incoming: IIncoming | None = None
        self._reservation: IReservation | None = None  # the sending limits' hold from MAIL to the 250
        self._pending: IReservation | None = None  # a hold taken while the MAIL checks run
        self._reset_session()

    # -- session state --------------------------------------------------------

    def _reset_session(self) -> None:
        """Forget HELO, AUTH and the transaction (connect and after STARTTLS)."""
        self.helo: str | None = None
        self.esmtp = False
        self.user = ""
        self._login_hash: str | None = None  # users.stored_hash(user) at login
        self._auth: sasl.Exchange | None = None  # multi-step AUTH in progress
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        if self._incoming is not None:  # RSET, EHLO or STARTTLS between BDAT chunks
            self._abort_incoming()
        if self._reservation is not None:  # RSET, EHLO, a refused or failed message
            self._reservation.release()
            self._reservation = None
        self.sender: Address | None = None
        self._mail = MailFrom(None)  # the accepted MAIL's parameters
        self.in_transaction = False  # MAIL accepted
        self.recipients: list[Destination] = []
        self._rcpt_count = 0
        self._rcpt_tried = False
        self._decoder: DataDecoder | ChunkDecoder | None = None
        self._txn: Transaction | None = None
        self._observer: Any = None

    # -- connection -----------------------------------------------------------

    def connectionMade(self) -> None:
        self._admit(self._start)

    def _start(self) -> None:
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


    def refused(self, reply: bytes) -> None:
        self.log.info("smtp connection refused peer={peer}: {reply}", peer=self.peer,
                      reply=reply.decode("ascii").rstrip())

    def ended(self, was_closed: bool) -> None:
        for reservation in (self._reservation, self._pending):
            if reservation is not None:
                reservation.release()
        self._reservation = self._pending = None
        if self._incoming is not None:
            # Connection lost mid-DATA or in its checks: nothing was acknowledged, discard it.
            self._abort_incoming()
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

    def handler_failed(self) -> None:
        self.log.failure("smtp: internal error", peer=self.peer)
        self._reply(R.LOCAL_ERROR)
        self._close()

    # -- timers (RFC 5321 4.5.3.2) --------------------------------------------

    def idle_timeout(self) -> float:
        smtp = self.config.smtp
        return smtp.data_timeout if self.mode == DATA else smtp.command_timeout

    def timed_out(self) -> None:
        if self._blocked:  # our own work is slow, not the client
            self._arm_timer()
            return
        self.log.info(
            "smtp timeout peer={peer} user={user} mode={mode}", peer=self.peer, user=self.user, mode=self.mode
        )
        self._reply(R.TIMEOUT)
        self._close()

    def idle(self) -> bool:
        """Between transactions: a draining session closes now, else after its final reply."""
        return not self.in_transaction and self.mode == COMMAND

    # -- input ----------------------------------------------------------------

    def max_line_length(self) -> int:
        return self.config.smtp.max_line_length

    def max_errors(self) -> int:
        return self.config.smtp.max_errors

    def line_received(self, line: bytes) -> None:
        if self.mode == AUTH:
            self._auth_response(line)
        else:
            self._command(line)

    def line_too_long(self) -> None:
        # RFC 5321 4.5.3.1.4 / 4.2.2: 500 5.5.6; the session skips to the next CRLF.
        self._reply(R.LINE_TOO_LONG, error="line")
        if self.mode == AUTH:
            self.mode = COMMAND
            self._auth = None

    # -- output ---------------------------------------------------------------

    def _reply(self, reply: Reply, error: str = "") -> None:
        """Queue a reply; ``error`` names the rejected command and counts it."""
        if self._closed:
            return
        wire = _WIRE.get(reply)
        self._queue(wire if wire is not None else reply.encode())
        if error:
            reason = _REFUSAL_REASONS.get(reply)
            if reason is not None:
                self.runtime.metrics.refused(reason)
            self.log.info(
                "smtp rejected {command} peer={peer} user={user}: {reply}",
                command=escape(error),  # a refused session's verb, and a check's reply, may echo the client
                peer=self.peer,
                user=self.user,
                reply=escape(str(reply)),
            )
            self._count_error()

    def _write_raw(self, data: bytes) -> None:
        self._queue(data)

    # -- commands -------------------------------------------------------------

    def _command(self, raw: bytes) -> None:
        if b"\r" in raw or b"\n" in raw:
            self._reply(R.BARE_CR_LF_COMMAND, error="line")
            return
        text = raw.decode("utf-8", "replace")  # RFC 6531: UTF-8 paths; bad bytes become U+FFFD
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler = self._COMMANDS.get(verb) if verb.isascii() else None
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
            self.mode = COMMAND
            self._raw = None
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
        kw: tuple[str, ...] = self.factory.extensions
        if self._starttls_available():
            kw += ("STARTTLS",)
        if self._auth_allowed():
            kw += ("AUTH PLAIN LOGIN",)
        return kw

    def _starttls_available(self) -> bool:
        return (
            self.policy.offers_starttls
            and not self.tls
            and ITLSTransport.providedBy(self.transport)
        )

    def _auth_allowed(self) -> bool:
        return auth_allowed(self.tls, self.peer, self.config.auth.plaintext_on_loopback)

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
        # RFC 3207 section 4.2 (CVE-2011-0411): whatever the client pipelined
        # after STARTTLS arrived in plaintext; it is discarded, never executed.
        dropped = self._start_tls(context)
        if dropped:
            self.log.info(
                "smtp discarded {size} bytes pipelined after STARTTLS peer={peer}", size=dropped, peer=self.peer
            )
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
            self._reply(R.AUTH_NOT_AVAILABLE if self.tls else R.TLS_REQUIRED, error="AUTH")
            return
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        initial = initial.strip()
        if mech not in sasl.MECHANISMS:
            self._reply(R.UNKNOWN_MECHANISM, error="AUTH")
            return
        self._auth = sasl.Exchange(mech)
        self.mode = AUTH
        if not initial:
            self._write_raw(R.auth_challenge(self._auth.challenge))
            return
        self._auth_response(initial.encode("ascii", "replace"))

    def _auth_response(self, line: bytes) -> None:
        assert self._auth is not None
        try:
            step = self._auth.step(sasl.decode_response(line))
        except sasl.SASLError as e:
            self.mode = COMMAND
            self._auth = None
            self._reply(R.AUTH_CANCELLED if isinstance(e, sasl.Cancelled) else R.AUTH_BAD_BASE64, error="AUTH")
            return
        if isinstance(step, bytes):
            self._write_raw(R.auth_challenge(step))
            return
        self.mode = COMMAND
        self._auth = None
        username, password = step
        self._check_credentials(username, password)

    def _check_credentials(self, username: bytes, password: bytes | None) -> None:
        def done(result: LoginResult | Failure) -> None:
            if isinstance(result, Failure):
                self.log.failure("smtp: credential check failed", result, peer=self.peer)
                self._reply(R.AUTH_TEMPFAIL, error="AUTH")
                return
            if result.locked:
                self._reply(R.AUTH_LOCKED, error="AUTH")
                return
            if result.key is None:
                # Slow the guesser down: the 535 comes only after the throttle's delay.
                self._delay(result.delay, lambda: self._reply(R.AUTH_FAILED, error="AUTH"))
                return
            self.user = result.key
            self._login_hash = self.runtime.users.stored_hash(self.user)
            self.log.info("smtp authenticated peer={peer} user={user}", peer=self.peer, user=self.user)
            self._reply(R.AUTH_OK)

        self._wait(self.factory.authenticator.login(self.peer, username, password), done)

    # MAIL, RFC 5321 4.1.1.2 and RFC 1870 / 6152 / 4954 section 5
    def do_MAIL(self, arg: str) -> None:
        if self.helo is None:
            self._reply(R.NEED_HELO, error="MAIL")
            return
        if self.in_transaction:
            self._reply(R.NESTED_MAIL, error="MAIL")
            return
        if self.user and self.runtime.users.stored_hash(self.user) != self._login_hash:
            # Deleted or given a new password since the AUTH: the login is void
            # (530 5.7.0, RFC 4954 section 6); the client may authenticate again.
            self.log.info("smtp login of {user} no longer valid peer={peer}", user=self.user, peer=self.peer)
            self.user = ""
            self._reply(R.AUTH_EXPIRED, error="MAIL")
            return
        if self.policy.auth_required and not self.user:
            self._reply(R.AUTH_REQUIRED, error="MAIL")
            return
        parsed = parse_mail_from(arg, self.esmtp, self.config.smtp.max_message_size)
        if isinstance(parsed, Reply):
            self._reply(parsed, error="MAIL")
            return
        sender = parsed.sender
        if self.user:
            if sender is None:
                self._reply(R.NULL_SENDER_NOT_ALLOWED, error="MAIL")
                return
            if not sender_owned(sender, self.user, self.runtime.aliases):
                self._reply(R.SENDER_NOT_OWNED, error="MAIL")
                return
        txn = Transaction(sender, parsed.params)

        def reserved(reservation: IReservation | Reply | Failure | None) -> None:
            if isinstance(reservation, Failure):
                self.log.failure("smtp: sending limits unavailable", reservation, peer=self.peer)
                self._reply(R.LOCAL_ERROR)
                return
            if isinstance(reservation, Reply):
                self._reply(reservation, error="MAIL")
                return
            self._pending = reservation
            self._then(checked, self.factory.pipeline.mail, self._connection(), txn)

        def checked(result: Any) -> None:
            reservation, self._pending = self._pending, None
            if result is not None:
                if reservation is not None:
                    reservation.release()
                self._reply(self._refusal(result), error="MAIL")
                return
            self._reset_transaction()
            self._reservation = reservation  # kept until the 250 or the transaction's end
            self.sender = sender
            self._mail = parsed
            self.in_transaction = True
            self._txn = txn
            self.recipients = txn.recipients
            self._reply(R.SENDER_OK)

        self._then(reserved, self._reserve)

    def _reserve(self) -> Deferred[IReservation | Reply] | None:
        """Hold one message against an authenticated user's sending limits (``[limits]``).

        A hold that arrives after the client left is released at once; one
        taken while the MAIL checks run is ``_pending`` (released by ``ended``).
        """
        if not self.user:
            return None
        user = self.user

        def answered(reservation: IReservation | Reply) -> IReservation | Reply:
            if isinstance(reservation, Reply):
                self.runtime.metrics.refused("rate")
                self.log.info("smtp sending limit reached peer={peer} user={user}: {reply}",
                              peer=self.peer, user=user, reply=str(reservation))
            elif self._closed:
                reservation.release()
            return reservation

        d: Deferred[IReservation | Reply] = self.runtime.send_limits.reserve(user).addCallback(answered)
        return d

    # RCPT, RFC 5321 4.1.1.3
    def do_RCPT(self, arg: str) -> None:
        if not self.in_transaction:
            self._reply(R.NEED_MAIL, error="RCPT")
            return
        rcpt = parse_rcpt(arg, self._mail.smtputf8)
        if isinstance(rcpt, Reply):
            self._reply(rcpt, error="RCPT")
            return
        self._rcpt_tried = True
        local = self.config.domains.local
        address = recipient(rcpt.path, local[0] if local else self.config.hostname)
        if isinstance(address, Reply):
            self._reply(address, error="RCPT")
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
                if isinstance(result.value, MailError):
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
                    self.recipients.append(dataclasses.replace(dest, notify=rcpt.notify, orcpt=rcpt.orcpt))
            self._rcpt_count += 1
            self._reply(R.RECIPIENT_OK)

        self._then(done, self.runtime.router.resolve, address, bool(self.user))

    _COMMANDS: dict[str, Callable[[SMTPServer, str], None]] = {}


# Every do_* of the class and its bases (DATA and BDAT are MessageTransfer's).
SMTPServer._COMMANDS = {name[3:]: getattr(SMTPServer, name) for name in dir(SMTPServer) if name.startswith("do_")}
