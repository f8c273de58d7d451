# -*- test-case-name: tests.smtp.test_smtp_server,tests.smtp.test_bdat -*-
"""Message transfer of an ESMTP session: DATA (RFC 5321 section 4.1.1.4) and
BDAT (RFC 3030), from the 354 or the first chunk to the 250 after the commit.

``SMTPServer`` (``smtp.server``) is built on this class: the session there
owns HELO, AUTH, MAIL and RCPT and hands the accepted transaction over; here
the message bytes are decoded (``smtp.data.DataDecoder``: only ``CRLF.CRLF``
ends DATA, no content byte is ever read as a command; ``smtp.bdat``: exact
octet counts), streamed to the intake and to the pipeline's observers, checked
by the pipeline at the end, and committed; the only 250 comes from the
commit's callback.  Whatever the client pipelined behind a refused DATA is
content, never commands: it is discarded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailstack.address import Address
from mailstack.config import Config
from mailstack.envelope import Destination, Envelope
from mailstack.errors import MailError, Reply
from mailstack.interfaces import IIncoming, IReservation, IRuntime
from mailstack.logsafe import escape
from mailstack.pipeline import Connection, Transaction
from mailstack.session import CommandSession
from mailstack.smtp import replies as R
from mailstack.smtp.bdat import ChunkDecoder, Skip, parse_bdat
from mailstack.smtp.data import DataDecoder
from mailstack.smtp.policy import ListenerPolicy
from mailstack.smtp.syntax import MailFrom

if TYPE_CHECKING:
    from mailstack.smtp.factory import SMTPFactory

# Session modes.
COMMAND = "command"
DATA = "data"
AUTH = "auth"


class MessageTransfer(CommandSession):
    """DATA and BDAT for one ESMTP session (see the module docstring)."""

    log = Logger()

    # The session state this part reads, kept by ``smtp.server.SMTPServer``.
    factory: SMTPFactory
    runtime: IRuntime
    config: Config
    policy: ListenerPolicy
    mode: str
    user: str
    helo: str | None
    esmtp: bool
    sender: Address | None
    recipients: list[Destination]
    in_transaction: bool
    messages: int
    _rcpt_tried: bool
    _mail: MailFrom
    _txn: Transaction | None
    _observer: Any
    _decoder: DataDecoder | ChunkDecoder | None
    _incoming: IIncoming | None
    _write_failed: bool
    _reservation: IReservation | None

    def _reply(self, reply: Reply, error: str = "") -> None:
        raise NotImplementedError

    def _reset_transaction(self) -> None:
        raise NotImplementedError

    def _refusal(self, result: Reply | Failure) -> Reply:
        raise NotImplementedError

    def _connection(self) -> Connection:
        raise NotImplementedError

    def closing(self) -> None:
        if self._incoming is not None:
            self._abort_incoming()

    def _abort_incoming(self) -> None:
        incoming, self._incoming = self._incoming, None
        self._decoder = None
        if incoming is not None:
            try:
                incoming.abort()
            except Exception:
                self.log.failure("smtp: aborting an incoming message failed", peer=self.peer)

    # DATA, RFC 5321 4.1.1.4
    def do_DATA(self, arg: str) -> None:
        if not self.user and self.config.smtp.forbid_unauth_pipelining and self._pending_input():
            # RFC 2920 section 3.1: DATA ends a group; a client that sends on before
            # the 354 is not speaking SMTP (the SMTP smuggling class): drop it.
            self.log.info("smtp improper pipelining after DATA peer={peer}", peer=self.peer)
            self._reply(R.PIPELINING_FORBIDDEN, error="DATA")
            self._close()
            return
        self._begin_data(arg)
        if self.mode == DATA:
            self._set_deadline(self.config.smtp.data_total_timeout, self._data_expired)
        else:
            # Refused: what the client sent behind DATA is message content, never commands.
            dropped = self._discard_input()
            if dropped:
                self.log.info(
                    "smtp discarded {size} bytes pipelined after a refused DATA peer={peer}",
                    size=dropped,
                    peer=self.peer,
                )

    def _data_expired(self) -> None:
        """``smtp.data_total_timeout``: a byte now and then resets the idle timer, not this."""
        self.log.info("smtp DATA time limit reached peer={peer} user={user}", peer=self.peer, user=self.user)
        self._reply(R.TIMEOUT)
        self._close()  # aborts the message (closing)

    def _begin_data(self, arg: str) -> None:
        if arg:
            self._reply(R.SYNTAX, error="DATA")
            return
        if self._incoming is not None:  # RFC 3030 section 3: BDAT and DATA do not mix
            self._reply(R.DATA_AFTER_BDAT, error="DATA")
            return
        refusal = self._begin_message()
        if refusal is not None:
            self._reply(refusal, error="DATA")
            return
        self._decoder = DataDecoder(self._sink, self.config.smtp.max_message_size)
        self.mode = DATA
        self._raw = self._data_chunk
        self._reply(R.START_DATA)

    def _begin_message(self) -> Reply | None:
        """Open the intake for the transaction's message (DATA or the first BDAT); the refusal if not."""
        if not self.in_transaction:
            return R.NEED_MAIL
        if not self.recipients:
            return R.NO_VALID_RECIPIENTS if self._rcpt_tried else R.NEED_RCPT
        envelope = Envelope(
            sender=self.sender,
            recipients=tuple(self.recipients),
            helo=self.helo or "",
            peer=self.peer,
            protocol=self._protocol_name(),
            tls=self._tls_description(),
            user=self.user,
            ret=self._mail.ret,
            envid=self._mail.envid,
            smtputf8=self._mail.smtputf8,
        )
        try:
            self._incoming = self.runtime.intake.begin(envelope)
        except MailError as e:
            self._reset_transaction()
            return e.reply
        except Exception:
            self.log.failure("smtp: intake.begin failed", peer=self.peer)
            self._reset_transaction()
            return R.LOCAL_ERROR
        self._write_failed = False
        self._observer = self.factory.pipeline.data_begin(self._connection(), self._txn)
        return None

    # BDAT, RFC 3030 (parsing and counting: smtp.bdat)
    def do_BDAT(self, arg: str) -> None:
        parsed = parse_bdat(arg)
        if isinstance(parsed, Reply):  # no count to consume: the octets cannot be told from commands
            self._reply(parsed, error="BDAT")
            return
        size, last = parsed
        if self._incoming is None:
            refusal = self._begin_message()
            if refusal is not None:
                self._read_chunk(Skip(size), lambda: self._reply(refusal, error="BDAT"))
                return
            self._decoder = ChunkDecoder(self._sink, self.config.smtp.max_message_size)
        decoder = self._decoder
        assert isinstance(decoder, ChunkDecoder)
        decoder.expect(size)
        self._read_chunk(decoder, lambda: self._chunk_done(decoder, size, last))

    def _read_chunk(self, reader: Skip | ChunkDecoder, then: Callable[[], None]) -> None:
        """Consume the chunk's octets whatever becomes of them, then answer (RFC 3030 section 3)."""
        if reader.remaining == 0:
            then()
            return

        def consume(data: bytes) -> None:
            rest = reader.feed(data)
            if rest is not None:
                self.mode = COMMAND
                self._raw = None
                self._unread(rest)
                then()

        self.mode = DATA
        self._raw = consume

    def _chunk_done(self, decoder: ChunkDecoder, size: int, last: bool) -> None:
        if last:
            decoder.finish()
        if last or decoder.too_big or decoder.bare_newline or self._write_failed:
            self._end_data()  # commits, or refuses and ends the transaction
            return
        self._reply(R.chunk_ok(size))

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

    def _data_chunk(self, chunk: bytes) -> None:
        """Message bytes in DATA mode (the session's raw consumer)."""
        assert self._decoder is not None
        rest = self._decoder.feed(chunk)
        if rest is not None:
            self._unread(rest)
            self._end_data()

    def _end_data(self) -> None:
        decoder, incoming = self._decoder, self._incoming
        assert decoder is not None and incoming is not None
        self._clear_deadline()
        self.mode = COMMAND
        self._raw = None
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
        # Committed or released with the outcome, even if the client leaves meanwhile.
        reservation, self._reservation = self._reservation, None
        if reservation is not None:
            d.addBoth(_settle, reservation)

        def done(result: Any) -> None:
            self._incoming = None
            self._reset_transaction()
            if isinstance(result, Failure):
                # Our failure, not the client's: answered, logged, not counted as an error.
                if isinstance(result.value, MailError):
                    reply = result.value.reply
                    self.log.info("smtp commit refused peer={peer} user={user}: {reply}",
                                  peer=self.peer, user=self.user, reply=escape(str(reply)))
                else:
                    self.log.failure("smtp: commit failed", result, peer=self.peer)
                    reply = R.LOCAL_ERROR
                self._reply(reply)
                return
            queue_id = str(result)
            self.messages += 1
            self.runtime.metrics.accepted(self.policy.kind)
            # The intake logged the acceptance: one event per message, not two.
            # The only 250 after DATA comes from the commit's callback: the
            # message and its directory entry are fsynced by then.
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


def _settle(outcome: Any, reservation: IReservation) -> Any:
    """Count the committed message against the sending limits, or free its hold; pass ``outcome`` on."""
    if isinstance(outcome, Failure):
        reservation.release()
    else:
        reservation.commit()
    return outcome
