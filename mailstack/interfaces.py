"""The seams between packages; tests fake these.

Data flows one way: SMTP session -> IPipeline (the message checks, each an
IMessageCheck) -> IIntake (durable commit) -> queue manager ->
IDeliveryAgent (local maildir, or remote via IMXResolver and the SMTP client)
-> DSN back into IIntake.  POP3 reads what the local agent wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:  # names for the annotations only: this module imports no Twisted at run time
    from twisted.internet.defer import Deferred

    from mailstack.address import Address
    from mailstack.envelope import Destination, Envelope, HeaderChanges
    from mailstack.mx import Host
    from mailstack.pipeline import Connection, Transaction
    from mailstack.queue.entry import QueueEntry, RecipientState
    from mailstack.queue.store import Recovery


class IUserDB(Interface):
    """Users and their password hashes; reloads itself when the file changes."""

    def exists(key: str) -> bool:
        """Whether ``key`` (``Address.key``) is a user.  Cheap; reactor-safe."""

    def check_password(key: str, password: bytes) -> bool:
        """Verify a password in constant time.  Slow and blocking: call in a thread."""

    def stored_hash(key: str) -> str | None:
        """The password hash stored for ``key`` now, or None if it is no user.

        Any password change stores a different value (a fresh salt), so a login
        cache keyed with it forgets the old password at once, and a session
        compares it with the one taken at login: a user deleted or given a new
        password cannot carry on.  Cheap; reactor-safe."""

    def keys() -> list[str]:
        """All user keys, sorted."""


class IAliasDB(Interface):
    """Aliases: an address expands to one or more targets, local or remote."""

    def targets(key: str) -> list[str] | None:
        """The direct targets of ``key``, or None if it is no alias.  Reactor-safe."""


class IRouter(Interface):
    """Where a recipient's mail goes (pure once the user and alias files are read)."""

    def resolve(address: Address, authenticated: bool) -> list[Destination]:
        """``Address`` -> list of ``routing.Destination`` after alias expansion.

        Raises PermanentFailure(550 5.1.1) for an unknown local user,
        PermanentFailure(550 5.7.1) for a remote domain when not authenticated,
        PermanentFailure(550 5.4.6) for an alias loop that reaches no mailbox
        (RFC 5321 section 4.3.2 has no 554 among the RCPT replies).
        """


class IMessage(Interface):
    """A received message as the end-of-data checks see it (before the commit)."""

    header = Attribute(
        "tuple of (name, raw bytes) fields of the header section, in order: the client's "
        "as received (our Received: excluded), at most headers.HEADER_LIMIT bytes, with "
        "the changes of the checks that ran before.  Compare names case-insensitively."
    )
    size = Attribute("int: octets of the message as the client sent it (dot-unstuffed)")

    def run_blocking(reader: Callable[[IO[bytes]], Any]) -> Deferred[Any]:
        """Deferred firing with ``reader(f)``, ``f`` a binary file at the start of
        the client's message (header section as received), for checks that need
        the whole message without holding it in memory.  ``reader`` runs in the
        thread pool, or at once on the reactor thread when the message is held
        in memory and is at most ``threadpool.INLINE_BYTES`` long (reading it
        blocks nothing, and a pool call would cost more than the work)."""


class IIncoming(Interface):
    """One message being received; the bytes stream to disk as they arrive."""

    def write(data: bytes) -> None:
        """Append message bytes (dot-unstuffed, CRLF line endings as received)."""

    def message() -> IMessage:
        """The data is complete: the view the end-of-data checks read."""

    def finish(changes: HeaderChanges | None = None) -> Deferred[str]:
        """Commit durably, with ``envelope.HeaderChanges`` applied to the header
        section first (so a retry never applies them twice).  Deferred firing with
        the queue id only after fsync of file and directory; errback
        TemporaryFailure (451 4.3.0, or 452 4.3.1 on a full disk) or
        PermanentFailure (552 5.3.4: header section too big) leaving nothing
        half-written."""

    def abort() -> None:
        """Discard what was written (client went away, size exceeded, refused)."""


class IIntake(Interface):
    """The only door for new mail: SMTP sessions and DSNs both come in here."""

    def begin(envelope: Envelope) -> IIncoming:
        """Start a message for ``envelope.Envelope``; the intake adds Received:."""

    def wait_idle() -> Deferred[None]:
        """Deferred firing once no commit is in progress (graceful shutdown)."""


class IQueueKicker(Interface):
    """The queue manager as the intake and the admin command see it."""

    def kick(queue_id: str) -> None:
        """A new or changed entry is on disk: look at it now."""


