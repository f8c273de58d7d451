# -*- test-case-name: tests.delivery.test_remote -*-
"""Remote delivery: one attempt per (queue entry, destination domain).

``RemoteAgent.deliver(entry, recipients)`` (IDeliveryAgent):

1. Hosts: the smarthost (``relay.smarthost``) or
   ``IMXResolver.hosts_for(domain)``.  A DNS failure answers every recipient
   with its reply (NXDOMAIN and null MX permanent, SERVFAIL temporary).  An
   address that is one of our own SMTP listening addresses on the relay port
   is a loop (554 5.4.6, ``ownaddr``), never connected to.
   TLS per hop (``_tls_policy``): AUTH at the smarthost (``relay.smarthost_user``)
   is only ever sent over STARTTLS with a certificate verified for the
   smarthost's name (system store plus ``relay.tls_ca_file``): a password must
   not go to whoever can intercept the connection.  Without credentials the
   smarthost gets opportunistic TLS like any MX (a LAN relay or test sink
   without STARTTLS gets the mail in plain text).  ``relay.tls_verify``
   makes verified TLS mandatory for every hop.  MTA-STS (RFC 8461, ``IMTASTS``):
   for a domain whose policy is ``enforce``, only MX hosts matching the policy
   are tried, each with verified TLS (section 5), else the recipients stay
   deferred with 4.7.5; ``testing`` only logs mismatches (section 5.2).
2. Each address of each host in order, at most ``MAX_ADDRESSES``: connect
   through ``endpoint_factory(ip, port)``; a refused or timed-out connection,
   a 4xx/5xx greeting, a failed EHLO/STARTTLS/AUTH or a refused MAIL moves on
   to the next address (the backup MX).  A TLS handshake that fails on an
   opportunistic STARTTLS is retried once in plaintext (RFC 7435 section 6).
   ``relay.tls_verify`` makes TLS mandatory and verified (like Postfix's
   ``verify`` level): no plaintext, no unverified certificate.
3. The transaction on the first host that takes it gives per-recipient
   replies: 2xx delivered, 4xx deferred, 5xx failed.  Connections are kept
   per address (Postfix's connection cache): an idle one waits ``IDLE_TIME``
   seconds for the next message, up to ``MAX_TRANSACTIONS`` per connection.
   A message for an address whose connection is busy with one transaction
   and offers PIPELINING rides behind it -- its MAIL, RCPT and DATA go out
   with the other message's data (RFC 2920 3.1) -- before an idle
   connection is used: one round trip per message instead of two, and no
   TLS handshake for a new connection.  Not behind a server that is slow
   to answer the data (``RIDE_MAX_DATA_TIME``): there parallel sessions
   are worth more than round trips.
4. When no host took the transaction, every recipient gets a temporary
   reply naming the last problem -- unless every host that answered refused
   MAIL FROM with 5xx, which is permanent.  AUTH failures at the smarthost
   are temporary, never a bounce.

Replies are ``RemoteReply`` (a Reply with ``host`` and ``ip``) so the queue
manager can log and record where the answer came from.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from mailstack import logsafe
from mailstack.config import Config
from mailstack.delivery import replies as OR
from mailstack.delivery.replies import RemoteReply, at_host
from mailstack.dnsresolver import CachingResolver
from mailstack.errors import MailError, Reply
from mailstack.interfaces import IDeliveryAgent, IMessageSource, IMXResolver, IQueueStore
from mailstack.mtasts import IMTASTS, Policy, mx_allowed
from mailstack.mx import Host, literal_address, split_hostport
from mailstack.netpolicy import is_own_address
from mailstack.queue.entry import QueueEntry, RecipientState
from mailstack.smtp.client import HostFailure, SMTPClientProtocol
from mailstack.smtp.data import FileSource, MemorySource
from mailstack.smtp.extensions import Request
from mailstack.tls import ClientTLS

MAX_ADDRESSES = 10  # addresses tried per attempt (Postfix smtp_mx_address_limit is 5)
# Connection reuse (Postfix's connection cache): an idle session waits this long
# for the next message to the same address, for at most this many transactions;
# at most this many sessions per address are kept for reuse.
IDLE_TIME = 2.0
MAX_TRANSACTIONS = 100
MAX_POOLED_PER_ADDRESS = 32
# A message rides behind a busy connection's transaction only if that server
# took at most this long from the last message's data to its final reply; a
# slower one (content scanning) gets the message on another connection, so
# that the server's work runs in parallel instead of in a row.
RIDE_MAX_DATA_TIME = 0.25


@implementer(IDeliveryAgent)
class RemoteAgent:
    """See the module docstring."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        resolver: IMXResolver,
        endpoint_factory: Callable[[str, int], IStreamClientEndpoint],
        clock: IReactorTime,
        message_path: Callable[[str], str],
        *,
        run_blocking: Callable[..., Deferred],
        tls_factory: Callable[[str], IOpenSSLClientConnectionCreator] | None = None,
        verified_tls: Callable[[str], IOpenSSLClientConnectionCreator] | None = None,
        smarthost_password: str = "",
        mta_sts: IMTASTS | None = None,
        own_addresses: dict[int, tuple[str, ...]] | None = None,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.endpoint_factory = endpoint_factory
        self.clock = clock
        self.message_path = message_path
        # Opportunistic TLS (RFC 7435), and TLS verified for the server's name
        # against the system store plus relay.tls_ca_file (``_tls_policy``).
        self.tls_factory = tls_factory if tls_factory is not None else ClientTLS(False)
        if verified_tls is None:
            from mailstack.trust import trust_root

            verified_tls = ClientTLS(True, trust_root(config.relay.tls_ca_file))
        self.verified_tls = verified_tls
        self.mta_sts = mta_sts
        self.own_addresses = own_addresses or {}
        self.smarthost_password = smarthost_password
        self.run_blocking = run_blocking
        self._clients: set[SMTPClientProtocol] = set()
        self._pool: dict[tuple, list[SMTPClientProtocol]] = {}  # reusable connections per address, idle or busy
        self._idle_timers: dict[SMTPClientProtocol, IDelayedCall] = {}
        self._closing = False  # close_idle: keep no connection for reuse
        self._aborted = False  # abort_all: make no new connection
        self._smarthost_literal: tuple | None = None  # ((Host,), port) of a smarthost given as an address

    # -- IDeliveryAgent -----------------------------------------------------

    # The queue manager may hand over the message bytes it read in its thread
    # call (small messages), so the reactor thread opens no file.
    takes_message = True

    def deliver(self, entry: QueueEntry, recipients: list[RecipientState], message: bytes | None = None) -> Deferred:
        return Deferred.fromCoroutine(self._deliver_all(entry, recipients, message))

    async def _deliver_all(
        self, entry: QueueEntry, recipients: list[RecipientState], message: bytes | None
    ) -> dict[str, Reply]:
        by_domain: dict[str, list[RecipientState]] = {}
        for r in recipients:
            by_domain.setdefault(r.domain, []).append(r)
        results: dict[str, Reply] = {}
        for domain, rcpts in by_domain.items():
            results.update(await self._deliver_domain(entry, domain, [r.address for r in rcpts], message))
        return results

    def abort_all(self) -> None:
        """Drop every connection and make no new one (shutdown after the grace period).

        The attempts in progress end with a temporary reply; their recipients
        stay queued (the attempt mark is on disk) and are tried after the restart.
        """
        self._aborted = True
        self.close_idle()
        for client in list(self._clients):
            client.abort()

    # -- one domain ---------------------------------------------------------

    async def _hosts(self, domain: str) -> tuple[list[Host], int, bool]:
        relay = self.config.relay
        if relay.smarthost:
            if self._smarthost_literal is not None:
                return list(self._smarthost_literal[0]), self._smarthost_literal[1], True
            name, port = split_hostport(relay.smarthost, 25)
            literal = literal_address(f"[{name}]") if not name.startswith("[") else literal_address(name)
            if literal is not None:
                self._smarthost_literal = ((Host(name, (literal,), 0),), port)
                return [Host(name, (literal,), 0)], port, True
            addresses = await self.resolver.addresses(name)
            return [Host(name, tuple(addresses), 0)], port, True
        hosts = await self.resolver.hosts_for(domain)
        return list(hosts), relay.port, False

    def _usable(self, ip: str) -> bool:
        source = self.config.relay.source_address
        if not source:
            return True
        return (":" in source) == (":" in ip)  # bind needs the same address family

    async def _deliver_domain(
        self, entry: QueueEntry, domain: str, rcpts: list[str], message: bytes | None = None
    ) -> dict[str, Reply]:
        try:
            hosts, port, smarthost = await self._hosts(domain)
        except MailError as e:
            self.log.info(
                "{queue_id}: no mail server for {domain}: {reply}",
                queue_id=entry.id,
                domain=logsafe.escape(domain),
                reply=logsafe.escape(str(e.reply)),
            )
            return {r: at_host(e.reply, "", "") for r in rcpts}
        policy: Policy | None = None
        if not smarthost and self.mta_sts is not None and self.config.relay.mta_sts:
            policy = await self.mta_sts.policy(domain)
            hosts = self._apply_policy(entry, domain, policy, hosts)
            if not hosts:
                assert policy is not None
                return {r: at_host(OR.mta_sts_no_mx(domain, policy.mx), "", "") for r in rcpts}
        own = self.own_addresses.get(port, ())
        if not smarthost and own:
            hosts = _before_self(hosts, own)
            if not hosts:
                # RFC 5321 5.1; Postfix: "mail for <domain> loops back to myself".
                self.log.info("{queue_id}: mail for {domain} loops back to myself", queue_id=entry.id, domain=domain)
                return {r: at_host(OR.LOOPS_BACK, "", "") for r in rcpts}
        path: str | bytes = self.message_path(entry.id) if message is None else message
        size = entry.size if message is None else len(message)
        targets = [(h.name, ip) for h in hosts for ip in (h.addresses or ()) if self._usable(ip)][:MAX_ADDRESSES]
        if not targets:
            return {r: at_host(OR.NO_HOSTS, hosts[0].name if hosts else "", "") for r in rcpts}
        last: RemoteReply | None = None
        spoken: RemoteReply | None = None  # the last failure a server actually replied with
        mail_refusals = 0
        answered = 0
        verify = self._tls_policy(smarthost, policy)
        for name, ip in targets:
            plaintext = False
            while True:
                outcome = await self._attempt(entry, name, ip, port, smarthost, rcpts, path, size, plaintext, verify)
                if isinstance(outcome, dict):
                    return outcome
                stage, reply = outcome
                if stage == "tls" and not plaintext and not verify:
                    plaintext = True  # RFC 7435 6: opportunistic TLS failed; try in the clear
                    continue
                if stage == "tls" and verify:
                    reply = OR.TLS_NOT_VERIFIED
                break
            if stage == "dot":
                # The data went out; the remote may have the message.  Do not send it
                # to another host now (that could duplicate it); retry later.
                return {r: at_host(reply, name, ip) for r in rcpts}
            if stage != "connect":
                answered += 1
            if stage == "mail" and reply.permanent:
                mail_refusals += 1
            last = at_host(reply, name, ip)
            if stage != "connect":
                spoken = last
        assert last is not None
        last = spoken or last  # "host said ..." is more use in a DSN than "connection refused"
        if answered and mail_refusals == answered:
            final: Reply = last  # every server refused the sender for good
        elif smarthost and last.code >= 500:
            final = OR.smarthost_refused(Reply(last.code, last.enhanced, last.text))
        else:
            final = OR.session_refused(Reply(last.code, last.enhanced, last.text))
        return {r: at_host(final, last.host, last.ip) for r in rcpts}

    def _tls_policy(self, smarthost: bool, policy: Policy | None) -> bool:
        """Whether this hop needs STARTTLS with a certificate verified for the
        host's name (else opportunistic TLS): AUTH at the smarthost, an
        MTA-STS ``enforce`` policy (RFC 8461 section 5), or ``relay.tls_verify``."""
        relay = self.config.relay
        if smarthost and relay.smarthost_user:
            return True
        if policy is not None and policy.mode == "enforce":
            return True
        return relay.tls_verify

    def _apply_policy(self, entry: QueueEntry, domain: str, policy: Policy | None, hosts: list[Host]) -> list[Host]:
        """RFC 8461 section 4.1: the MX hosts that match the policy (enforce), or
        all of them with mismatches logged (testing, section 5.2)."""
        if policy is None:
            return hosts
        matching = [h for h in hosts if mx_allowed(policy, h.name)]
        for h in hosts:
            if h not in matching:
                self.log.info(
                    "{queue_id}: MX {mx} of {domain} does not match its MTA-STS policy ({mode})",
                    queue_id=entry.id,
                    mx=logsafe.escape(h.name),
                    domain=domain,
                    mode=policy.mode,
                )
        return matching if policy.mode == "enforce" else hosts

    async def _attempt(
        self,
        entry: QueueEntry,
        name: str,
        ip: str,
        port: int,
        smarthost: bool,
        rcpts: list[str],
        path: str | bytes,
        size: int,
        plaintext: bool,
        verify: bool = False,
    ) -> dict[str, Reply] | tuple[str, Reply]:
        """One transaction; per-recipient replies, or ``(stage, reply)`` of the failure.

        A pooled connection to the same address (and policy) is reused when
        there is one (``_take``); if it turns out to be gone, a new connection
        is made.
        """
        if self._aborted:
            return "connect", OR.SHUTTING_DOWN
        key = (ip, port, smarthost, plaintext, name if verify else "")
        client = self._take(key)
        if client is not None:
            outcome = await self._transaction(entry, client, key, name, ip, rcpts, path, size, reused=True)
            if outcome is not None:
                return outcome
        relay = self.config.relay
        credentials = None
        if smarthost and relay.smarthost_user:
            credentials = (relay.smarthost_user, self.smarthost_password)
        client = SMTPClientProtocol(
            self.config.hostname,
            self.clock,
            relay.command_timeout,
            tls=None if plaintext else (lambda: (self.verified_tls if verify else self.tls_factory)(name)),
            # Verification is pointless if STARTTLS can be stripped: TLS is then required.
            require_tls=verify,
            credentials=credentials,
            peer_name=f"{name}[{ip}]",
        )
        try:
            endpoint = self.endpoint_factory(ip, port)
            await connectProtocol(endpoint, client)
        except Exception as e:
            self.log.info(
                "{queue_id}: connect to {mx}[{ip}]:{port} failed: {error}",
                queue_id=entry.id,
                mx=logsafe.escape(name),
                ip=ip,
                port=port,
                error=e.__class__.__name__,
            )
            return "connect", OR.CONNECT_FAILED
        self._clients.add(client)
        try:
            await client.handshake()
        except HostFailure as e:
            self._clients.discard(client)
            if e.stage == "auth":
                e = HostFailure("auth", OR.smarthost_auth_failed(e.reply))
            self._host_failed(entry, name, ip, e)
            return e.stage, e.reply
        pool = self._pool.setdefault(key, [])
        if len(pool) < MAX_POOLED_PER_ADDRESS:
            pool.append(client)
        outcome = await self._transaction(entry, client, key, name, ip, rcpts, path, size, reused=False)
        assert outcome is not None
        return outcome

    async def _transaction(
        self,
        entry: QueueEntry,
        client: SMTPClientProtocol,
        key: tuple,
        name: str,
        ip: str,
        rcpts: list[str],
        path: str | bytes,
        size: int,
        reused: bool,
    ) -> dict[str, Reply] | tuple[str, Reply] | None:
        """MAIL/RCPT/DATA on ``client``; None if a reused connection was stale.

        ``path``: the queued message's file, or its bytes."""
        try:
            source, size = await self._open(path, size)
        except OSError:
            self.log.failure("{queue_id}: cannot open the queued message", queue_id=entry.id)
            self._release(key, client)
            return {r: at_host(OR.OPEN_ERROR, name, ip) for r in rcpts}
        try:
            try:
                replies = await client.send(entry.sender, rcpts, source, size, Request.of(entry))
            except HostFailure as e:
                self._drop(key, client)
                if reused and e.stage != "dot" and not client.alive:
                    return None  # the server had closed the connection: reconnect
                self._host_failed(entry, name, ip, e)
                return e.stage, e.reply
        finally:
            source.close()
        self._release(key, client)
        if "DSN" in client.extensions:
            # RFC 3461 5.2.1: NOTIFY went on with the message, so success notices are the
            # next hop's job now (bounce.py sends "relayed" ones only for hops without DSN).
            for r in entry.recipients:
                if r.address in replies and replies[r.address].code // 100 == 2 and "SUCCESS" in r.notify:
                    r.notified = True
        return {r: at_host(replies[r], name, ip) for r in rcpts}

    async def _open(self, path: str | bytes, size: int) -> tuple[IMessageSource, int]:
        """The message as a source, and its size (from the file if unknown).

        A file is opened and read in the thread pool: a message retried
        hours later is rarely in the page cache."""
        if isinstance(path, bytes):
            return MemorySource(path), size
        file, size = await self.run_blocking(_open_message, path, size)
        return FileSource(file, self.run_blocking), size

    # -- connection reuse ---------------------------------------------------

    def _take(self, key: tuple) -> SMTPClientProtocol | None:
        """A pooled connection for one more transaction: preferably a busy one
        that pipelines (see the module docstring), else an idle one."""
        idle = None
        for client in self._pool.get(key, ()):
            if not client.alive or client.transactions >= MAX_TRANSACTIONS:
                continue
            if client.pending == 0:
                idle = idle or client
            elif client.pending == 1 and client.pipelining and client.data_time <= RIDE_MAX_DATA_TIME:
                return client
        return idle

    def _release(self, key: tuple, client: SMTPClientProtocol) -> None:
        """After a transaction: keep a healthy pooled connection ``IDLE_TIME``
        seconds for the next message to the same address, or QUIT."""
        if self._closing or not client.alive or client.transactions >= MAX_TRANSACTIONS or not IDLE_TIME:
            self._drop(key, client)
        elif client not in self._pool.get(key, ()):
            self._drop(key, client)  # the pool was full when it connected
        elif not client.pending:
            # One timer per connection, moved along while it is reused rather
            # than a new one per message.
            timer = self._idle_timers.get(client)
            if timer is not None and timer.active():
                timer.reset(IDLE_TIME)
            else:
                self._idle_timers[client] = self.clock.callLater(IDLE_TIME, self._expire, key, client)

    def _expire(self, key: tuple, client: SMTPClientProtocol) -> None:
        self._idle_timers.pop(client, None)
        if not client.pending:  # else busy again: _release re-arms it
            self._drop(key, client)

    def _drop(self, key: tuple, client: SMTPClientProtocol) -> None:
        """Forget a connection and QUIT it (once its transactions have finished)."""
        pool = self._pool.get(key)
        if pool is not None and client in pool:
            pool.remove(client)
            if not pool:
                del self._pool[key]
        timer = self._idle_timers.pop(client, None)
        if timer is not None and timer.active():
            timer.cancel()
        if not client.pending:  # else its last transaction drops it again (abort_all may need it)
            self._clients.discard(client)
        client.quit()

    def close_idle(self) -> None:
        """QUIT every idle connection and keep no more (shutdown); busy ones
        say QUIT when their transactions are done."""
        self._closing = True
        for key, pool in list(self._pool.items()):
            for client in list(pool):
                if not client.pending:
                    self._drop(key, client)

    def _host_failed(self, entry: QueueEntry, name: str, ip: str, e: HostFailure) -> None:
        self.log.info(
            "{queue_id}: {mx}[{ip}] failed at {stage}: {reply}",
            queue_id=entry.id,
            mx=logsafe.escape(name),
            ip=ip,
            stage=e.stage,
            reply=logsafe.escape(str(e.reply)),
        )


