# -*- test-case-name: tests.inbound.test_spf -*-
"""SPF (RFC 7208): may this client address send mail for this domain?

``SPFVerifier.check(ip, mail_from, helo)`` fires with an ``SPFResult``: one
of none, neutral, pass, fail, softfail, temperror, permerror (section 2.6).
The identity is the MAIL FROM domain, or ``postmaster@<helo>`` when MAIL FROM
is ``<>`` (section 2.4).  Every DNS question goes through a twisted.names
``IResolver``; the evaluation is sequential, as the record decides what to ask
next.  Limits of section 4.6.4: at most 10 mechanisms and modifiers that cause
DNS queries, at most 2 "void" lookups (NXDOMAIN or no answer), at most 10 MX
and PTR names looked at per mechanism; over a limit is permerror.

The record grammar (section 4.6.1, 12 "Collected ABNF") is checked for the
whole record before any term is evaluated: a syntax error anywhere is
permerror (section 4.6).  Macros are section 7.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolver
from twisted.names import dns
from twisted.names.error import DNSNameError
from zope.interface import implementer

from mailstack.inbound.dnsutil import (
    DNS_TIMEOUT,
    TempDNSError,
    addresses,
    lookup,
    reverse_name,
    txt_strings,
    valid_name,
)
from mailstack.inbound.interfaces import ISPFVerifier

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

NONE, NEUTRAL, PASS, FAIL, SOFTFAIL, TEMPERROR, PERMERROR = (
    "none",
    "neutral",
    "pass",
    "fail",
    "softfail",
    "temperror",
    "permerror",
)
QUALIFIERS = {"+": PASS, "-": FAIL, "~": SOFTFAIL, "?": NEUTRAL}
DNS_LIMIT = 10  # section 4.6.4: terms causing DNS queries
VOID_LIMIT = 2  # section 4.6.4: lookups answered NXDOMAIN or empty
NAMES_LIMIT = 10  # section 4.6.4: MX exchanges / PTR names examined per term


@dataclass(frozen=True)
class SPFResult:
    """``result`` (section 2.6); ``identity`` "mailfrom" or "helo"; ``domain``
    checked; ``explanation`` (section 6.2, only on fail); ``reason`` a short
    human note for logs and the A-R comment."""

    result: str
    identity: str
    domain: str
    sender: str
    explanation: str = ""
    reason: str = ""


class _Abort(Exception):
    """Ends the evaluation with ``result`` (temperror or permerror)."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


def _perm(reason: str) -> _Abort:
    return _Abort(PERMERROR, reason)


# --- Grammar (section 12) -------------------------------------------------

_MACRO_LETTERS = "slodiphcrtv"
_EXP_ONLY_LETTERS = "crt"  # section 7.2: only in the explanation string
_MACRO_EXPAND = re.compile(r"%(?:\{([a-zA-Z])(\d*)(r?)([.\-+,/_=]*)\}|%|_|-)")
_LITERAL = re.compile(r"[\x21-\x24\x26-\x7e]+")
_TOPLABEL = re.compile(r"^(?:[a-z0-9]*[a-z][a-z0-9]*|[a-z0-9]+-[a-z0-9-]*[a-z0-9])$", re.IGNORECASE)
_MODIFIER = re.compile(r"^([a-z][a-z0-9_.\-]*)=(.*)$", re.IGNORECASE)
_DIRECTIVE = re.compile(r"^([+\-~?]?)([a-z][a-z0-9_.\-]*)(.*)$", re.IGNORECASE)
_IP4_CIDR = r"/(0|[1-9][0-9]?)"
_IP6_CIDR = r"//(0|[1-9][0-9]{0,2})"
_DUAL_CIDR = re.compile(rf"^(.*?)(?:{_IP4_CIDR})?(?:{_IP6_CIDR})?$", re.DOTALL)


