# -*- test-case-name: tests.test_checks_inbound -*-
"""DMARC (RFC 7489) at end of data (``inbound.dmarc``).

The From domain's policy is applied to the SPF and DKIM results the checks
before left in ``txn.notes``: a failing message whose disposition (after
``pct``) is ``reject`` gets 550 5.7.1 and is not stored (section 6.7: the
receiver MAY reject during the SMTP transaction); ``quarantine`` delivers it
with ``X-Spam: yes``, which mail filters and clients file as junk.

A temporary DNS failure (``temperror``) accepts the message, reported as such
in Authentication-Results: the From domain's DNS being down must not hold up
all its mail, and section 6.6.2 gives no policy to apply without a record.
A message without exactly one parsable From field has no author domain
(section 6.6.1): it is reported as ``dmarc=permerror`` and accepted.
"""

from __future__ import annotations

import re

from twisted.internet.defer import Deferred, gatherResults

from mailstack.checks.refusals import DMARC_REJECT, refuse
from mailstack.inbound.dmarc import (
    PERMERROR,
    DMARCEvaluator,
    DMARCResult,
    FromError,
    from_domains,
    strictest,
)
from mailstack.inbound.spf import NONE, SPFResult
from mailstack.interfaces import IMessage
from mailstack.pipeline import Check, Connection, Transaction, Verdict

X_SPAM = b"X-Spam: yes\r\n"
_FOLD = re.compile(r"\r?\n(?=[ \t])")
TAGGED = "x-spam"  # txn.notes key: X-Spam: yes was added already


def from_values(message: IMessage) -> list[str]:
    """The values of the message's From fields, unfolded (RFC 5322 section 2.2.3)."""
    return [
        _FOLD.sub("", raw.partition(b":")[2].decode("utf-8", "replace")).strip()
        for name, raw in message.header
        if name.lower() == "from"
    ]


class DMARCCheck(Check):
    """Evaluates the From domain's policy for a message of an MX session."""

    name = "dmarc"
    submission = False

    def __init__(self, evaluator: DMARCEvaluator) -> None:
        self.evaluator = evaluator

    def data(self, conn: Connection, txn: Transaction, message: IMessage) -> Verdict | None | Deferred[Verdict | None]:
        try:
            domains = from_domains(from_values(message))
        except FromError as e:
            txn.notes[self.name] = DMARCResult(PERMERROR, "", reason=str(e))
            return None
        spf = txn.notes.get("spf") or SPFResult(NONE, "mailfrom", "", "")
        dkim = txn.notes.get("dkim", [])
        evaluations = [self.evaluator.evaluate(domain, spf, dkim) for domain in domains]

        def apply(results: list[DMARCResult]) -> Verdict | None:
            result = strictest(results)
            txn.notes[self.name] = result
            if result.disposition == "reject":
                reason = f"p={result.policy} of {result.from_domain}: {result.reason}"
                return Verdict(reply=refuse(conn, self.name, reason, DMARC_REJECT))
            if result.disposition == "quarantine" and not txn.notes.get(TAGGED):
                txn.notes[TAGGED] = True
                return Verdict(prepend=(X_SPAM,))
            return None

        d: Deferred[Verdict | None] = gatherResults(evaluations).addCallback(apply)
        return d