def _before_self(hosts: list[Host], own: tuple[str, ...]) -> list[Host]:
    """The hosts before the first one with one of our own addresses: RFC 5321
    section 5.1 -- a server that finds itself among the MX hosts only uses
    hosts of lower preference (better), none left being a loop."""
    for i, host in enumerate(hosts):
        if any(is_own_address(ip, own) for ip in host.addresses or ()):
            return hosts[:i]
    return hosts


def _open_message(path: str, size: int) -> tuple[IO[bytes], int]:
    """Open a queued message (blocking); its size from the file when ``size`` is 0."""
    file = open(path, "rb")
    try:
        return file, size or os.fstat(file.fileno()).st_size
    except BaseException:
        file.close()
        raise


def read_password(path: str) -> str:
    """The smarthost password: the file's first line (blocking, once at start)."""
    if not path:
        return ""
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\r\n")


def tcp_endpoint_factory(reactor: Any, config: Config) -> Callable[[str, int], IStreamClientEndpoint]:
    """Production ``endpoint_factory``: TCP4/TCP6 client endpoints with the
    connect timeout and ``relay.source_address`` binding."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

    relay = config.relay

    def factory(ip: str, port: int) -> IStreamClientEndpoint:
        bind = (relay.source_address, 0) if relay.source_address else None
        cls = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
        return cls(reactor, ip, port, timeout=relay.connect_timeout, bindAddress=bind)

    return factory


def build(
    config: Config,
    reactor: Any,
    store: IQueueStore,
    run_blocking: Callable[..., Deferred],
    resolver: CachingResolver,
) -> RemoteAgent:
    """The production agent (called by ``service.py``), on the server's shared ``resolver``."""
    from mailstack import mtasts
    from mailstack.delivery.ownaddr import own_addresses
    from mailstack.mx import Resolver

    mx = Resolver(config, reactor, resolver)
    relay = config.relay
    sts = None
    if relay.mta_sts and not relay.smarthost:
        sts = mtasts.build(reactor, mx.resolver, config.data_dir, relay.tls_ca_file, run_blocking)
    return RemoteAgent(
        config,
        mx,
        tcp_endpoint_factory(reactor, config),
        reactor,
        store.message_path,
        run_blocking=run_blocking,
        smarthost_password=read_password(relay.smarthost_password_file),
        mta_sts=sts,
        own_addresses=own_addresses(config),
    )