def _check_macro_string(text: str, explanation: bool = False) -> None:
    """Raise permerror unless ``text`` is a macro-string (section 7.1)."""
    pos = 0
    while pos < len(text):
        m = _MACRO_EXPAND.match(text, pos)
        if m:
            letter = m.group(1)
            if letter is not None:
                low = letter.lower()
                if low not in _MACRO_LETTERS or (low in _EXP_ONLY_LETTERS and not explanation):
                    raise _perm(f"unknown macro letter {letter!r}")
                if m.group(2) and int(m.group(2)) == 0:
                    raise _perm("macro transformer 0")
            pos = m.end()
            continue
        if explanation and text[pos] == " ":
            pos += 1  # explanation-string = *( macro-string / SP )
            continue
        lit = _LITERAL.match(text, pos)
        if lit is None:
            raise _perm("bad macro-string")
        pos = lit.end()


def _check_domain_spec(spec: str) -> None:
    """domain-spec = macro-string domain-end (section 7.1); checked before expansion."""
    if not spec:
        raise _perm("empty domain-spec")
    _check_macro_string(spec)
    if spec.endswith("}") and _MACRO_EXPAND.search(spec):
        last = list(_MACRO_EXPAND.finditer(spec))[-1]
        if last.end() == len(spec):
            return
    body = spec.removesuffix(".")
    _, dot, top = body.rpartition(".")
    if not dot or not _TOPLABEL.match(top):
        raise _perm(f"bad domain-spec {spec!r}")


@dataclass(frozen=True)
class _Term:
    qualifier: str  # result when a mechanism matches
    name: str  # mechanism name, lower case
    domain: str | None  # domain-spec, None: the current domain
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None  # of ip4/ip6
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True)
class _Record:
    terms: tuple[_Term, ...]
    redirect: str | None
    exp: str | None


def _split_cidr(arg: str) -> tuple[str, int, int]:
    m = _DUAL_CIDR.match(arg)
    assert m is not None  # the pattern matches any string
    c4 = int(m.group(2)) if m.group(2) else 32
    c6 = int(m.group(3)) if m.group(3) else 128
    if c4 > 32 or c6 > 128:
        raise _perm("cidr length out of range")
    return m.group(1), c4, c6


def _parse_term(text: str) -> _Term | tuple[str, str]:
    """A directive as ``_Term``, a modifier as ``(name, value)``."""
    mod = _MODIFIER.match(text)
    if mod:
        name, value = mod.group(1).lower(), mod.group(2)
        if name in ("redirect", "exp"):
            _check_domain_spec(value)
        else:
            _check_macro_string(value)  # unknown modifiers are ignored (section 6)
        return name, value
    m = _DIRECTIVE.match(text)
    if not m:
        raise _perm(f"bad term {text!r}")
    qualifier, name, rest = QUALIFIERS[m.group(1) or "+"], m.group(2).lower(), m.group(3)
    if name == "all":
        if rest:
            raise _perm("bad all")
        return _Term(qualifier, name, None)
    if name in ("include", "exists"):
        if not rest.startswith(":"):
            raise _perm(f"{name} needs a domain")
        _check_domain_spec(rest[1:])
        return _Term(qualifier, name, rest[1:])
    if name == "ptr":
        if rest and not rest.startswith(":"):
            raise _perm("bad ptr")
        if rest:
            _check_domain_spec(rest[1:])
        return _Term(qualifier, name, rest[1:] or None)
    if name in ("a", "mx"):
        spec, c4, c6 = _split_cidr(rest)
        if spec and not spec.startswith(":"):
            raise _perm(f"bad {name}")
        if spec:
            _check_domain_spec(spec[1:])
        return _Term(qualifier, name, spec[1:] or None, cidr4=c4, cidr6=c6)
    if name in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise _perm(f"{name} needs a network")
        net, slash, cidr = rest[1:].partition("/")
        if slash and not re.fullmatch(r"0|[1-9][0-9]{0,2}", cidr):  # "ip4:x/" is no length
            raise _perm(f"bad {name} cidr")
        try:
            addr = ipaddress.IPv4Address(net) if name == "ip4" else ipaddress.IPv6Address(net)
        except ValueError:
            raise _perm(f"bad {name} address") from None
        length = int(cidr) if cidr else addr.max_prefixlen
        if length > addr.max_prefixlen:
            raise _perm(f"bad {name} cidr")
        return _Term(qualifier, name, None, network=ipaddress.ip_network(f"{addr}/{length}", strict=False))
    raise _perm(f"unknown mechanism {name!r}")


