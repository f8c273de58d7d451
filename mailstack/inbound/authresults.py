# -*- test-case-name: tests.inbound.test_authresults -*-
"""The Authentication-Results header field (RFC 8601): writing ours, spotting forged ones.

``build(hostname, spf=..., dkim=..., dmarc=...)`` returns the whole field,
``Authentication-Results: <hostname>; spf=...; dkim=...; dmarc=...``, folded
one result per line and ending in CRLF, ready to go on top of the message.
Property values (section 2.3) are written as a domain, ``local@domain`` or
token when they are one, else as an RFC 2045 quoted-string with ``\\`` and
``"`` escaped; control characters never reach the header.

``claims_authserv_id(value, hostname)`` tells whether an existing field's
authserv-id is ours: section 5 says such fields arriving from outside are
forged and MUST be removed (or renamed) before ours is added.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mailstack.inbound.dkimverify import DKIMResult
from mailstack.inbound.dmarc import DMARCResult
from mailstack.inbound.spf import SPFResult

FIELD = "Authentication-Results"
_TOKEN = re.compile(r"^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+$")  # RFC 2045 token (no tspecials)
_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.?$")
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


def quote(text: str) -> str:
    """An RFC 2045 quoted-string of ``text``: control characters become spaces."""
    clean = re.sub(r"[\x00-\x1f\x7f]", " ", text)
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pvalue(text: str) -> str:
    """A property value (section 2.2 ``pvalue``): as is when it is a domain,
    ``local@domain`` or token, else quoted."""
    local, at, domain = text.rpartition("@")
    if at and _DOMAIN.match(domain) and (not local or _DOT_ATOM.match(local)):
        return text
    if _DOMAIN.match(text) or _TOKEN.match(text):
        return text
    return quote(text)


def _resinfo(method: str, result: str, props: Sequence[tuple[str, str]], reason: str = "") -> str:
    parts = [f"{method}={result}"]
    if reason:
        parts.append(f"reason={quote(reason)}")
    parts.extend(f"{name}={pvalue(value)}" for name, value in props if value)
    return " ".join(parts)


def build(
    hostname: str,
    spf: SPFResult | None = None,
    dkim: Sequence[DKIMResult] | None = None,
    dmarc: DMARCResult | None = None,
) -> str:
    """The complete header field, CRLF-terminated.  A method left as None is
    not reported; ``dkim=[]`` (no signature) is ``dkim=none``; nothing at all
    is ``none`` (section 2.2, ``no-result``)."""
    results: list[str] = []
    if spf is not None:
        if spf.identity == "helo":
            props = [("smtp.helo", spf.domain)]
        else:
            props = [("smtp.mailfrom", spf.sender)]
        results.append(_resinfo("spf", spf.result, props, spf.reason if spf.result not in ("pass", "none") else ""))
    if dkim is not None:
        if not dkim:
            results.append("dkim=none")
        for sig in dkim:
            props = [("header.d", sig.domain), ("header.s", sig.selector), ("header.b", sig.b)]
            results.append(_resinfo("dkim", sig.result, props, sig.reason if sig.result != "pass" else ""))
    if dmarc is not None:
        reason = f"p={dmarc.policy} dis={dmarc.disposition}" if dmarc.result == "fail" else ""
        results.append(_resinfo("dmarc", dmarc.result, [("header.from", dmarc.from_domain)], reason))
    authserv = pvalue(hostname)
    if not results:
        return f"{FIELD}: {authserv}; none\r\n"
    return f"{FIELD}: {authserv};\r\n\t" + ";\r\n\t".join(results) + "\r\n"


def _skip_cfws(text: str, pos: int) -> int:
    """Skip folding white space and (nested) comments (RFC 5322 section 3.2.2)."""
    depth = 0
    while pos < len(text):
        ch = text[pos]
        if depth:
            if ch == "\\":
                pos += 1
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
        elif ch == "(":
            depth = 1
        elif ch not in " \t\r\n":
            break
        pos += 1
    return pos


def authserv_id(value: str | bytes) -> str | None:
    """The authserv-id of an Authentication-Results field value (section 2.2),
    None when there is none."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    pos = _skip_cfws(value, 0)
    if value[pos : pos + 1] == '"':
        out = []
        pos += 1
        while pos < len(value) and value[pos] != '"':
            if value[pos] == "\\":
                pos += 1
            out.append(value[pos : pos + 1])
            pos += 1
        return "".join(out) or None
    m = re.match(r"[^\s;()\"]+", value[pos:])
    return m.group(0) if m else None


def claims_authserv_id(value: str | bytes, hostname: str) -> bool:
    """Whether a field value names ``hostname`` as its authserv-id (compared
    case-insensitively, a trailing dot ignored): a forgery when it arrives
    from outside (section 5)."""
    found = authserv_id(value)
    return found is not None and found.lower().rstrip(".") == hostname.lower().rstrip(".")


def is_forged(name: str | bytes, value: str | bytes, hostname: str) -> bool:
    """Whether the header field ``name: value`` is an Authentication-Results
    field claiming our ``hostname``: to be removed from incoming mail."""
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.strip().lower() == FIELD.lower() and claims_authserv_id(value, hostname)
