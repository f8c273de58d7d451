# -*- test-case-name: tests.test_checks_inbound -*-
"""rspamd at end of data (``inbound.rspamd``), after the authentication checks.

The message goes to rspamd's ``/checkv2`` (``inbound.rspamd.RspamdClient``,
streamed from the spool) with the envelope; its action decides:
``reject`` -> 550 5.7.1 and nothing stored; ``soft reject`` or ``greylist``
-> 451 4.7.1; ``add header`` or ``rewrite subject`` -> delivered with
``X-Spam: yes`` and ``X-Spam-Score: <score> / <required>``.  When rspamd
cannot be asked, ``inbound.rspamd_failure`` says what happens: ``tempfail``
(451 4.7.1: the client retries, no unscanned mail gets in) or ``accept``.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailstack.checks.dmarc import TAGGED
from mailstack.checks.refusals import SCANNER_DOWN, SPAM, SPAM_TEMPFAIL, refuse
from mailstack.inbound.interfaces import IRspamdClient
from mailstack.inbound.rspamd import REFUSE, TAG, TEMPFAIL, Envelope, RspamdUnavailable
from mailstack.inbound.rspamd import Verdict as RspamdVerdict
from mailstack.interfaces import IMessage
from mailstack.pipeline import Check, Connection, Transaction, Verdict


class RspamdCheck(Check):
    """Asks rspamd about a message of an MX session."""

    name = "rspamd"
    submission = False
    log = Logger()

    def __init__(self, client: IRspamdClient, tempfail_when_down: bool = True) -> None:
        self.client = client
        self.tempfail_when_down = tempfail_when_down

    def data(self, conn: Connection, txn: Transaction, message: IMessage) -> Deferred[Verdict | None]:
        envelope = Envelope(
            mail_from=str(txn.sender) if txn.sender is not None else "",
            recipients=[str(d.original) for d in txn.recipients],
            ip=conn.peer,
            helo=conn.helo,
            hostname=conn.hostname,
        )
        d: Deferred[Verdict | None] = self.client.scan(message, envelope).addCallbacks(
            self._decide, self._down, callbackArgs=(conn, txn), errbackArgs=(conn,)
        )
        return d

    def _decide(self, verdict: RspamdVerdict, conn: Connection, txn: Transaction) -> Verdict | None:
        reason = f"action {verdict.action}, score {verdict.score:.2f} / {verdict.required_score:.2f}"
        if verdict.decision == REFUSE:
            return Verdict(reply=refuse(conn, self.name, reason, SPAM))
        if verdict.decision == TEMPFAIL:
            return Verdict(reply=refuse(conn, self.name, reason, SPAM_TEMPFAIL))
        if verdict.decision == TAG:
            fields = [f"{name}: {value}\r\n".encode() for name, value in verdict.headers]
            if txn.notes.get(TAGGED):
                fields = [f for f in fields if not f.lower().startswith(b"x-spam:")]
            txn.notes[TAGGED] = True
            return Verdict(prepend=tuple(fields))
        return None

    def _down(self, failure: Failure, conn: Connection) -> Verdict | None:
        failure.trap(RspamdUnavailable)
        reason = f"rspamd unavailable: {failure.getErrorMessage()}"
        if self.tempfail_when_down:
            return Verdict(reply=refuse(conn, self.name, reason, SCANNER_DOWN))
        self.log.warn(  # noqa: G010  (twisted.logger has warn, not warning)
            "{reason}; accepted unscanned (inbound.rspamd_failure = accept) peer={peer}", reason=reason, peer=conn.peer
        )
        return None
