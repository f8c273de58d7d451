# -*- test-case-name: tests.smtp.test_syntax -*-
"""MAIL FROM and RCPT TO arguments (RFC 5321 section 4.1.2), as pure functions.

Each returns the parsed value or the ``errors.Reply`` to refuse the command
with; policy (authentication, sender ownership, rate, routing) is the
session's job.  No I/O, so every case is a table test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailstack.address import Address, AddressError, parse_path
from mailstack.errors import Reply
from mailstack.smtp import replies as R

# RFC 5321 4.1.2: Path, then space-separated Mail-parameters.
_PATH_ARGS = re.compile(r'\s*(<(?:"(?:[^"\\]|\\.)*"|[^<>"])*>)(.*)\Z', re.DOTALL)
_ESMTP_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(=[\x21-\x3c\x3e-\x7e]+)?\Z")


@dataclass(frozen=True)
class MailFrom:
    sender: Address | None  # None: the null reverse-path <>
    size: int | None = None  # RFC 1870 SIZE=
    body: str | None = None  # RFC 6152 BODY=, upper case
    params: dict[str, str] = field(default_factory=dict)  # every Mail-parameter given, NAME -> value


def parse_mail_from(arg: str, esmtp: bool, max_size: int) -> MailFrom | Reply:
    """``FROM:<path> [params]``; ``esmtp``: the session said EHLO; ``max_size``: 0 for no limit."""
    if arg[:5].upper() != "FROM:":
        return R.SYNTAX
    m = _PATH_ARGS.match(arg[5:])
    if not m:
        return R.BAD_SENDER
    try:
        sender = parse_path(m.group(1), null_ok=True)
    except AddressError:
        return R.BAD_SENDER
    params = m.group(2).split()
    if params and not esmtp:
        return R.UNKNOWN_PARAMETER
    size: int | None = None
    body: str | None = None
    given: dict[str, str] = {}
    for param in params:
        if not _ESMTP_PARAM.match(param):
            return R.SYNTAX
        name, _, value = param.partition("=")
        name = name.upper()
        given[name] = value
        if name == "SIZE":
            # RFC 1870 section 6
            if not value.isdigit() or len(value) > 20:
                return R.SYNTAX
            size = int(value)
            if max_size and size > max_size:
                return R.MESSAGE_TOO_BIG
        elif name == "BODY":
            # RFC 6152: 8BITMIME
            body = value.upper()
            if body not in ("7BIT", "8BITMIME"):
                return R.SYNTAX
        elif name == "AUTH" and value:
            pass  # RFC 4954 section 5: accepted, not trusted
        else:
            return R.UNKNOWN_PARAMETER
    return MailFrom(sender, size, body, given)


def rcpt_path(arg: str) -> str | Reply:
    """The ``<path>`` of ``TO:<path>``; RCPT takes no parameters here."""
    if arg[:3].upper() != "TO:":
        return R.SYNTAX
    m = _PATH_ARGS.match(arg[3:])
    if not m:
        return R.BAD_RECIPIENT
    if m.group(2).split():
        return R.UNKNOWN_PARAMETER
    return m.group(1)


def recipient(path: str, postmaster_domain: str) -> Address | Reply:
    """The address of a forward-path; bare ``<postmaster>`` is postmaster at ``postmaster_domain``."""
    try:
        if path.lower() == "<postmaster>":
            # RFC 5321 4.1.1.3: "Postmaster" without a domain must be accepted.
            return Address("postmaster", postmaster_domain)
        address = parse_path(path)
    except AddressError:
        return R.BAD_RECIPIENT
    return R.BAD_RECIPIENT if address is None else address


def parse_rcpt_to(arg: str, postmaster_domain: str) -> Address | Reply:
    """``TO:<path>`` -> the recipient address, or the reply refusing it."""
    path = rcpt_path(arg)
    if isinstance(path, Reply):
        return path
    return recipient(path, postmaster_domain)
