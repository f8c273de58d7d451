# -*- test-case-name: tests.test_service -*-
"""The service tree of one mailstack process, built once by ``tap.makeService``.

``MailService`` is a ``MultiService`` with, in start order:

1. ``ThreadPoolService``: the pool of 32 threads behind ``run_blocking``
   (fsync, password hashing, directory scans).
2. The queue manager (``queue.manager.QueueManager``).
3. The sending limits (``sendlimits.SendLimits``): their counts are written at stop.
4. One ``StreamServerEndpointService`` per listener string of ``[listen]``
   (an empty list turns that service off).  ``ssl:`` strings that name no
   certificate are listened on as ``tcp:`` and the factory is wrapped in
   ``TLSMemoryBIOFactory`` with ``runtime.tls``, so the protocol sees an
   ISSLTransport from its first byte and a renewed certificate is picked up.
   ``listen.metrics`` endpoints serve ``metrics.MetricsSite`` (not drained).

Under systemd (``Type=notify``) READY=1 is sent once all of that has started,
STOPPING=1 when the stop begins (``sdnotify``).

Stopping (SIGTERM, see ``tap.py``) is ordered rather than MultiService's
reverse order: stop listening; then let sessions in flight finish, by calling
``drain(timeout)`` on every listener factory (each provides ``IDrainable``:
idle sessions are told and closed, transactions and commands in progress
finish, all bounded by ``smtp.shutdown_grace``); then stop the queue manager (it waits for deliveries
in progress, bounded likewise); then the sending limits (their last write); last the thread pool, which finishes the
blocking calls it has (an fsync in progress completes).

TCP_NODELAY is set by the protocols themselves (``session.CommandSession``
when a connection is admitted); a wrapping protocol here would hide
``ISSLTransport`` after STARTTLS from them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailstack import dnsresolver, pipeline, sdnotify
from mailstack.auth.aliases import AliasDB
from mailstack.auth.cache import LoginCache
from mailstack.auth.cred import UserChecker
from mailstack.auth.jsonfile import FileFormatError
from mailstack.auth.throttle import LoginThrottle
from mailstack.auth.userdb import UserDB
from mailstack.checks import inbound
from mailstack.config import Config
from mailstack.delivery import remote
from mailstack.delivery.local import LocalAgent
from mailstack.dkim import startup
from mailstack.intake import Intake
from mailstack.interfaces import IDrainable
from mailstack.metrics import Metrics, MetricsSite, make_metrics
from mailstack.pop3 import factory as pop3_factory
from mailstack.procs import stateclient, stateserver
from mailstack.procs.master import WorkerPool, worker_count
from mailstack.procs.slots import RemoteKicker
from mailstack.queue.manager import QueueManager
from mailstack.queue.store import QueueStore
from mailstack.routing import Router
from mailstack.runtime import Runtime
from mailstack.sendlimits import SendLimits
from mailstack.smtp import factory as smtp_factory
from mailstack.storage import fsutil
from mailstack.storage.maildir import MaildirStore
from mailstack.threadpool import ThreadPool
from mailstack.tls import TLSConfig, TLSError
from mailstack.trust import TrustError, trust_root

THREADS = 32

# Listener kind -> make_factory(kind, runtime) of the protocol that serves it.
FACTORIES: dict[str, Callable[[str, Any], ServerFactory]] = {
    "smtp": smtp_factory.make_factory,
    "submission": smtp_factory.make_factory,
    "submissions": smtp_factory.make_factory,
    "pop3": pop3_factory.make_factory,
    "pop3s": pop3_factory.make_factory,
}


class StartupError(Exception):
    """Something in the environment stops the start; one line naming the file."""


def listen_description(description: str) -> tuple[str, bool]:
    """``(endpoint string to listen on, whether to wrap the factory in our TLS)``."""
    kind, _, rest = description.partition(":")
    if kind == "ssl" and "privateKey=" not in rest and "certKey=" not in rest:
        return "tcp:" + rest, True
    return description, False


class ThreadPoolService(Service):
    """Runs a ``threadpool.ThreadPool`` while the service runs; ``run_blocking`` uses it."""

    name = "threadpool"

    def __init__(self, reactor: Any, threads: int = THREADS) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(reactor, threads, "mailstack")
        self.run_blocking: Callable[..., Deferred] = self.pool.run

    def startService(self) -> None:
        Service.startService(self)
        self.pool.start()

    def stopService(self) -> None:
        Service.stopService(self)
        self.pool.stop()  # joins: blocking calls in progress (fsync) complete


def load_parts(config: Config) -> tuple[TLSConfig, UserDB, AliasDB]:
    """The blocking, fallible start-up work, done before the reactor runs.

    Creates ``data_dir``, loads or generates the certificate, reads the user and
    alias files.  StartupError (one line) if any of that fails.
    """
    try:
        fsutil.ensure_dir(config.data_dir)
    except OSError as e:
        raise StartupError(f"{config.data_dir}: cannot create data_dir: {e.strerror}") from None
    try:
        tls = TLSConfig.from_config(config)
        users = UserDB(os.path.join(config.data_dir, "users.json"))
        aliases = AliasDB(os.path.join(config.data_dir, "aliases.json"))
    except (TLSError, FileFormatError) as e:
        raise StartupError(str(e)) from None
    secret = config.relay.smarthost_password_file
    if secret and not os.access(secret, os.R_OK):
        raise StartupError(f"{secret}: relay.smarthost_password_file cannot be read")
    try:
        trust_root(config.relay.tls_ca_file)  # relay.tls_ca_file must hold PEM certificates
    except TrustError as e:
        raise StartupError(f"relay.tls_ca_file: {e}") from None
    return tls, users, aliases


def raise_listen_errors(svc: StreamServerEndpointService) -> bool:
    """Make ``svc.privilegedStartService`` raise when its port cannot be bound.

    Then the start fails (twistd exits non-zero) rather than running without
    the listener.  The switch is the private ``_raiseSynchronously`` (Twisted
    has it since 10.2 and uses it for ``twistd``'s own ``--port`` options); if a
    release drops it, Twisted's default applies (the error is logged and the
    other listeners run), this returns False, and
    ``tests/test_twisted_internals.py`` fails.
    """
    if "_raiseSynchronously" not in vars(StreamServerEndpointService):
        return False
    svc._raiseSynchronously = True
    return True


class AdoptedPortService(Service):
    """Accepts on a listening socket inherited from the master process."""

    def __init__(self, reactor: Any, fd: int, family: int, factory: IProtocolFactory) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.factory = factory
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)
        os.close(self.fd)  # the port holds its own copy

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        return self.port.stopListening() if self.port is not None else None


class MailService(MultiService):
    """The whole server; see the module docstring for start and stop order."""

    log = Logger()

    def __init__(self, runtime: Runtime, pool: ThreadPoolService) -> None:
        super().__init__()
        self.runtime = runtime
        self.pool = pool
        self.listeners: list[IService] = []
        self.factories: list[IDrainable] = []  # the unwrapped protocol factories, for drain()
        self.described: list[tuple[str, str]] = []  # (kind, listener string), logged at start
        self.helpers: list[IService] = []  # stopped in this order once the sessions are drained
        self.ready: Deferred[None] | None = None  # the master: fires when its workers listen
        self.workers: WorkerPool | None = None  # the master's session workers
        pool.setServiceParent(self)

    def add_helper(self, service: IService) -> None:
        """Run ``service`` with the server; it stops once the sessions are drained, in the order added."""
        service.setServiceParent(self)
        self.helpers.append(service)

    def add_listener(self, kind: str, description: str, factory: IProtocolFactory) -> None:
        """Listen on ``description`` with ``factory``; a mail protocol's must provide ``IDrainable``."""
        endpoint_string, wrap = listen_description(description)
        endpoint = serverFromString(self.runtime.reactor, endpoint_string)
        svc = StreamServerEndpointService(endpoint, self._served(factory, wrap))
        raise_listen_errors(svc)
        self.described.append((kind, description))
        self._listen(svc, factory)

    def adopt_listener(self, fd: int, family: int, tls: bool, factory: IProtocolFactory) -> None:
        """Accept on the inherited listening socket ``fd`` (a worker of ``procs.master``)."""
        self._listen(AdoptedPortService(self.runtime.reactor, fd, family, self._served(factory, tls)), factory)

    def _served(self, factory: IProtocolFactory, wrap: bool) -> IProtocolFactory:
        if not wrap:
            return factory
        return TLSMemoryBIOFactory(self.runtime.tls, False, factory, clock=self.runtime.reactor)

    def _listen(self, svc: IService, factory: IProtocolFactory) -> None:
        drainable = IDrainable(factory, None)
        if drainable is None and not isinstance(factory, MetricsSite):
            raise TypeError(f"{factory!r} provides no IDrainable")
        svc.setServiceParent(self)
        self.listeners.append(svc)
        if drainable is not None and drainable not in self.factories:
            self.factories.append(drainable)

    def privilegedStartService(self) -> None:
        # Listeners bind here (before twistd drops privileges).  A port in use
        # is an operator's problem: one line and exit 1, not a traceback.
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(f"mailstack: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}") from None

    def startService(self) -> None:
        super().startService()
        if self.ready is None:
            self._listening()
        else:
            self.ready.addCallback(lambda _: self._listening())

    def _listening(self) -> None:
        # Bound in privilegedStartService; tests/e2e/harness.py waits for these lines.
        for kind, description in self.described:
            self.log.info("{service} listening on {endpoint}", service=kind, endpoint=description)
        # systemd Type=notify: every listener is bound (privilegedStartService)
        # and every child service started.
        sdnotify.notify(sdnotify.READY, sdnotify.status(f"{len(self.described)} listeners up"))

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        sdnotify.notify(sdnotify.STOPPING)
        grace = float(self.runtime.config.smtp.shutdown_grace)
        await gatherResults([maybeDeferred(s.stopService) for s in self.listeners if s.running])
        self.log.info("stopped listening; draining sessions for up to {grace}s", grace=grace)
        drains = [f.drain(grace) for f in self.factories]
        await gatherResults(drains)
        for helper in self.helpers:  # the workers, the queue manager, ..., the sending limits' last write
            if helper.running:
                await maybeDeferred(helper.stopService)
        self.pool.stopService()
        self.log.info("stopped")


