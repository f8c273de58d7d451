# -*- test-case-name: tests.inbound.test_dmarc -*-
"""DMARC (RFC 7489): does the From domain's owner vouch for this message?

* ``from_domains(values)`` takes the raw ``From:`` field values and returns the
  author domains, or raises ``FromError`` when there is no From field, more
  than one, or one that cannot be parsed: RFC 7489 section 6.6.1 says such
  messages are "typically rejected"; the caller decides.
* ``DMARCEvaluator.evaluate(from_domain, spf, dkim)`` looks up the policy
  (section 6.6.3: ``_dmarc.<from domain>``, then ``_dmarc.<organizational
  domain>``), checks identifier alignment (section 3.1) of the SPF-checked
  domain and each passing DKIM ``d=`` with the From domain, and fires with a
  ``DMARCResult``: pass, fail, none, temperror or permerror, plus the
  disposition to apply (none, quarantine, reject) after ``pct``
  (section 6.6.4), drawn from the injected rng.

The organizational domain (section 3.2) comes from ``publicsuffixlist`` and
the Public Suffix List bundled with it.  The list changes every few weeks;
upgrading the package (``pip install -U publicsuffixlist``) brings the current
one, and a release of mailstack pins no older version than it was tested with.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.headerregistry import Address
from email.policy import SMTPUTF8

from publicsuffixlist import PublicSuffixList
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolver
from twisted.names import dns
from twisted.names.error import DNSNameError
from zope.interface import implementer

from mailstack.inbound.dnsutil import (
    DNS_TIMEOUT,
    TempDNSError,
    lookup,
    txt_strings,
    valid_name,
)
from mailstack.inbound.interfaces import AuthOutcome, IDMARCEvaluator

PASS, FAIL, NONE, TEMPERROR, PERMERROR = "pass", "fail", "none", "temperror", "permerror"
POLICIES = ("none", "quarantine", "reject")
_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}  # section 6.6.4


class FromError(ValueError):
    """No usable RFC 5322 From domain (section 6.6.1)."""


@dataclass(frozen=True)
class Policy:
    """A parsed DMARC record (section 6.3); defaults per tag."""

    p: str
    sp: str | None = None
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"


@dataclass(frozen=True)
class DMARCResult:
    """``result``; ``policy`` the domain owner's request for this message
    (``sp`` for a subdomain), ``disposition`` what to do after ``pct``;
    ``record_domain`` where the record was found ("" without one)."""

    result: str
    from_domain: str
    policy: str = "none"
    disposition: str = "none"
    spf_aligned: bool = False
    dkim_aligned: bool = False
    record_domain: str = ""
    reason: str = ""


# --- Author domain (section 3.1, 6.6.1) ------------------------------------------


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
# The usual From values, "Name <local@domain>" (a phrase of atoms) or a bare
# addr-spec, read without the email package, which costs far more per message.
_SIMPLE_FROM = re.compile(
    rf"^(?:(?:{_ATEXT}|[ \t])*<{_ATEXT}+(?:\.{_ATEXT}+)*@([A-Za-z0-9.-]+)>|{_ATEXT}+(?:\.{_ATEXT}+)*@([A-Za-z0-9.-]+))$"
)


def from_domains(values: Sequence[str]) -> tuple[str, ...]:
    """The distinct author domains of the From field values (one field expected)."""
    if not values:
        raise FromError("no From header field")
    if len(values) > 1:
        raise FromError("more than one From header field")
    simple = _SIMPLE_FROM.match(values[0].strip())
    if simple:
        domain = (simple.group(1) or simple.group(2)).lower().rstrip(".")
        if not valid_name(domain) or "." not in domain:
            raise FromError("From address without a valid domain")
        return (domain,)
    try:
        header = SMTPUTF8.header_factory("from", values[0])
        addresses: tuple[Address, ...] = tuple(header.addresses)
    except Exception as e:  # noqa: BLE001  (the email package raises many types on garbage)
        raise FromError(f"unparsable From: {e}") from None
    if header.defects:
        raise FromError("unparsable From header field")
    domains = []
    for address in addresses:
        domain = address.domain.lower().rstrip(".")
        if not domain or domain.startswith("[") or not valid_name(domain) or "." not in domain:
            raise FromError("From address without a valid domain")
        if domain not in domains:
            domains.append(domain)
    if not domains:
        raise FromError("From header field without an address")
    return tuple(domains)


def strictest(results: Sequence[DMARCResult]) -> DMARCResult:
    """For a From field naming several domains (section 6.6.1): the failing
    result with the strictest disposition, else the first result."""
    failing = [r for r in results if r.result == FAIL]
    if not failing:
        return results[0]
    return max(failing, key=lambda r: POLICIES.index(r.disposition))


# --- Records (section 6.3, 6.4) ---------------------------------------------------


@functools.lru_cache(maxsize=1024)  # mail repeats a few senders' records; Policy is immutable
def parse_record(text: str) -> Policy | None:
    """The policy of a record; None when it has no valid ``p=`` (nor ``rua=``
    that would make it p=none, section 6.6.3).  Unknown tags are ignored,
    invalid optional values fall back to their defaults."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        if re.search(r"mailto:\S+@\S+", tags.get("rua", ""), re.IGNORECASE):
            p = "none"
        else:
            return None
    sp = tags.get("sp", "").lower() or None
    if sp is not None and sp not in POLICIES:
        sp = None
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if pct_text.isdigit() and int(pct_text) <= 100 else 100
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return Policy(p, sp, pct, adkim if adkim in "rs" and adkim else "r", aspf if aspf in "rs" and aspf else "r")


