# -*- test-case-name: tests.test_service -*-
"""The one object that ties the server's parts together.

``service.make_service`` creates it once per process (``tap.makeService``) and
hands it to every listener factory, so protocols reach the user database, the
router, the intake and the TLS settings through one argument instead of a
dozen.  It holds references only; it does no work of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mailstack.interfaces import IRuntime


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
