"""The seams between the inbound checks and the message pipeline that calls them.

Every method returns a Deferred and never blocks the reactor: DNS goes
through twisted.names, file reads and crypto through ``run_blocking``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from mailstack.inbound.rspamd import Envelope
    from mailstack.interfaces import IMessage


class AuthOutcome(Protocol):
    """What DMARC reads of an SPF or DKIM result (``SPFResult``, ``DKIMResult``)."""

    @property
    def result(self) -> str: ...

    @property
    def domain(self) -> str: ...


class ISPFVerifier(Interface):
    """RFC 7208 check of the MAIL FROM (or HELO) identity."""

    def check(ip: str, mail_from: str, helo: str) -> Deferred:
        """Deferred[spf.SPFResult]; ``mail_from`` "" means ``<>`` (the HELO identity)."""


class IDKIMVerifier(Interface):
    """RFC 6376 verification of every DKIM-Signature of a stored message."""

    def verify(path: str) -> Deferred:
        """Deferred[list[dkimverify.DKIMResult]]: one per signature, in header order."""


class IDMARCEvaluator(Interface):
    """RFC 7489 evaluation of the From domain against SPF and DKIM results."""

    def evaluate(from_domain: str, spf: AuthOutcome, dkim: Sequence[AuthOutcome]) -> Deferred:
        """Deferred[dmarc.DMARCResult]."""


class IDNSBLChecker(Interface):
    """DNS block lists queried for a client address."""

    def listed(ip: str) -> Deferred:
        """Deferred[str | None]: the first list (in configured order) listing ``ip``."""


class IGreylist(Interface):
    """Greylisting of (client network, sender, recipient) triplets."""

    def check(ip: str, sender: str, recipient: str) -> Deferred:
        """Deferred[bool]: True when the triplet may pass now."""


class IRspamdClient(Interface):
    """A scan of one message by rspamd's HTTP API."""

    url = Attribute("the base URL, e.g. http://127.0.0.1:11333")

    def scan(message: str | bytes | IMessage, envelope: Envelope) -> Deferred:
        """Deferred[rspamd.Verdict] for a message file path, small bytes or an
        ``interfaces.IMessage``;
        errbacks rspamd.RspamdUnavailable."""