def build_runtime(
    config: Config, reactor: Any, tls: TLSConfig, users: UserDB, aliases: AliasDB, pool: ThreadPoolService,
    channel: Any = None,
) -> tuple[Runtime, list[IService], stateserver.StateServer | None]:
    """The runtime of a single process or a master (``channel`` None), or of a session worker.

    Returns the runtime, the services to stop after the sessions, in order, and
    the state the master shares with its workers (None in a worker).
    A worker (``channel``: its ``procs.worker.WorkerChannel`` to the master) has no
    queue manager (its intake kicks the master's) and asks the master for the
    connection slots and the shared limits.  StartupError if the message checks
    of ``[pipeline]`` cannot be built.

    The constructors are those of docs/design.rst.  The intake needs the queue
    manager as its kicker and the manager needs the intake for DSNs, so the
    manager is built first and given the intake afterwards.
    """
    run_blocking = pool.run_blocking
    metrics = make_metrics(list(config.listen.metrics))  # a worker's are summed into the master's
    store = QueueStore(os.path.join(config.data_dir, "queue"))
    maildirs = MaildirStore(os.path.join(config.data_dir, "mail"))
    router = Router(config, users, aliases)
    local = LocalAgent(maildirs, store, run_blocking)
    resolver = dnsresolver.build(config, reactor, metrics)  # every DNS lookup: [dns] nameservers
    signer = startup.signer(config)
    manager: QueueManager | None = None
    if channel is None:
        relay = remote.build(config, reactor, store, run_blocking, resolver)
        manager = QueueManager(store, local, relay, reactor, config, run_blocking, router=router, metrics=metrics)
        kicker: Any = manager
    else:
        kicker = RemoteKicker(channel, reactor)
    intake = Intake(config, store, kicker, run_blocking, reactor, local=local, metrics=metrics)
    if manager is not None:
        manager.intake = intake
        manager.bounces.signer = signer
    send_limits = None
    if channel is None:  # only the master counts (and writes sendcounts.json)
        send_limits = SendLimits(
            reactor, run_blocking, config.data_dir, config.limits.messages_per_hour, config.limits.messages_per_day
        )
    runtime = Runtime(
        config=config,
        reactor=reactor,
        run_blocking=run_blocking,
        users=users,
        aliases=aliases,
        checker=UserChecker(users, run_blocking, cache=LoginCache(reactor, config.auth.cache_ttl)),
        throttle=LoginThrottle(reactor, config.auth),
        tls=tls,
        router=router,
        store=store,
        intake=intake,
        manager=kicker,
        maildirs=maildirs,
        signer=signer,
        send_limits=send_limits,
        metrics=metrics,
    )
    state: stateserver.StateServer | None = None
    table: IService | None = None
    if channel is None:
        state, table = stateserver.build(runtime)
        rate, greylist = state.rate, state.greylist
    else:
        runtime.smtp_connections = channel.leases.slots("smtp")
        runtime.submission_connections = channel.leases.slots("submission")
        runtime.pop3_connections = channel.leases.slots("pop3")
        shared = stateclient.remote_state(channel)
        runtime.throttle, runtime.send_limits = shared.throttle, shared.send_limits
        rate, greylist = shared.rate, shared.greylist
    checks = inbound.build(runtime, resolver, rate=rate, greylist=greylist)
    try:
        runtime.pipeline = pipeline.build(runtime, checks)
    except pipeline.PipelineError as e:
        raise StartupError(f"{config.source or '<defaults>'}: {e}") from None
    after_sessions: list[IService] = [manager] if manager is not None else []
    if table is not None:
        after_sessions.append(table)
    if send_limits is not None:
        after_sessions.append(send_limits)  # last: its final write
    return runtime, after_sessions, state


