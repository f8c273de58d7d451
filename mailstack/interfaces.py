"""The seams between packages; tests fake these.

Data flows one way: SMTP session -> IPipeline (the message checks, each an
IMessageCheck) -> IIntake (durable commit) -> queue manager ->
IDeliveryAgent (local maildir, or remote via IMXResolver and the SMTP client)
-> DSN back into IIntake.  POP3 reads what the local agent wrote.
"""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface


class IUserDB(Interface):
    """Users and their password hashes; reloads itself when the file changes."""

    def exists(key: str) -> bool:
        """Whether ``key`` (``Address.key``) is a user.  Cheap; reactor-safe."""

    def check_password(key: str, password: bytes) -> bool:
        """Verify a password in constant time.  Slow and blocking: call in a thread."""

    def keys() -> list[str]:
        """All user keys, sorted."""


class IAliasDB(Interface):
    """Aliases: an address expands to one or more targets, local or remote."""

    def targets(key: str) -> list[str] | None:
        """The direct targets of ``key``, or None if it is no alias.  Reactor-safe."""


class IRouter(Interface):
    """Where a recipient's mail goes (pure once the user and alias files are read)."""

    def resolve(address, authenticated: bool) -> list:
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

    def run_blocking(reader):
        """Deferred firing with ``reader(f)`` run in the thread pool, ``f`` a binary
        file at the start of the client's message (header section as received), for
        checks that need the whole message without holding it in memory."""


class IIncoming(Interface):
    """One message being received; the bytes stream to disk as they arrive."""

    def write(data: bytes) -> None:
        """Append message bytes (dot-unstuffed, CRLF line endings as received)."""

    def message() -> IMessage:
        """The data is complete: the view the end-of-data checks read."""

    def finish(changes=None):
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

    def begin(envelope) -> IIncoming:
        """Start a message for ``envelope.Envelope``; the intake adds Received:."""


class IQueueKicker(Interface):
    """The queue manager as the intake and the admin command see it."""

    def kick(queue_id: str) -> None:
        """A new or changed entry is on disk: look at it now."""


class IDeliveryAgent(Interface):
    """Delivers some recipients of one queue entry."""

    def deliver(entry, recipients):
        """Deferred firing with ``{recipient.address: errors.Reply}``: 2xx
        delivered, 4xx try again later, 5xx failed for good.  Never errbacks
        for a per-recipient problem."""


class IMXResolver(Interface):
    """DNS for outbound mail."""

    def hosts_for(domain: str):
        """Deferred firing with an ordered list of ``mx.Host`` (name, address list
        or None to resolve later, preference).  Errbacks PermanentFailure for
        NXDOMAIN or null MX (RFC 7505: 556 5.1.10), TemporaryFailure for
        SERVFAIL or timeouts."""


class ILoginThrottle(Interface):
    """Brute-force slowdown and lockout shared by SMTP AUTH and POP3."""

    def locked(peer: str, account: str) -> bool:
        """Whether logins from ``peer`` or to ``account`` are refused for now."""

    def failed(peer: str, account: str) -> float:
        """Record a failure; returns the seconds to wait before replying."""

    def succeeded(peer: str, account: str) -> None:
        """Forget the peer's failures."""


class IRuntime(Interface):
    """What ``tap.makeService`` builds once and hands to every listener factory."""

    config = Attribute("config.Config")
    reactor = Attribute("the reactor (clock, TCP, threads)")
    run_blocking = Attribute("f(*a, **kw) -> Deferred: runs f in the thread pool")
    users = Attribute("IUserDB")
    aliases = Attribute("IAliasDB")
    checker = Attribute("twisted.cred ICredentialsChecker for IUsernamePassword; avatarId = user key (str)")
    throttle = Attribute("ILoginThrottle")
    tls = Attribute("tls.TLSConfig: .context_factory() for STARTTLS, STLS and ssl: listeners")
    router = Attribute("IRouter")
    store = Attribute("queue.store.QueueStore")
    intake = Attribute("IIntake")
    pipeline = Attribute("IPipeline: the message checks configured in [pipeline]")
    manager = Attribute("queue.manager.QueueManager (IQueueKicker)")
    maildirs = Attribute("storage.maildir.MaildirStore")


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

    def connect(conn):
        """A client connected (before the greeting).  A Reply is sent instead of
        the banner: 5xx as 554, 4xx as 421 (RFC 5321 section 3.1)."""

    def mail(conn, txn):
        """MAIL FROM was accepted by the session (``txn.sender``, ``txn.params``)."""

    def rcpt(conn, txn, recipient):
        """RCPT TO ``recipient`` (the ``Address`` as given) was routed; its
        destinations join ``txn.recipients`` if every stage accepts."""

    def data_begin(conn, txn):
        """DATA starts: an IMessageObserver for the message bytes, or None.
        Synchronous; keep what the observer learns in ``txn.notes``."""

    def data(conn, txn, message):
        """The message is complete (``message`` provides IMessage).  None, or a
        ``pipeline.Verdict`` (a Reply and/or header changes), or a Deferred of either."""


class ICheckFactory(IPlugin):
    """A Twisted plugin (in a ``mailstack/plugins/`` directory) that builds a check."""

    name = Attribute("str: the check's name in [pipeline] checks")

    def build(runtime, options):
        """An IMessageCheck for this server (``runtime`` provides IRuntime);
        ``options`` is the ``[pipeline.options.<name>]`` table (a dict).  Raise
        ValueError for bad options: the server then does not start."""


class IPipeline(Interface):
    """The configured checks as the SMTP session calls them; the session knows no check.

    Each method returns its answer directly when every stage answered
    synchronously, else a Deferred of it; neither raises nor errbacks (a
    failing stage becomes 451 4.3.0).
    """

    def connect(conn):
        """None (greet) or the Reply that refuses the connection."""

    def mail(conn, txn):
        """None (250) or the Reply that refuses MAIL."""

    def rcpt(conn, txn, recipient):
        """None (250) or the Reply that refuses this RCPT."""

    def data_begin(conn, txn):
        """The IMessageObserver to feed the message bytes to, or None."""

    def data(conn, txn, message):
        """An ``envelope.HeaderChanges`` to commit with (possibly empty), or the
        Reply that refuses the message."""
