"""The seams between packages; tests fake these.

Data flows one way: SMTP session -> IIntake (durable commit) -> queue manager ->
IDeliveryAgent (local maildir, or remote via IMXResolver and the SMTP client)
-> DSN back into IIntake.  POP3 reads what the local agent wrote.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IUserDB(Interface):
    """Users and their password hashes; reloads itself when the file changes."""

    def exists(key: str) -> bool:
        """Whether ``key`` (``Address.key``) is a user.  Cheap; reactor-safe."""

    def check_password(key: str, password: bytes) -> bool:
        """Verify a password in constant time.  Slow and blocking: call in a thread."""

    def stored_hash(key: str) -> str | None:
        """The password hash stored for ``key`` now, or None if it is no user.

        Any password change stores a different value, so a login cache keyed
        with it forgets the old password at once.  Cheap; reactor-safe."""

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
    """Brute-force slowdown and lockout shared by SMTP AUTH and POP3.

    Locks out a client address, or a (client address, account) pair; never an
    account for everyone (that account is slowed down instead).  A login
    attempt is reserved before its password is checked, so attempts in flight
    count against the limits.
    """

    def begin(peer: str, account: str) -> ILoginTicket | None:
        """Reserve one login attempt, before the password check.

        None: refused for now (SMTP replies 454 4.7.0, POP3 ``-ERR [AUTH]``;
        the password is not checked).  Otherwise a ticket: wait
        ``ticket.delay`` seconds, check the password, then call exactly one of
        ``succeeded()``, ``failed()`` or ``abandoned()``.
        """


class ILoginTicket(Interface):
    """One reserved login attempt, from ``ILoginThrottle.begin``."""

    delay = Attribute(
        "seconds to wait before checking the password (an account under a spread "
        "guessing attack is slowed); 0.0 usually"
    )

    def succeeded() -> None:
        """The password was right: release the reservation and record the success."""

    def failed() -> float:
        """The password was wrong: record the failure; the seconds to wait before replying."""

    def abandoned() -> None:
        """No verdict (the check errored): release the reservation, record nothing."""


class ILoginThrottleCompat(Interface):
    """The check-then-record calls the SMTP and POP3 servers make until they use ``begin``.

    These count nothing in flight; ``ILoginThrottle.begin`` replaces all three.
    """

    def locked(peer: str, account: str) -> bool:
        """Whether ``begin(peer, account)`` would refuse now."""

    def failed(peer: str, account: str) -> float:
        """Record a failure; returns the seconds to wait before replying."""

    def succeeded(peer: str, account: str) -> None:
        """Record a success (forgets the pair's failures, not the peer's)."""


class IMetrics(Interface):
    """Counters the server keeps for Prometheus (``metrics.Metrics``), or nothing
    (``metrics.NoMetrics``).  Every call is cheap and reactor-safe."""

    def watch_queue(stats) -> None:
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
    manager = Attribute("queue.manager.QueueManager (IQueueKicker)")
    maildirs = Attribute("storage.maildir.MaildirStore")
