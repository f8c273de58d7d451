# -*- test-case-name: tests.test_service -*-
"""The service tree of one mailstack process, built once by ``tap.makeService``.

``MailService`` is a ``MultiService`` with, in start order:

1. ``ThreadPoolService``: the pool of 32 threads behind ``run_blocking``
   (fsync, password hashing, directory scans).
2. The queue manager (``queue.manager.QueueManager``).
3. One ``StreamServerEndpointService`` per listener string of ``[listen]``
   (an empty list turns that service off).  ``ssl:`` strings that name no
   certificate are listened on as ``tcp:`` and the factory is wrapped in
   ``TLSMemoryBIOFactory`` with ``runtime.tls``, so the protocol sees an
   ISSLTransport from its first byte and a renewed certificate is picked up.

Stopping (SIGTERM, see ``tap.py``) is ordered rather than MultiService's
reverse order: stop listening; then let sessions in flight finish, by calling
``drain(timeout)`` on every listener factory that has one (the SMTP factory
does: idle sessions get 421 4.3.2, transactions finish, all bounded by
``smtp.shutdown_grace``); then stop the queue manager (it waits for deliveries
in progress, bounded likewise); last the thread pool, which finishes the
blocking calls it has (an fsync in progress completes).

TCP_NODELAY is set by the protocols themselves (``smtp/server.py``,
``pop3/server.py`` in ``connectionMade``); a wrapping protocol here would hide
``ISSLTransport`` after STARTTLS from them.

Parts written in other issues are imported lazily.  While such a module does
not exist yet (``ModuleNotFoundError`` for exactly that module), a listener
answers with a one-line placeholder (``421 4.3.2`` or ``-ERR``) and hangs up,
and the runtime attribute is None; each placeholder is logged at start.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from mailstack.auth.aliases import AliasDB
from mailstack.auth.cred import UserChecker
from mailstack.auth.jsonfile import FileFormatError
from mailstack.auth.throttle import LoginThrottle
from mailstack.auth.userdb import UserDB
from mailstack.errors import Reply
from mailstack.runtime import Runtime
from mailstack.storage import fsutil
from mailstack.tls import TLSConfig, TLSError

THREADS = 32

# Listener kind -> the module whose make_factory(kind, runtime) builds it.
PROTOCOLS = {
    "smtp": "mailstack.smtp.server",
    "submission": "mailstack.smtp.server",
    "submissions": "mailstack.smtp.server",
    "pop3": "mailstack.pop3.server",
    "pop3s": "mailstack.pop3.server",
}

# RFC 5321 3.8 / RFC 3463: service not available, system not accepting messages.
_PLACEHOLDER_SMTP = b"421 4.3.2 service not ready\r\n"
_PLACEHOLDER_POP3 = b"-ERR service not ready\r\n"

log = Logger()


class StartupError(Exception):
    """Something in the environment stops the start; one line naming the file."""


def optional_module(name: str) -> ModuleType | None:
    """Import ``name``; None only if that very module does not exist (yet).

    An ImportError from inside the module (a bug, a missing dependency) still
    raises: a placeholder must never hide a broken part.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        return None


def listen_description(description: str) -> tuple[str, bool]:
    """``(endpoint string to listen on, whether to wrap the factory in our TLS)``."""
    kind, _, rest = description.partition(":")
    if kind == "ssl" and "privateKey=" not in rest and "certKey=" not in rest:
        return "tcp:" + rest, True
    return description, False


class _Placeholder(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(self.factory.line)
        self.transport.loseConnection()


class PlaceholderFactory(ServerFactory):
    """Answers one line and hangs up: the listener's protocol has not landed yet."""

    protocol = _Placeholder
    noisy = False

    def __init__(self, line: bytes) -> None:
        self.line = line


class ThreadPoolService(Service):
    """Runs a ThreadPool while the service runs; ``run_blocking`` uses it."""

    name = "threadpool"

    def __init__(self, reactor: Any, threads: int = THREADS) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="mailstack")

    def run_blocking(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        """Run ``f`` in the pool; the Deferred fires on the reactor thread."""
        return deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs)

    def startService(self) -> None:
        Service.startService(self)
        self.pool.start()

    def stopService(self) -> None:
        Service.stopService(self)
        self.pool.stop()  # joins: blocking calls in progress (fsync) complete


class _NoRemoteAgent:
    """IDeliveryAgent used only while delivery/remote.py does not exist: defer all."""

    reply = Reply(451, "4.3.2", "Remote delivery not available yet")

    def deliver(self, entry: Any, recipients: Any) -> Deferred:
        return succeed({r.address: self.reply for r in recipients})