def make_service(
    config: Config, reactor: Any, tls: TLSConfig, users: UserDB, aliases: AliasDB,
    account: tuple[int, int] | None = None,
) -> MailService:
    """Build the service tree of a single process or of the master (nothing listens until started).

    ``server.processes`` 1: one process listens and does everything.  Otherwise
    this is the master of ``procs.master``: it binds the listeners and starts
    the session workers, which stop first at SIGTERM; ``account`` is the
    (uid, gid) of ``twistd --uid``, which the workers switch to.
    """
    pool = ThreadPoolService(reactor)
    runtime, after_sessions, state = build_runtime(config, reactor, tls, users, aliases, pool)
    service = MailService(runtime, pool)
    workers = config.server.processes != 1
    if workers:
        assert state is not None  # build_runtime without a channel always builds it
        service.workers = master_pool(service, runtime, account, state)
        service.add_helper(service.workers)
    for helper in after_sessions:
        service.add_helper(helper)
    startup.KeysService(pool.run_blocking, runtime.signer.keys, config.domains.local).setServiceParent(service)
    if not workers:
        for kind, make_factory in FACTORIES.items():
            descriptions = getattr(config.listen, kind)
            if not descriptions:
                continue
            factory = make_factory(kind, runtime)
            for description in descriptions:
                service.add_listener(kind, description, factory)
    metrics = runtime.metrics
    if isinstance(metrics, Metrics):
        site = MetricsSite(metrics)
        for description in config.listen.metrics:
            service.add_listener("metrics", description, site)
    return service


