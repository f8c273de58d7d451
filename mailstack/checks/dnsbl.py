# -*- test-case-name: tests.test_checks_inbound -*-
"""DNS block lists at connect (``inbound.dnsbl``): a listed client gets 554 5.7.1.

Every list is asked in parallel (``inbound.dnsbl.DNSBLChecker``); the first
list in configured order that lists the client is named in the reply
(RFC 5321 section 3.1: a 554 greeting, then only QUIT).  An error code
(127.255.255.x), a timeout or a broken list is logged and never refuses.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from mailstack.checks.refusals import listed, refuse
from mailstack.errors import Reply
from mailstack.inbound.interfaces import IDNSBLChecker
from mailstack.pipeline import Check, Connection


class DNSBLCheck(Check):
    """Refuses a connection from a listed client of an MX session."""

    name = "dnsbl"
    submission = False

    def __init__(self, checker: IDNSBLChecker) -> None:
        self.checker = checker

    def connect(self, conn: Connection) -> Deferred[Reply | None]:
        def answer(zone: str | None) -> Reply | None:
            if zone is None:
                return None
            return refuse(conn, self.name, f"listed in {zone}", listed(zone))

        d: Deferred[Reply | None] = self.checker.listed(conn.peer).addCallback(answer)
        return d