@functools.cache
def bundled_psl() -> PublicSuffixList:
    """The list shipped with publicsuffixlist, parsed once per process (about 0.3 s)."""
    return PublicSuffixList()


def _is_dmarc(record: bytes) -> bool:
    return re.match(rb"^v\s*=\s*DMARC1\s*(;|$)", record) is not None  # section 6.4: first tag


@implementer(IDMARCEvaluator)
class DMARCEvaluator:
    """Policy discovery on a twisted.names resolver; ``rng`` draws ``pct``."""

    def __init__(
        self,
        resolver: IResolver,
        rng: random.Random,
        psl: PublicSuffixList | None = None,
        timeout: tuple[int, ...] = DNS_TIMEOUT,
    ) -> None:
        self.resolver = resolver
        self.rng = rng
        self.psl = psl if psl is not None else bundled_psl()
        # Alignment asks for the same few domains' org domains on every message.
        self._organizational = functools.lru_cache(maxsize=4096)(self._organizational_uncached)
        self.timeout = timeout

    def organizational_domain(self, domain: str) -> str:
        """Section 3.2: the public suffix plus one label (the domain itself if shorter)."""
        return self._organizational(domain.lower().rstrip("."))

    def _organizational_uncached(self, domain: str) -> str:
        return self.psl.privatesuffix(domain) or domain

    def aligned(self, authenticated: str, author: str, mode: str) -> bool:
        """Section 3.1.1/3.1.2: strict means equal, relaxed the same organizational domain."""
        a, b = authenticated.lower().rstrip("."), author.lower().rstrip(".")
        if mode == "s":
            return a == b
        return self.organizational_domain(a) == self.organizational_domain(b)

    def evaluate(self, from_domain: str, spf: AuthOutcome, dkim: Sequence[AuthOutcome]) -> Deferred[DMARCResult]:
        """Deferred DMARCResult for one author domain."""
        return Deferred.fromCoroutine(self._evaluate(from_domain.lower().rstrip("."), spf, dkim))

    async def _evaluate(self, domain: str, spf: AuthOutcome, dkim: Sequence[AuthOutcome]) -> DMARCResult:
        try:
            found = await self._discover(domain)
        except TempDNSError as e:
            return DMARCResult(TEMPERROR, domain, reason=str(e))
        if found is None:
            return DMARCResult(NONE, domain, reason="no DMARC record")
        record_domain, policy = found
        if policy is None:
            return DMARCResult(PERMERROR, domain, record_domain=record_domain, reason="DMARC record without a valid p=")
        spf_ok = spf.result == "pass" and bool(spf.domain) and self.aligned(spf.domain, domain, policy.aspf)
        dkim_ok = any(d.result == "pass" and d.domain and self.aligned(d.domain, domain, policy.adkim) for d in dkim)
        requested = policy.sp if (record_domain != domain and policy.sp) else policy.p
        if spf_ok or dkim_ok:
            return DMARCResult(PASS, domain, requested, "none", spf_ok, dkim_ok, record_domain)
        disposition = requested
        if policy.pct < 100 and self.rng.random() * 100 >= policy.pct:
            disposition = _WEAKER[requested]
        return DMARCResult(
            FAIL, domain, requested, disposition, False, False, record_domain, "no aligned SPF or DKIM pass"
        )

    async def _discover(self, domain: str) -> tuple[str, Policy | None] | None:
        """Section 6.6.3: (where, policy) of the record applying to ``domain``."""
        record = await self._record(domain)
        if record is not None:
            return domain, parse_record(record)
        org = self.organizational_domain(domain)
        if org != domain:
            record = await self._record(org)
            if record is not None:
                return org, parse_record(record)
        return None

    async def _record(self, domain: str) -> str | None:
        """The one DMARC record at ``_dmarc.<domain>``; None for none or several."""
        try:
            found = txt_strings(await lookup(self.resolver, f"_dmarc.{domain}", dns.TXT, self.timeout))
        except DNSNameError:
            return None
        records = [r for r in found if _is_dmarc(r)]
        if len(records) != 1:
            return None
        return records[0].decode("ascii", "replace")