@functools.lru_cache(maxsize=1024)  # mail repeats a few senders' records; _Record is immutable
def parse_record(text: str) -> _Record:
    """Parse an SPF record (``v=spf1 ...``); raise permerror on any syntax error."""
    if re.search(r"[^\x20-\x7e]", text):
        raise _perm("control character in record")  # terms are VCHARs separated by SP
    terms: list[_Term] = []
    modifiers: dict[str, str] = {}
    for word in text.split(" ")[1:]:
        if not word:
            continue  # terms are separated by one or more spaces (section 4.6.1)
        term = _parse_term(word)
        if isinstance(term, _Term):
            terms.append(term)
        elif term[0] in ("redirect", "exp"):
            if term[0] in modifiers:
                raise _perm(f"{term[0]} twice")  # section 6
            modifiers[term[0]] = term[1]
    return _Record(tuple(terms), modifiers.get("redirect"), modifiers.get("exp"))


def _select(records: list[bytes]) -> str | None:
    """The one SPF record among a name's TXT records (section 4.5)."""
    found = [r for r in records if re.match(rb"^v=spf1( |$)", r, re.IGNORECASE)]
    if not found:
        return None
    if len(found) > 1:
        raise _perm("more than one SPF record")
    try:
        return found[0].decode("ascii")  # section 3.1: 7-bit ASCII only
    except UnicodeDecodeError:
        raise _perm("non-ASCII SPF record") from None


# --- Evaluation --------------------------------------------------------------


