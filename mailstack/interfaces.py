"""The seams between packages; tests fake these.

Data flows one way: SMTP session -> IIntake (durable commit) -> queue manager ->
IDeliveryAgent (local maildir, or remote via IMXResolver and the SMTP client)
-> DSN back into IIntake.  POP3 reads what the local agent wrote.
"""

from __future__ import annotations

from twisted.internet.interfaces import IOpenSSLContextFactory
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


class IIncoming(Interface):
    """One message being received; the bytes stream to disk as they arrive."""

    def write(data: bytes) -> None:
        """Append message bytes (dot-unstuffed, CRLF line endings as received)."""

    def finish():
        """Commit durably.  Deferred firing with the queue id only after fsync of
        file and directory; errback TemporaryFailure (451 4.3.0, or 452 4.3.1 on
        a full disk) leaving nothing half-written."""

    def abort() -> None:
        """Discard what was written (client went away, size exceeded)."""


class IIntake(Interface):
    """The only door for new mail: SMTP sessions and DSNs both come in here."""

    def begin(envelope) -> IIncoming:
        """Start a message for ``envelope.Envelope``; the intake adds Received:."""

    def wait_idle():
        """Deferred firing once no commit is in progress (graceful shutdown)."""


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


class ITLSSettings(IOpenSSLContextFactory):
    """The server's certificate; as an ``IOpenSSLContextFactory`` it serves ``ssl:`` listeners."""

    def context_factory():
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
    store = Attribute("queue.store.QueueStore")
    intake = Attribute("IIntake")
    manager = Attribute("queue.manager.QueueManager (IQueueKicker)")
    maildirs = Attribute("storage.maildir.MaildirStore")
    smtp_connections = Attribute("connlimit.ConnectionLimiter over all SMTP listeners (smtp.max_connections*)")
    pop3_connections = Attribute("connlimit.ConnectionLimiter over the pop3 and pop3s listeners (pop3.max_connections)")
    smtp_rate = Attribute("smtp.ratelimit.RateLimiter: limits.messages_per_hour per authenticated user")


class IDrainable(Interface):
    """A listener factory whose sessions can be wound down (graceful shutdown)."""

    def drain(timeout: float):
        """Refuse new sessions, let the ones in flight finish, drop what is left
        after ``timeout`` seconds; Deferred firing (None) when all are gone."""