def master_pool(
    service: MailService, runtime: Runtime, account: tuple[int, int] | None, state: stateserver.StateServer
) -> WorkerPool:
    """The session workers of a master, and the listeners they adopt (bound at privileged start)."""
    config = runtime.config
    count = worker_count(config.server.processes)
    workers = WorkerPool(runtime.reactor, config.source, count, runtime.manager, float(config.smtp.shutdown_grace),
                         state, account=account)
    for kind in FACTORIES:
        for description in getattr(config.listen, kind):
            endpoint_string, wrap = listen_description(description)
            if endpoint_string.startswith("ssl:"):  # its own certificate: the workers could not serve it
                raise StartupError(
                    f"listen.{kind}: {description}: an ssl: listener with its own certificate needs "
                    "server.processes = 1 (or use [tls] certificate and private_key)"
                )
            workers.add_listener(kind, description, endpoint_string, wrap)
            service.described.append((kind, description))
    service.ready = workers.ready
    if isinstance(runtime.metrics, Metrics):
        runtime.metrics.add_source(workers.expositions)
    return workers


def make_worker_service(
    config: Config, reactor: Any, tls: TLSConfig, users: UserDB, aliases: AliasDB, channel: Any,
    listeners: list[dict[str, Any]],
) -> MailService:
    """A session worker's service tree: the sessions on the inherited sockets, the intake, the pool."""
    pool = ThreadPoolService(reactor)
    runtime, after_sessions, _ = build_runtime(config, reactor, tls, users, aliases, pool, channel)
    service = MailService(runtime, pool)
    for helper in after_sessions:
        service.add_helper(helper)
    factories: dict[str, ServerFactory] = {}
    for listener in listeners:
        kind = listener["kind"]
        if kind not in factories:
            factories[kind] = FACTORIES[kind](kind, runtime)
        service.adopt_listener(listener["fd"], listener["family"], listener["tls"], factories[kind])
    return service