class IDeliveryAgent(Interface):
    """Delivers some recipients of one queue entry (the queue manager's view)."""

    takes_message = Attribute(
        "bool: ``deliver`` accepts ``message=``, the bytes of a small message the "
        "manager already read in its thread call (so the agent opens no file)"
    )

    def deliver(entry: QueueEntry, recipients: list[RecipientState], message: bytes | None = None) -> Deferred[Any]:
        """Deferred firing with ``{recipient.address: errors.Reply}``: 2xx
        delivered, 4xx try again later, 5xx failed for good.  Never errbacks
        for a per-recipient problem.  ``message``: the message bytes, or None
        to read ``entry``'s message file (only given when ``takes_message``)."""

    def close_idle() -> None:
        """Shutting down: keep no connection for reuse; idle ones are closed now."""

    def abort_all() -> None:
        """Shutting down after the grace period: drop every connection at once;
        the attempts in progress end with a temporary failure."""


class IDirectDelivery(Interface):
    """Delivery into local Maildirs straight from the intake, before the 250.

    ``deliver_direct`` blocks and runs in the thread pool; the intake queues
    whatever it could not deliver.
    """

    def direct_ok(entry: QueueEntry) -> bool:
        """Whether ``QueueEntry`` ``entry`` may take the direct path (every recipient local)."""

    def deliver_direct(entry: QueueEntry, source: bytes | str) -> list[BaseException | None]:
        """Write, fsync and move into ``new/`` every recipient's copy (each
        folder fsynced); ``source`` is the message bytes or the path of its
        file.  Raises if a copy cannot be written (then none is left); else per
        recipient None (delivered) or the error (that copy is taken back)."""


class IMaildirStore(Interface):
    """Every user's Maildir, as the local delivery agent writes to it.

    All methods block.  Delivery is ``prepare`` (the copy written and
    fsynced in ``tmp/``) then ``publish`` (renamed into ``new/``, one fsync
    per folder, shared with the threads publishing there at the same time).
    """

    def path_for(address: Address | str) -> str:
        """The Maildir of ``address``; AddressError for a name that is no safe path."""

    def deliver(address: Address | str, source: bytes | str, prefix: bytes = b"") -> str:
        """``prepare`` and ``publish`` of one copy; returns its file name."""

    def prepare(address: Address | str, source: bytes | str, prefix: bytes = b"") -> Any:
        """Write ``prefix`` then ``source`` (bytes or a file path) into ``tmp/``
        and fsync it; returns a ``storage.maildir.Pending``.  Raises OSError or
        AddressError with nothing left behind."""

    def publish(pending: list[Any]) -> list[BaseException | None]:
        """Rename prepared copies into ``new/``; per copy None or its error
        (a failed copy is taken back)."""

    def discard(pending: Any) -> None:
        """Drop a prepared copy that will not be published."""


class IMXResolver(Interface):
    """DNS for outbound mail."""

    def hosts_for(domain: str) -> Deferred[list[Host]]:
        """Deferred firing with an ordered list of ``mx.Host`` (name, address list
        or None to resolve later, preference).  Errbacks PermanentFailure for
        NXDOMAIN or null MX (RFC 7505: 556 5.1.10), TemporaryFailure for
        SERVFAIL or timeouts."""

    def addresses(name: str) -> Deferred[list[str]]:
        """Deferred firing with the A then AAAA addresses of host ``name`` (the
        smarthost).  Errbacks TemporaryFailure when there is none: a smarthost
        that cannot be found is never the sender's problem."""


class IMessageSource(Interface):
    """The bytes of a message being relayed, read chunk by chunk."""

    whole = Attribute(
        "The whole message when it is held in memory (bytes): then it is sent in one"
        " write, without reads; None for a file, which is read chunk by chunk."
    )

    def read(size: int) -> Deferred[bytes]:
        """Deferred firing with up to ``size`` bytes, ``b""`` at the end.  A file
        is read in the thread pool, so the reactor never waits for the disk."""

    def close() -> None:
        """Release the source (close its file)."""


