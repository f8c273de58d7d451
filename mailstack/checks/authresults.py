# -*- test-case-name: tests.test_checks_inbound -*-
"""The ``Authentication-Results:`` field (RFC 8601) on mail of MX sessions.

At end of data, after SPF, DKIM and DMARC, one field naming our hostname and
their results (``inbound.authresults.build``) is prepended, and every field
of the client's header section that claims our hostname as its authserv-id
is removed: section 5 says such fields arriving from outside are forged.
A method turned off in ``[inbound]`` is left out of the field.
"""

from __future__ import annotations

from mailstack.inbound.authresults import build, is_forged
from mailstack.interfaces import IMessage
from mailstack.pipeline import Check, Connection, Transaction, Verdict


class AuthResultsCheck(Check):
    """Adds our Authentication-Results field, drops forged ones."""

    name = "authresults"
    submission = False

    def __init__(self, hostname: str, spf: bool, dkim: bool, dmarc: bool) -> None:
        self.hostname = hostname
        self.methods = {"spf": spf, "dkim": dkim, "dmarc": dmarc}

    def forged(self, name: str, raw: bytes) -> bool:
        """Whether a client's field is an Authentication-Results claiming our hostname."""
        return is_forged(name, raw.partition(b":")[2], self.hostname)

    def data(self, conn: Connection, txn: Transaction, message: IMessage) -> Verdict:
        found = {m: txn.notes.get(m, [] if m == "dkim" else None) if on else None for m, on in self.methods.items()}
        text = build(self.hostname, spf=found["spf"], dkim=found["dkim"], dmarc=found["dmarc"])
        return Verdict(prepend=(text.encode("utf-8"),), remove=self.forged)
