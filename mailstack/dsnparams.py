# -*- test-case-name: tests.test_dsnparams -*-
"""DSN request parameters (RFC 3461): xtext and the NOTIFY, ORCPT, RET and ENVID values.

Pure functions; each returns the decoded value or raises ``DSNParamError``
(the SMTP session answers 501 5.5.4).  The decoded values are stored in the
queue envelope and echoed in DSNs (RFC 3464 ``Original-Envelope-Id``,
``Original-Recipient``) and passed on, re-encoded, to next hops that offer DSN.
"""

from __future__ import annotations

import re

NEVER = "NEVER"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
DELAY = "DELAY"
_NOTIFY_VALUES = frozenset((SUCCESS, FAILURE, DELAY))
RETURN_VALUES = ("FULL", "HDRS")  # RFC 3461 section 4.3
MAX_ENVID = 100  # RFC 3461 section 4.4: at most 100 characters (encoded)
MAX_ORCPT = 500  # RFC 3461 section 4.2: at most 500 characters (encoded)

# RFC 3461 section 4: xtext = *( xchar / hexchar ); xchar: "!".."~" except "+" and "=";
# hexchar = "+" 2(%x30-39 / %x41-46), upper-case hex digits only.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")  # RFC 3461 section 4.2: an atom


class DSNParamError(ValueError):
    """A malformed DSN parameter value."""


def xtext_decode(text: str) -> str:
    """RFC 3461 section 4; the decoded text must be printable ASCII (it is echoed in headers)."""
    if not _XTEXT.match(text):
        raise DSNParamError("malformed xtext")
    decoded = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text)
    if any(not (0x20 <= ord(c) < 0x7F) for c in decoded):
        raise DSNParamError("control characters in xtext")
    return decoded


def xtext_encode(text: str) -> str:
    """The xtext form of printable ASCII ``text`` (``+``, ``=`` and the rest as ``+XX``)."""
    return "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "+=" else f"+{ord(c):02X}" for c in text)


def parse_notify(value: str) -> tuple[str, ...]:
    """``NEVER`` alone, or a comma list of SUCCESS, FAILURE, DELAY (RFC 3461 section 4.1)."""
    items = tuple(v.upper() for v in value.split(","))
    if items == (NEVER,):
        return items
    if not items or any(v not in _NOTIFY_VALUES for v in items) or len(set(items)) != len(items):
        raise DSNParamError("bad NOTIFY")
    return items


def parse_orcpt(value: str) -> str:
    """``addr-type;xtext`` -> ``"addr-type;decoded"`` (RFC 3461 section 4.2)."""
    if len(value) > MAX_ORCPT:
        raise DSNParamError("ORCPT too long")
    addr_type, semi, address = value.partition(";")
    if not semi or not _ADDR_TYPE.match(addr_type) or not address:
        raise DSNParamError("bad ORCPT")
    return f"{addr_type.lower()};{xtext_decode(address)}"


def parse_ret(value: str) -> str:
    value = value.upper()
    if value not in RETURN_VALUES:
        raise DSNParamError("bad RET")
    return value


def parse_envid(value: str) -> str:
    if not value or len(value) > MAX_ENVID:
        raise DSNParamError("bad ENVID")
    return xtext_decode(value)


def orcpt_param(orcpt: str) -> str:
    """The ``ORCPT=`` value to send for a stored ``"addr-type;decoded"``."""
    addr_type, _, address = orcpt.partition(";")
    return f"{addr_type};{xtext_encode(address)}"