class IQueueStore(Interface):
    """The committed queue on disk, as the manager and the admin command use it.

    Every method blocks (from the reactor, call it in the thread pool).
    Entries are ``queue.entry.QueueEntry``; an unknown id raises
    ``queue.store.NoSuchEntry`` (a KeyError), an unreadable envelope
    ``CorruptEntry`` (a NoSuchEntry) once it has been moved aside.
    """

    def message_path(queue_id: str) -> str:
        """The file holding the message bytes when they are not inside the
        envelope (NoSuchEntry for a malformed id)."""

    def envelope_path(queue_id: str) -> str:
        """The file holding the envelope, the entry's commit record."""

    def ids() -> list:
        """Ids of all committed entries, oldest first; reads directory names only."""

    def read_envelope(queue_id: str) -> tuple:
        """``(raw envelope bytes, attempt mark)`` from one open; NoSuchEntry if gone."""

    def load(queue_id: str) -> QueueEntry:
        """The entry; NoSuchEntry, or CorruptEntry after moving it aside."""

    def load_message(queue_id: str) -> tuple:
        """``(entry, message)`` from one read: the message bytes when they are
        inside the envelope, else None (they are in ``message_path``).  As ``load``."""

    def read_message(queue_id: str) -> bytes:
        """The whole message, wherever it is stored."""

    def message_headers(queue_id: str, limit: int) -> bytes:
        """The message's header section, up to ``limit`` bytes; b"" if unreadable."""

    def scan() -> Iterator[QueueEntry]:
        """Every readable committed entry, oldest first."""

    def save(entry: QueueEntry, keep_hold: bool = False) -> None:
        """Replace the envelope durably (new attempt state); drops the attempt mark.
        ``keep_hold``: the hold of the envelope on disk is kept (it is the admin command's)."""

    def mark_attempt(queue_id: str, not_before: float) -> None:
        """Record an attempt in progress: no retry before ``not_before``, even
        after a process crash (a system crash may lose it: an earlier retry).
        NoSuchEntry if the entry is gone."""

    def attempt_mark(queue_id: str) -> float:
        """The time ``mark_attempt`` set, or 0.0."""

    def remove(queue_id: str, sync: bool = True, message_file: bool = True) -> bool:
        """Drop the entry, envelope first; False if there was no envelope.
        ``sync`` makes the envelope removal durable; ``message_file=False``:
        the message was inside the envelope (no file to unlink)."""

    def recover(read_envelopes: bool = True) -> Recovery:
        """At start, before any commit: clean up what a crash left (``Recovery``)."""

    def request_flush() -> None:
        """Ask the running manager to retry everything now."""

    def flush_requested() -> bool:
        """True once per flush request (consumes it)."""

    def request_kick(queue_id: str) -> None:
        """Ask the running manager to look at one entry again (released, deleted)."""

    def kicks_requested() -> list:
        """Ids of the kick requests since the last call (consumes them)."""


class IQueueCommit(Interface):
    """The intake's side of the queue store: new messages, committed one call each.

    ``commit`` makes a message durable and visible (a message given as bytes
    goes inside its envelope); concurrent commits share their directory
    fsyncs.  The protocol is in ``queue/store.py``.  Every method blocks.
    """

    def new_id() -> str:
        """A fresh queue id, sortable by arrival."""

    def tmp_path(queue_id: str) -> str:
        """Where a message being received is spilled."""

    def open_tmp(queue_id: str) -> IO[bytes]:
        """Create ``tmp_path(queue_id)`` exclusively, open for buffered writes."""

    def commit(entry: QueueEntry, data: bytes | None = None) -> None:
        """Make the message (``data``, or the file at ``tmp_path(entry.id)``) a
        queued entry, fsynced and visible; on error nothing of it is left and
        the error is raised."""

    def discard(queue_id: str) -> None:
        """Remove every file of an entry that was not accepted (best effort)."""


class ILoginThrottle(Interface):
    """Brute-force slowdown and lockout shared by SMTP AUTH and POP3.

    Locks out a client address, or a (client address, account) pair; never an
    account for everyone (that account is slowed down instead).  A login
    attempt is reserved before its password is checked, so attempts in flight
    count against the limits.  Asynchronous because the counts may live in
    another process (the master's, over AMP); in one process it answers at once.
    """

    def begin(peer: str, account: str) -> Deferred:
        """Reserve one login attempt, before the password check: Deferred[ILoginTicket | None].

        None: refused for now (SMTP replies 454 4.7.0, POP3 ``-ERR [AUTH]``;
        the password is not checked).  Otherwise a ticket: wait
        ``ticket.delay`` seconds, check the password, then call exactly one of
        ``succeeded()``, ``failed()`` or ``abandoned()``.
        """


