# -*- test-case-name: tests.test_service -*-
"""The one object that ties the server's parts together.

``service.make_service`` creates it once per process (``tap.makeService``) and
hands it to every listener factory, so protocols reach the user database, the
router, the intake and the TLS settings through one argument instead of a
dozen.  It holds references, plus the state every listener of a protocol
shares (connection caps, the sending limits, the metrics); it does no work of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mailstack.connlimit import connection_limiters
from mailstack.interfaces import IConnectionSlots, IMetrics, IRuntime
from mailstack.metrics import NoMetrics


@implementer(IRuntime)
class Runtime:
    """See ``interfaces.IRuntime`` for each attribute."""

    def __init__(
        self,
        config: Any,
        reactor: Any,
        run_blocking: Callable[..., Deferred],
        users: Any,
        aliases: Any,
        checker: Any,
        throttle: Any,
        tls: Any,
        router: Any = None,
        store: Any = None,
        intake: Any = None,
        manager: Any = None,
        maildirs: Any = None,
        pipeline: Any = None,
        signer: Any = None,
        send_limits: Any = None,
        metrics: IMetrics | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.run_blocking = run_blocking
        self.users = users
        self.aliases = aliases
        self.checker = checker
        self.throttle = throttle
        self.tls = tls
        self.router = router
        self.store = store
        self.intake = intake
        self.manager = manager
        self.maildirs = maildirs
        # Shared by every listener of a protocol, so built here, once (a worker's ask the master).
        limiters = connection_limiters(config)
        self.smtp_connections: IConnectionSlots = limiters["smtp"]
        self.submission_connections: IConnectionSlots = limiters["submission"]
        self.pop3_connections: IConnectionSlots = limiters["pop3"]
        self.send_limits = send_limits
        self.metrics: IMetrics = metrics if metrics is not None else NoMetrics()
        self.pipeline = pipeline
        self.signer = signer
