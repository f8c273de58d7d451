# -*- test-case-name: tests.test_checks_inbound -*-
"""SPF (RFC 7208) of the MAIL FROM identity, HELO for ``<>`` (``inbound.spf``).

The evaluation starts at MAIL and runs while the client sends RCPT and DATA;
the end-of-data stage waits for it and leaves the ``SPFResult`` in
``txn.notes["spf"]`` for DMARC and Authentication-Results.  SPF alone never
refuses: as RFC 7489 section 10.1 recommends for receivers that apply DMARC,
a failing SPF only counts through the DMARC policy of the From domain.  RFC
7208 section 4.6.4 lets a verifier give up after at least 20 seconds: an
evaluation that takes longer is temperror.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mailstack.inbound.interfaces import ISPFVerifier
from mailstack.inbound.spf import TEMPERROR, SPFResult
from mailstack.interfaces import IMessage
from mailstack.pipeline import Check, Connection, Transaction, Verdict

DEADLINE = 20.0  # RFC 7208 section 4.6.4
_PENDING = "spf.pending"


class SPFCheck(Check):
    """Starts the SPF evaluation at MAIL, collects it at end of data."""

    name = "spf"
    submission = False

    def __init__(self, verifier: ISPFVerifier, clock: IReactorTime, deadline: float = DEADLINE) -> None:
        self.verifier = verifier
        self.clock = clock
        self.deadline = deadline

    def mail(self, conn: Connection, txn: Transaction) -> None:
        sender = str(txn.sender) if txn.sender is not None else ""
        identity, domain = ("mailfrom", txn.sender.domain) if txn.sender is not None else ("helo", conn.helo)

        def late(failure: Failure) -> SPFResult:
            reason = (
                f"no result within {self.deadline:g} s" if failure.check(TimeoutError) else failure.getErrorMessage()
            )
            return SPFResult(TEMPERROR, identity, domain, sender or f"postmaster@{domain}", reason=reason)

        d: Deferred[SPFResult] = self.verifier.check(conn.peer, sender, conn.helo)
        d.addTimeout(self.deadline, self.clock)
        txn.notes[_PENDING] = d.addErrback(late)

    def data(self, conn: Connection, txn: Transaction, message: IMessage) -> Deferred[Verdict | None]:
        def keep(result: SPFResult) -> None:
            txn.notes[self.name] = result

        d: Deferred[Verdict | None] = txn.notes.pop(_PENDING).addCallback(keep)
        return d