class _Evaluation:
    """One ``check_host()`` run, with the counters shared by its recursion."""

    def __init__(self, verifier: SPFVerifier, ip: IP, sender: str, helo: str) -> None:
        self.v = verifier
        self.ip = ip
        self.sender = sender
        self.helo = helo
        self.dns_terms = 0
        self.voids = 0

    # DNS helpers counting void lookups (section 4.6.4).  The limit is on
    # *terms* whose query finds nothing: the address lookups of an mx term's
    # exchanges (void_counts=False) are not terms of their own.
    async def _query(self, name: str, qtype: int, void_counts: bool = True) -> list:
        if not valid_name(name):
            return []  # a name no query can be made of matches nothing
        try:
            found = await lookup(self.v.resolver, name, qtype, self.v.timeout)
        except DNSNameError:
            found = []
        except TempDNSError as e:
            raise _Abort(TEMPERROR, str(e)) from None
        if not found and void_counts:
            self.voids += 1
            if self.voids > VOID_LIMIT:
                raise _perm("too many void lookups")
        return found

    def _count(self) -> None:
        self.dns_terms += 1
        if self.dns_terms > DNS_LIMIT:
            raise _perm("too many DNS-querying terms")

    async def _addresses_of(self, name: str, void_counts: bool = True) -> list[IP]:
        return addresses(await self._query(name, dns.A if self.ip.version == 4 else dns.AAAA, void_counts))

    def _in(self, candidates: list[IP], c4: int, c6: int) -> bool:
        length = c4 if self.ip.version == 4 else c6
        return any(
            a.version == self.ip.version and self.ip in ipaddress.ip_network(f"{a}/{length}", strict=False)
            for a in candidates
        )

    async def check_host(self, domain: str, top: bool) -> tuple[str, str, str]:
        """-> (result, explanation, reason) for ``domain`` (section 4)."""
        if not valid_name(domain) or "." not in domain.rstrip("."):
            # section 4.3: a malformed or not fully qualified domain is "none".
            return (NONE if top else PERMERROR), "", "not a valid domain"
        try:
            found = await lookup(self.v.resolver, domain, dns.TXT, self.v.timeout)
        except DNSNameError:
            found = []
        except TempDNSError as e:
            return TEMPERROR, "", str(e)
        try:
            text = _select(txt_strings(found))
        except _Abort as e:
            return e.result, "", e.reason
        if text is None:
            return NONE, "", f"no SPF record at {domain}"
        try:
            record = parse_record(text)
            return await self._evaluate(record, domain)
        except _Abort as e:
            return e.result, "", e.reason

    async def _evaluate(self, record: _Record, domain: str) -> tuple[str, str, str]:
        for term in record.terms:
            if await self._matches(term, domain):
                explanation = ""
                if term.qualifier == FAIL:
                    explanation = await self._explain(record.exp, domain)
                return term.qualifier, explanation, f"matched {term.name}"
        if record.redirect is not None:
            # section 6.1: only when no mechanism matched; a target without a
            # record is permerror; the target's own exp= applies, not ours.
            self._count()
            target = await self._expand(record.redirect, domain)
            result, explanation, reason = await self.check_host(target, top=False)
            if result == NONE:
                return PERMERROR, "", f"redirect to {target}: no SPF record"
            return result, explanation, reason
        return NEUTRAL, "", "no mechanism matched"  # section 4.7

    async def _matches(self, term: _Term, domain: str) -> bool:
        name = term.name
        if name == "all":
            return True
        if name == "ip4" or name == "ip6":
            net = term.network
            return net is not None and self.ip.version == net.version and self.ip in net
        self._count()
        target = await self._expand(term.domain, domain) if term.domain is not None else domain
        if name == "a":
            return self._in(await self._addresses_of(target), term.cidr4, term.cidr6)
        if name == "mx":
            exchanges = [p.name.name.decode("ascii", "replace") for p in await self._query(target, dns.MX)]
            if len(exchanges) > NAMES_LIMIT:
                raise _perm("more than 10 MX names")
            for exchange in exchanges:
                if self._in(await self._addresses_of(exchange, void_counts=False), term.cidr4, term.cidr6):
                    return True
            return False
        if name == "ptr":
            return await self._validated(target) is not None
        if name == "exists":
            return bool(await self._query(target, dns.A))  # section 5.7: always an A query
        # include (section 5.2)
        result, _, reason = await self.check_host(target, top=False)
        if result == PASS:
            return True
        if result in (FAIL, SOFTFAIL, NEUTRAL):
            return False
        if result == NONE:
            raise _perm(f"include of {target}: no SPF record")
        raise _Abort(result, reason)

    async def _validated(self, target: str, for_macro: bool = False) -> str | None:
        """The client's validated domain name (section 5.5): a PTR name whose
        forward lookup gives the client address back, and that is ``target``
        or one of its subdomains.  A DNS error on the PTR lookup matches nothing.
        ``for_macro``: the ``%{p}`` value (section 7.3), which falls back to any
        validated name; its lookups belong to no term, so they are not void
        lookups (section 4.6.4)."""
        try:
            names = await self._query(
                reverse_name(self.ip) + (".in-addr.arpa" if self.ip.version == 4 else ".ip6.arpa"),
                dns.PTR,
                void_counts=not for_macro,
            )
        except _Abort as e:
            if e.result == TEMPERROR:
                return None
            raise
        hosts = [p.name.name.decode("ascii", "replace").rstrip(".") for p in names][:NAMES_LIMIT]
        t = target.lower().rstrip(".")
        inside = [h for h in hosts if h.lower() == t or h.lower().endswith("." + t)]
        hosts = inside + [h for h in hosts if h not in inside] if for_macro else inside
        for host in hosts:
            try:
                found = addresses(
                    await lookup(self.v.resolver, host, dns.A if self.ip.version == 4 else dns.AAAA, self.v.timeout)
                )
            except (DNSNameError, TempDNSError):
                continue
            if self.ip in found:
                return host
        return None

    async def _explain(self, exp: str | None, domain: str) -> str:
        """Section 6.2: the explanation TXT, expanded; any problem: the default."""
        default = self.v.default_explanation
        if exp is None:
            return default
        try:
            target = await self._expand(exp, domain)
            found = txt_strings(await lookup(self.v.resolver, target, dns.TXT, self.v.timeout))
            if len(found) != 1:
                return default
            text = found[0].decode("ascii")
            _check_macro_string(text, explanation=True)
            return await self._expand(text, domain, explanation=True)
        except (_Abort, DNSNameError, TempDNSError, UnicodeDecodeError):
            return default

    # --- Macros (section 7) ---------------------------------------------------

    async def _expand(self, text: str, domain: str, explanation: bool = False) -> str:
        """Expand a domain-spec or an explanation string.  ``%{p}`` costs PTR
        lookups, so they are made only when the text uses it (section 7.3)."""
        ptr = "unknown"
        if re.search(r"%\{p", text, re.IGNORECASE):
            ptr = await self._validated(domain, for_macro=True) or "unknown"
        out = _expand(text, self._macro_values(domain, ptr))
        if not explanation:
            while len(out) > 253 and "." in out:  # section 7.3: truncate from the left
                out = out.split(".", 1)[1]
        return out

    def _macro_values(self, domain: str, ptr: str = "unknown") -> Callable[[str], str]:
        local, _, sender_domain = self.sender.rpartition("@")
        ip = self.ip
        if ip.version == 4:
            i, c, v = str(ip), str(ip), "in-addr"
        else:
            i, c, v = ".".join(ip.exploded.replace(":", "")), ip.compressed, "ip6"
        values = {
            "s": self.sender,
            "l": local,
            "o": sender_domain,
            "d": domain,
            "i": i,
            "p": ptr,
            "v": v,
            "h": self.helo,
            "c": c,
            "r": self.v.hostname,
            "t": str(int(self.v.clock())),
        }
        return values.__getitem__