class ILoginTicket(Interface):
    """One reserved login attempt, from ``ILoginThrottle.begin``; the first verdict ends it."""

    delay = Attribute(
        "seconds to wait before checking the password (an account under a spread "
        "guessing attack is slowed); 0.0 usually"
    )

    def succeeded() -> None:
        """The password was right: release the reservation and record the success."""

    def failed() -> Deferred:
        """The password was wrong: record the failure; Deferred[float], the seconds
        to wait before replying (0.0 for a ticket already ended)."""

    def abandoned() -> None:
        """No verdict (the check errored): release the reservation, record nothing."""


class IConnectionSlots(Interface):
    """The connection caps of one listener kind (``connlimit``)."""

    def acquire(host: str) -> Deferred[str | None]:
        """Take a slot for a session from ``host``: fires None, or ``connlimit.TOTAL``/``PER_IP``
        when a cap is reached (no slot taken)."""

    def release(host: str) -> None:
        """Give back the slot a successful ``acquire(host)`` took."""


class IMetrics(Interface):
    """Counters the server keeps for Prometheus (``metrics.Metrics``), or nothing
    (``metrics.NoMetrics``).  Every call is cheap and reactor-safe."""

    def watch_queue(stats: Callable[[], Any]) -> None:
        """Read the queue gauges from ``stats() -> metrics.QueueStats`` at each scrape."""

    def accepted(listener: str) -> None:
        """One message got 250 after DATA on ``listener`` (smtp, submission, submissions)."""

    def refused(reason: str) -> None:
        """A command or message was refused; ``reason`` one of ``metrics.REASONS``."""

    def delivered(agent: str, latency: float) -> None:
        """One recipient delivered by ``agent`` (local, remote), ``latency`` s after acceptance."""

    def deferred(agent: str) -> None:
        """One recipient will be retried."""

    def bounced(agent: str) -> None:
        """One recipient failed for good."""

    def session_opened(protocol: str) -> None:
        """A connection of ``protocol`` (smtp, pop3) began."""

    def session_closed(protocol: str) -> None:
        """That connection ended (exactly once per ``session_opened``)."""

    def tls_established(version: str) -> None:
        """A TLS handshake completed with ``version`` (``TLSv1.3``)."""

    def auth_failed(protocol: str) -> None:
        """A login failed (SMTP AUTH or POP3)."""

    def dns_lookup(seconds: float) -> None:
        """A DNS lookup took ``seconds``."""

    def exposition() -> bytes:
        """Every series in the Prometheus text format (empty: no metrics kept)."""


class ITLSSettings(Interface):
    """The server's certificate.  Also an ``IOpenSSLContextFactory`` (that
    interface's ``getContext``), so it serves ``ssl:`` listeners; declared
    here without it so this module imports no Twisted."""

    def getContext() -> Any:
        """The OpenSSL context of the current certificate (``ssl:`` listeners)."""

    def context_factory() -> Any:
        """A context factory for ``startTLS`` (STARTTLS, STLS), with the current certificate."""


class IRuntime(Interface):
    """What ``tap.makeService`` builds once and hands to every listener factory."""

    config = Attribute("config.Config")
    reactor = Attribute("the reactor (clock, TCP, threads)")
    run_blocking = Attribute("f(*a, **kw) -> Deferred: runs f in the thread pool")
    users = Attribute("IUserDB")
    aliases = Attribute("IAliasDB")
    checker = Attribute("twisted.cred ICredentialsChecker for IUsernamePassword; avatarId = user key (str)")
    throttle = Attribute("ILoginThrottle")
    tls = Attribute("ITLSSettings (tls.TLSConfig): .context_factory() for STARTTLS, STLS and ssl: listeners")
    router = Attribute("IRouter")
    store = Attribute("queue.store.QueueStore (IQueueStore, IQueueCommit)")
    intake = Attribute("IIntake")
    pipeline = Attribute("IPipeline: the message checks configured in [pipeline]")
    signer = Attribute("dkim.signer.IDKIMSigner: signs submitted mail and our DSNs")
    manager = Attribute("queue.manager.QueueManager (IQueueKicker)")
    maildirs = Attribute("storage.maildir.MaildirStore")
    smtp_connections = Attribute("IConnectionSlots over the MX (smtp) listeners (smtp.max_connections*)")
    submission_connections = Attribute(
        "IConnectionSlots over submission and submissions (submission.max_connections*)"
    )
    pop3_connections = Attribute(
        "IConnectionSlots over the pop3 and pop3s listeners (pop3.max_connections*)"
    )
    send_limits = Attribute("ISendLimits (sendlimits.SendLimits): [limits] per authenticated user, reserve at MAIL")
    metrics = Attribute("IMetrics: metrics.Metrics with listen.metrics, else metrics.NoMetrics")


