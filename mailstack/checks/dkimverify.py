# -*- test-case-name: tests.test_checks_inbound -*-
"""DKIM verification at end of data (``inbound.dkim``).

Every DKIM-Signature of the message is verified (RFC 6376 section 6,
``inbound.dkimverify.DKIMVerifier``); the message is read through
``IMessage.run_blocking``: in the thread pool from the spool file, or at once
from the buffer of a small message (a pool call there would cost more than
the verification, about 0.25 ms with RSA-2048).  The results go to
``txn.notes["dkim"]`` for DMARC and Authentication-Results; a failing
signature alone refuses nothing (RFC 6376 section 6.3: it is as if unsigned).
A message whose parsed header section has no DKIM-Signature field at all is
settled on the spot (no results), without a thread pool call.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from mailstack.inbound.dkimverify import DKIMResult, DKIMVerifier
from mailstack.interfaces import IMessage
from mailstack.pipeline import Check, Connection, Transaction, Verdict


class DKIMCheck(Check):
    """Verifies the signatures of a message of an MX session."""

    name = "dkim"
    submission = False

    def __init__(self, verifier: DKIMVerifier) -> None:
        self.verifier = verifier

    def data(self, conn: Connection, txn: Transaction, message: IMessage) -> Deferred[Verdict | None] | None:
        if not any(name.lower() == "dkim-signature" for name, _ in message.header):
            txn.notes[self.name] = []
            return None

        def keep(results: list[DKIMResult]) -> None:
            txn.notes[self.name] = results

        d: Deferred[Verdict | None] = self.verifier.verify_message(message.run_blocking).addCallback(keep)
        return d