class _LateKicker:
    """IQueueKicker for an Intake built before its manager (or without one)."""

    manager: Any = None

    def kick(self, queue_id: str) -> None:
        if self.manager is not None:
            self.manager.kick(queue_id)


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
        self.factories: list[Any] = []  # the unwrapped protocol factories, for drain()
        self.placeholders: list[str] = []
        pool.setServiceParent(self)
        if runtime.manager is not None:
            runtime.manager.setServiceParent(self)

    def add_listener(self, kind: str, description: str, factory: Any) -> None:
        endpoint_string, wrap = listen_description(description)
        endpoint = serverFromString(self.runtime.reactor, endpoint_string)
        served = TLSMemoryBIOFactory(self.runtime.tls, False, factory, clock=self.runtime.reactor) if wrap else factory
        svc = StreamServerEndpointService(endpoint, served)
        # Fail the start (twistd exits non-zero) if the port cannot be bound,
        # rather than running without the listener.
        svc._raiseSynchronously = True
        svc.setName(f"{kind} {description}")
        svc.setServiceParent(self)
        self.listeners.append(svc)
        if factory not in self.factories:
            self.factories.append(factory)

    def privilegedStartService(self) -> None:
        # Listeners bind here (before twistd drops privileges).  A port in use
        # is an operator's problem: one line and exit 1, not a traceback.
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(f"mailstack: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}") from None

    def startService(self) -> None:
        for svc in self.listeners:
            self.log.info("{service} listening on {endpoint}", service=svc.name.split()[0], endpoint=svc.name.split()[1])
        for name in self.placeholders:
            self.log.warn("{part} has not landed yet: placeholder in use", part=name)
        super().startService()

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        grace = float(self.runtime.config.smtp.shutdown_grace)
        await gatherResults([maybeDeferred(s.stopService) for s in self.listeners if s.running])
        self.log.info("stopped listening; draining sessions for up to {grace}s", grace=grace)
        drains = [f.drain(grace) for f in self.factories if callable(getattr(f, "drain", None))]
        await gatherResults(drains)
        manager = self.runtime.manager
        if manager is not None and manager.running:
            await maybeDeferred(manager.stopService)
        self.pool.stopService()
        self.log.info("stopped")


def make_service(config: Any, reactor: Any, tls: TLSConfig, users: UserDB, aliases: AliasDB) -> MailService:
    """Build the runtime and the service tree (nothing listens until started)."""
    pool = ThreadPoolService(reactor)
    run_blocking = pool.run_blocking
    placeholders: list[str] = []

    def part(module: str) -> ModuleType | None:
        found = optional_module(module)
        if found is None:
            placeholders.append(module)
        return found

    runtime = Runtime(
        config=config,
        reactor=reactor,
        run_blocking=run_blocking,
        users=users,
        aliases=aliases,
        checker=UserChecker(users, run_blocking),
        throttle=LoginThrottle(reactor, config.auth),
        tls=tls,
    )
    routing = part("mailstack.routing")
    if routing is not None:
        runtime.router = routing.Router(config, users, aliases)
    store_mod = part("mailstack.queue.store")
    if store_mod is not None:
        runtime.store = store_mod.QueueStore(os.path.join(config.data_dir, "queue"))
    maildir_mod = part("mailstack.storage.maildir")
    if maildir_mod is not None:
        runtime.maildirs = maildir_mod.MaildirStore(os.path.join(config.data_dir, "mail"))
    local_mod = part("mailstack.delivery.local")
    manager_mod = part("mailstack.queue.manager")
    if manager_mod is not None and runtime.store is not None and local_mod is not None and runtime.maildirs is not None:
        local = local_mod.LocalAgent(runtime.maildirs, runtime.store, run_blocking)
        remote = build_remote_agent(config, reactor, run_blocking, placeholders)
        runtime.manager = manager_mod.QueueManager(
            runtime.store, local, remote, reactor, config, run_blocking, None, router=runtime.router
        )
    kicker = runtime.manager if runtime.manager is not None else _LateKicker()
    intake_mod = part("mailstack.intake")
    if intake_mod is not None and runtime.store is not None:
        runtime.intake = intake_mod.Intake(config, runtime.store, kicker, run_blocking, reactor)
        if runtime.manager is not None:
            runtime.manager.intake = runtime.intake

    service = MailService(runtime, pool)
    service.placeholders = placeholders
    for kind, module_name in PROTOCOLS.items():
        descriptions = getattr(config.listen, kind)
        if not descriptions:
            continue
        module = optional_module(module_name)
        if module is None:
            if module_name not in placeholders:
                placeholders.append(module_name)
            factory: IProtocolFactory = PlaceholderFactory(
                _PLACEHOLDER_POP3 if kind.startswith("pop3") else _PLACEHOLDER_SMTP
            )
        else:
            factory = module.make_factory(kind, runtime)
        for description in descriptions:
            service.add_listener(kind, description, factory)
    return service


def build_remote_agent(config: Any, reactor: Any, run_blocking: Callable[..., Deferred], placeholders: list[str]) -> Any:
    """The outbound agent (delivery/remote.py with mx.py), or a deferring stand-in."""
    remote = optional_module("mailstack.delivery.remote")
    if remote is None:
        placeholders.append("mailstack.delivery.remote")
        return _NoRemoteAgent()
    return remote.build(config, reactor, run_blocking)