class IDrainable(Interface):
    """A listener factory whose sessions can be wound down (graceful shutdown)."""

    def drain(timeout: float) -> Deferred[None]:
        """Refuse new sessions, let the ones in flight finish, drop what is left
        after ``timeout`` seconds; Deferred firing (None) when all are gone."""


class IMessageObserver(Interface):
    """Sees a message's bytes as they arrive (a body hash without holding the message)."""

    def write(data: bytes) -> None:
        """The next bytes of the client's message: dot-unstuffed, CRLF line
        endings, header section included (our Received: is not)."""


class IMessageCheck(Interface):
    """One stage of the message pipeline (a policy check, a header it adds).

    Every method gets the ``pipeline.Connection`` and, from MAIL on, the
    ``pipeline.Transaction``; their ``notes`` dicts carry results to later
    stages (key them by the check's name).  A method returns None to go on,
    an ``errors.Reply`` to refuse (4xx: try later, 5xx: refused; the first
    Reply stops the stages after it), or a Deferred of either.  An exception
    is logged and answered 451 4.3.0: the client never sees its text.  Reply
    texts must not reveal configuration or internal detail.
    """

    name = Attribute("str: the name that enables the check in [pipeline] checks; log tag")
    mx = Attribute("bool: runs in MX sessions of unauthenticated clients")
    submission = Attribute("bool: runs in authenticated sessions (submission listeners, or AUTH on the MX listener)")

    def connect(conn: Connection) -> Any:
        """A client connected (before the greeting).  A Reply is sent instead of
        the banner: 5xx as 554, 4xx as 421 (RFC 5321 section 3.1)."""

    def mail(conn: Connection, txn: Transaction) -> Any:
        """MAIL FROM was accepted by the session (``txn.sender``, ``txn.params``)."""

    def rcpt(conn: Connection, txn: Transaction, recipient: Address) -> Any:
        """RCPT TO ``recipient`` (the ``Address`` as given) was routed; its
        destinations join ``txn.recipients`` if every stage accepts."""

    def data_begin(conn: Connection, txn: Transaction) -> IMessageObserver | None:
        """DATA starts: an IMessageObserver for the message bytes, or None.
        Synchronous; keep what the observer learns in ``txn.notes``."""

    def data(conn: Connection, txn: Transaction, message: IMessage) -> Any:
        """The message is complete (``message`` provides IMessage).  None, or a
        ``pipeline.Verdict`` (a Reply and/or header changes), or a Deferred of either."""


class IPipeline(Interface):
    """The configured checks as the SMTP session calls them; the session knows no check.

    Each method returns its answer directly when every stage answered
    synchronously, else a Deferred of it; neither raises nor errbacks (a
    failing stage becomes 451 4.3.0).
    """

    def connect(conn: Connection) -> Any:
        """None (greet) or the Reply that refuses the connection."""

    def mail(conn: Connection, txn: Transaction) -> Any:
        """None (250) or the Reply that refuses MAIL."""

    def rcpt(conn: Connection, txn: Transaction, recipient: Address) -> Any:
        """None (250) or the Reply that refuses this RCPT."""

    def data_begin(conn: Connection, txn: Transaction) -> IMessageObserver | None:
        """The IMessageObserver to feed the message bytes to, or None."""

    def data(conn: Connection, txn: Transaction, message: IMessage) -> Any:
        """An ``envelope.HeaderChanges`` to commit with (possibly empty), or the
        Reply that refuses the message."""


class ISendLimits(Interface):
    """Per-user sending limits (``[limits]``): one message held from MAIL to its end.

    Asynchronous because the counts may live in another process; in one
    process it answers at once.
    """

    def reserve(user: str) -> Deferred:
        """Deferred[errors.Reply | IReservation]: a hold on one message of ``user``,
        or the 451 4.7.1 reply naming the limit that is reached."""


class IReservation(Interface):
    """One message held against a user's sending limits; the first of commit/release ends it."""

    user = Attribute("the user key the message counts for")

    def commit() -> None:
        """The message was accepted: count it."""

    def release() -> None:
        """The transaction ended without a message: free the hold."""


class IRateLimit(Interface):
    """Events per key over a rolling window (the MX listener's messages per client address)."""

    def admit(key: str) -> Deferred:
        """Deferred[bool]: True when ``key`` was under the limit, and the event is
        counted; False (nothing counted) when it is over."""
