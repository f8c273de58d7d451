# -*- test-case-name: tests.test_address -*-
"""Parsing and normalising RFC 5321 paths; the one gate between addresses and paths.

Pure functions, no I/O.  Domains are compared as lowercase IDNA A-labels; local
parts keep their case on the wire but are looked up lowercased (``Address.key``).
Nothing derived from an address may become a file name unless
``mailbox_components`` accepted it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import idna


class AddressError(ValueError):
    """The text is not an acceptable address; the message says why, for a human."""


# RFC 5321 section 4.1.2 / RFC 5322 section 3.2.3, with RFC 6532 section 3.2:
# atext and qtext also take UTF8-non-ascii (here: no C1 controls, surrogates,
# U+FFFD or noncharacters U+FFFE/U+FFFF).  Whether a session may use such an
# address (SMTPUTF8, RFC 6531) is smtp.syntax's business.
_UTF8_NON_ASCII = "\u00a0-\ud7ff\ue000-\ufffc\U00010000-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_UTF8_NON_ASCII}-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(\.{_ATEXT}+)*\Z")
_QUOTED = re.compile(rf'"((?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8_NON_ASCII}]|\\[\x20-\x7e])*)"\Z')
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_IPV4 = re.compile(r"\[(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\]\Z")
_IPV6 = re.compile(r"\[IPv6:[0-9A-Fa-f:.]+\]\Z")

# RFC 5321 section 4.5.3.1: local part 64 octets, domain 255, path 256.
MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256


def normalize_domain(text: str) -> str:
    """Lowercase A-label form of a domain; address literals are kept as written."""
    v4 = _IPV4.match(text)
    if v4:
        if any(int(p) > 255 for p in v4.groups()):
            raise AddressError(f"bad address literal {text!r}")
        return text
    if _IPV6.match(text):
        return text
    if not text or len(text) > MAX_DOMAIN or text.endswith(".") or ".." in text:
        raise AddressError(f"bad domain {text!r}")
    try:
        if text.isascii():
            ascii_name = text.lower()
        else:
            ascii_name = idna.encode(text, uts46=True).decode("ascii")
    except idna.IDNAError:
        raise AddressError(f"bad domain {text!r}") from None
    for label in ascii_name.split("."):
        if not _LABEL.match(label):
            raise AddressError(f"bad domain {text!r}")
    return ascii_name


@dataclass(frozen=True)
class Address:
    """A mailbox ``local@domain``; ``domain`` is normalised."""

    local: str
    domain: str

    def __str__(self) -> str:
        local = self.local
        if not _DOT_ATOM.match(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}"

    @property
    def key(self) -> str:
        """The lookup form: lowercased local part, normalised domain."""
        return f"{self.local.lower()}@{self.domain}"

    @property
    def is_postmaster(self) -> bool:
        return self.local.lower() == "postmaster"


# Unicode categories never allowed in an address: controls, format characters
# (bidi overrides, zero-width), surrogates, private use, unassigned, separators.
_BAD_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"))


def _unsafe_unicode(text: str) -> bool:
    return not text.isascii() and any(unicodedata.category(c) in _BAD_CATEGORIES for c in text if ord(c) > 0x7F)


def _parse_local(text: str) -> str:
    """The local part; a UTF-8 one in NFC form (RFC 6532 section 3.1)."""
    if not text.isascii():
        if _unsafe_unicode(text):
            raise AddressError(f"bad local part {text!r}")
        text = unicodedata.normalize("NFC", text)
    if len(text.encode("utf-8", "surrogatepass")) > MAX_LOCAL:
        raise AddressError("local part too long")
    if _DOT_ATOM.match(text):
        return text
    m = _QUOTED.match(text)
    if m:
        return re.sub(r"\\(.)", r"\1", m.group(1))
    raise AddressError(f"bad local part {text!r}")


def parse_address(text: str) -> Address:
    """``local@domain`` without angle brackets (admin command, config, headers)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise AddressError("control characters in address")
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise AddressError(f"{text!r} is not local@domain")
    return Address(_parse_local(local), normalize_domain(domain))


def parse_path(text: str, null_ok: bool = False) -> Address | None:
    """An RFC 5321 Reverse-path or Forward-path: ``<local@domain>``.

    ``<>`` gives None when ``null_ok`` (MAIL FROM).  A source route
    (``<@a,@b:user@c>``) is accepted and ignored as section 4.1.2/C says.
    ``<postmaster>`` without a domain is refused here; callers that accept it
    (RCPT, section 4.1.1.3) check for it first.
    """
    text = text.strip()
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("path must be enclosed in <>")
    inner = text[1:-1]
    if len(inner) > MAX_PATH:
        raise AddressError("path too long")
    if inner == "":
        if null_ok:
            return None
        raise AddressError("null path not allowed here")
    if inner.startswith("@"):
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("bad source route")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError("bad source route")
            normalize_domain(hop[1:])
    return parse_address(inner)


_SAFE_CHAR = rf"[a-z0-9!#$%&'*+=?^_`{{|}}~{_UTF8_NON_ASCII}-]"
_SAFE_COMPONENT = re.compile(rf"{_SAFE_CHAR}+(\.{_SAFE_CHAR}+)*\Z")


def mailbox_components(address: Address) -> tuple[str, str]:
    """``(domain, localpart)`` safe to use as single path components, or AddressError.

    Only lowercase dot-atoms without ``/`` qualify: no ``..``, no leading dot, no
    NUL or control characters, no address literal, no quoted local part.
    A UTF-8 local part (RFC 6531) is its own folder name, lowercased and in
    Unicode NFC form: its characters are atext, so never ``/``, a control
    character, white space or a format character such as U+202E.
    """
    local = address.local.lower()
    domain = address.domain
    for part in (local, domain):
        if not _SAFE_COMPONENT.match(part) or _unsafe_unicode(part) or part in (".", "..") or len(part) > 255:
            raise AddressError(f"{str(address)!r} cannot name a mailbox")
    return domain, local
