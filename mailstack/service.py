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
from typing import Any, Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailstack import pipeline, sdnotify
from mailstack.auth.aliases import AliasDB
from mailstack.auth.cred import UserChecker
from mailstack.auth.jsonfile import FileFormatError
from mailstack.auth.throttle import LoginThrottle
from mailstack.auth.userdb import UserDB
from mailstack.delivery import remote
from mailstack.delivery.local import LocalAgent
from mailstack.intake import Intake
from mailstack.interfaces import IDrainable
from mailstack.metrics import Metrics, MetricsSite, make_metrics
from mailstack.pop3 import factory as pop3_factory
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


def load_parts(config: Any) -> tuple[TLSConfig, UserDB, AliasDB]:
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
    return tls, users, aliases


class MailService(MultiService):
    """The whole server; see the module docstring for start and stop order."""

    log = Logger()

    def __init__(self, runtime: Runtime, pool: ThreadPoolService) -> None:
        super().__init__()
        self.runtime = runtime
        self.pool = pool
        self.listeners: list[StreamServerEndpointService] = []
        self.factories: list[IDrainable] = []  # the unwrapped protocol factories, for drain()
        self.described: list[tuple[str, str]] = []  # (kind, listener string)
        pool.setServiceParent(self)
        runtime.manager.setServiceParent(self)
        runtime.send_limits.setServiceParent(self)

    def add_listener(self, kind: str, description: str, factory: IProtocolFactory) -> None:
        """Listen on ``description`` with ``factory``; a mail protocol's must provide ``IDrainable``."""
        drainable = IDrainable(factory, None)
        if drainable is None and not isinstance(factory, MetricsSite):
            raise TypeError(f"{factory!r} provides no IDrainable")
        endpoint_string, wrap = listen_description(description)
        endpoint = serverFromString(self.runtime.reactor, endpoint_string)
        served = TLSMemoryBIOFactory(self.runtime.tls, False, factory, clock=self.runtime.reactor) if wrap else factory
        svc = StreamServerEndpointService(endpoint, served)
        # Fail the start (twistd exits non-zero) if the port cannot be bound,
        # rather than running without the listener.
        svc._raiseSynchronously = True
        svc.setServiceParent(self)
        self.described.append((kind, description))
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
        # Bound in privilegedStartService; tests/e2e/harness.py waits for these lines.
        for kind, description in self.described:
            self.log.info("{service} listening on {endpoint}", service=kind, endpoint=description)
        super().startService()
        # systemd Type=notify: every listener is bound (privilegedStartService)
        # and every child service started.
        sdnotify.notify(sdnotify.READY, sdnotify.status(f"{len(self.listeners)} listeners up"))

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
        manager = self.runtime.manager
        if manager.running:
            await maybeDeferred(manager.stopService)
        limits = self.runtime.send_limits
        if limits.running:  # its last write needs the thread pool
            await maybeDeferred(limits.stopService)
        self.pool.stopService()
        self.log.info("stopped")


def make_service(config: Any, reactor: Any, tls: TLSConfig, users: UserDB, aliases: AliasDB) -> MailService:
    """Build the runtime and the service tree (nothing listens until started).

    StartupError if the message checks of ``[pipeline]`` cannot be built.

    The constructors are those of docs/design.rst.  The intake needs the queue
    manager as its kicker and the manager needs the intake for DSNs, so the
    manager is built first and given the intake afterwards.
    """
    pool = ThreadPoolService(reactor)
    run_blocking = pool.run_blocking
    metrics = make_metrics(list(config.listen.metrics))
    store = QueueStore(os.path.join(config.data_dir, "queue"))
    maildirs = MaildirStore(os.path.join(config.data_dir, "mail"))
    router = Router(config, users, aliases)
    local = LocalAgent(maildirs, store, run_blocking)
    relay = remote.build(config, reactor, store, run_blocking, metrics)
    manager = QueueManager(store, local, relay, reactor, config, run_blocking, router=router, metrics=metrics)
    intake = Intake(config, store, manager, run_blocking, reactor, local=local, metrics=metrics)
    manager.intake = intake
    runtime = Runtime(
        config=config,
        reactor=reactor,
        run_blocking=run_blocking,
        users=users,
        aliases=aliases,
        checker=UserChecker(users, run_blocking),
        throttle=LoginThrottle(reactor, config.auth),
        tls=tls,
        router=router,
        store=store,
        intake=intake,
        manager=manager,
        maildirs=maildirs,
        send_limits=SendLimits(
            reactor, run_blocking, config.data_dir, config.limits.messages_per_hour, config.limits.messages_per_day
        ),
        metrics=metrics,
    )
    try:
        runtime.pipeline = pipeline.build(runtime)
    except pipeline.PipelineError as e:
        raise StartupError(f"{config.source or '<defaults>'}: {e}") from None
    service = MailService(runtime, pool)
    for kind, make_factory in FACTORIES.items():
        descriptions = getattr(config.listen, kind)
        if not descriptions:
            continue
        factory = make_factory(kind, runtime)
        for description in descriptions:
            service.add_listener(kind, description, factory)
    if isinstance(metrics, Metrics):
        site = MetricsSite(metrics)
        for description in config.listen.metrics:
            service.add_listener("metrics", description, site)
    return service