def _expand(text: str, values: Callable[[str], str]) -> str:
    """Section 7.3/7.4: transformers (rightmost N parts, ``r`` reverses),
    delimiters (default "."), parts rejoined with "."; an upper-case letter
    URL-escapes the value."""

    def one(m: re.Match[str]) -> str:
        whole = m.group(0)
        if whole == "%%":
            return "%"
        if whole == "%_":
            return " "
        if whole == "%-":
            return "%20"
        letter, digits, reverse, delims = m.group(1), m.group(2), m.group(3), m.group(4)
        value = values(letter.lower())
        if digits or reverse or delims:
            parts = re.split("[" + re.escape(delims or ".") + "]", value)
            if reverse:
                parts.reverse()
            if digits:
                parts = parts[-int(digits) :]
            value = ".".join(parts)
        if letter.isupper():
            value = urllib.parse.quote(value, safe="-._~")
        return value

    return _MACRO_EXPAND.sub(one, text)


@implementer(ISPFVerifier)
class SPFVerifier:
    """RFC 7208 ``check_host()`` on a twisted.names resolver.

    ``hostname`` is our name (macro ``%{r}``), ``clock`` gives the time for
    ``%{t}`` (``reactor.seconds``), ``default_explanation`` is returned on
    fail when the domain gives none.
    """

    def __init__(
        self,
        resolver: IResolver,
        hostname: str,
        clock: Callable[[], float],
        timeout: tuple[int, ...] = DNS_TIMEOUT,
        default_explanation: str = "",
    ) -> None:
        self.resolver = resolver
        self.hostname = hostname
        self.clock = clock
        self.timeout = timeout
        self.default_explanation = default_explanation

    def check(self, ip: str, mail_from: str, helo: str) -> Deferred[SPFResult]:
        """Check MAIL FROM, or the HELO identity when MAIL FROM is ``<>`` (empty)."""
        return Deferred.fromCoroutine(self._check(ip, mail_from, helo))

    async def _check(self, ip: str, mail_from: str, helo: str) -> SPFResult:
        if mail_from:
            identity, sender = "mailfrom", mail_from
        else:
            identity, sender = "helo", f"postmaster@{helo}"  # section 2.4
        local, at, domain = sender.rpartition("@")
        if not at:
            local, domain = "postmaster", sender
        if not local:
            sender = f"postmaster@{domain}"  # section 4.3
        try:
            addr: IP = ipaddress.ip_address(ip)
        except ValueError:
            return SPFResult(PERMERROR, identity, domain, sender, reason="bad client address")
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # section 5: an IPv4 client seen through IPv6
        if domain.startswith("["):
            return SPFResult(NONE, identity, domain, sender, reason="address literal")
        run = _Evaluation(self, addr, sender, helo)
        result, explanation, reason = await run.check_host(domain, top=True)
        return SPFResult(result, identity, domain, sender, explanation, reason)
