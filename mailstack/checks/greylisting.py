# -*- test-case-name: tests.test_checks_inbound -*-
"""Greylisting at RCPT (``inbound.greylist``): an unknown triplet gets 451 4.7.1.

The triplet is (client /24 or /64, MAIL FROM, RCPT TO); the table is
``inbound.greylist.Greylist``, a service the server starts and stops, kept in
``<data_dir>/greylist.json`` so a restart does not delay known senders again.
A 4xx is what RFC 5321 section 4.2.5 tells the client to retry.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from mailstack.address import Address
from mailstack.checks.refusals import GREYLISTED, refuse
from mailstack.errors import Reply
from mailstack.inbound.interfaces import IGreylist
from mailstack.pipeline import Check, Connection, Transaction


class GreylistCheck(Check):
    """Asks the greylist for each recipient of an MX session."""

    name = "greylist"
    submission = False

    def __init__(self, greylist: IGreylist) -> None:
        self.greylist = greylist

    def rcpt(self, conn: Connection, txn: Transaction, recipient: Address) -> Deferred[Reply | None]:
        sender = txn.sender.key if txn.sender is not None else ""

        def answer(passed: bool) -> Reply | None:
            if passed:
                return None
            return refuse(conn, self.name, f"first try of <{sender}> to <{recipient.key}>", GREYLISTED)

        d: Deferred[Reply | None] = self.greylist.check(conn.peer, sender, recipient.key).addCallback(answer)
        return d
