# -*- test-case-name: tests.smtp.test_syntax -*-
"""MAIL FROM and RCPT TO arguments (RFC 5321 section 4.1.2), as pure functions.

Parameters: SIZE (RFC 1870), BODY (RFC 6152), AUTH (RFC 4954), SMTPUTF8
(RFC 6531), RET/ENVID and NOTIFY/ORCPT (RFC 3461, values in ``dsnparams``).
A path with non-ASCII characters needs the SMTPUTF8 parameter of its
transaction (RFC 6531 section 3.3; without it 553 5.6.7); a line that was not
valid UTF-8 reaches us with U+FFFD in it and is refused 501 5.6.7.

Each returns the parsed value or the ``errors.Reply`` to refuse the command
with; policy (authentication, sender ownership, rate, routing) is the
session's job.  No I/O, so every case is a table test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailstack import dsnparams
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
    ret: str = ""  # RFC 3461 RET=: "FULL", "HDRS" or "" (not given)
    envid: str = ""  # RFC 3461 ENVID=, decoded
    smtputf8: bool = False  # RFC 6531 SMTPUTF8


@dataclass(frozen=True)
class RcptTo:
    path: str  # the <path> as given
    notify: tuple[str, ...] = ()  # RFC 3461 NOTIFY=, upper case; () when not given
    orcpt: str = ""  # RFC 3461 ORCPT=, "addr-type;decoded"


def _path_refusal(path: str, smtputf8: bool) -> Reply | None:
    """RFC 6531 section 3.3: non-ASCII paths only in SMTPUTF8 transactions."""
    if "\ufffd" in path:
        return R.BAD_UTF8
    if not path.isascii() and not smtputf8:
        return R.NEED_SMTPUTF8
    return None


def _parameters(text: str) -> dict[str, str] | Reply:
    """ESMTP parameters ``NAME[=value] ...`` (RFC 5321 section 4.1.2) by upper-case
    name; 501 for bad syntax or a parameter given twice (RFC 3461 section 4)."""
    given: dict[str, str] = {}
    for param in text.split():
        if not _ESMTP_PARAM.match(param):
            return R.SYNTAX
        name, _, value = param.partition("=")
        name = name.upper()
        if name in given:
            return R.SYNTAX
        given[name] = value
    return given


def parse_mail_from(arg: str, esmtp: bool, max_size: int) -> MailFrom | Reply:
    """``FROM:<path> [params]``; ``esmtp``: the session said EHLO; ``max_size``: 0 for no limit."""
    if arg[:5].upper() != "FROM:":
        return R.SYNTAX
    m = _PATH_ARGS.match(arg[5:])
    if not m:
        return R.BAD_SENDER
    if m.group(2).split() and not esmtp:
        return R.UNKNOWN_PARAMETER
    given = _parameters(m.group(2))
    if isinstance(given, Reply):
        return given
    size: int | None = None
    body: str | None = None
    ret = envid = ""
    for name, value in given.items():
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
        elif name == "SMTPUTF8" and not value:
            pass  # RFC 6531 section 3.4
        elif name in ("RET", "ENVID"):
            try:
                if name == "RET":
                    ret = dsnparams.parse_ret(value)
                else:
                    envid = dsnparams.parse_envid(value)
            except dsnparams.DSNParamError:
                return R.BAD_DSN_PARAMETER
        else:
            return R.UNKNOWN_PARAMETER
    smtputf8 = "SMTPUTF8" in given
    refusal = _path_refusal(m.group(1), smtputf8)
    if refusal is not None:
        return refusal
    try:
        sender = parse_path(m.group(1), null_ok=True)
    except AddressError:
        return R.BAD_SENDER
    return MailFrom(sender, size, body, given, ret, envid, smtputf8)


def parse_rcpt(arg: str, smtputf8: bool = False) -> RcptTo | Reply:
    """``TO:<path> [NOTIFY=...] [ORCPT=...]``; ``smtputf8``: the transaction's MAIL had SMTPUTF8."""
    if arg[:3].upper() != "TO:":
        return R.SYNTAX
    m = _PATH_ARGS.match(arg[3:])
    if not m:
        return R.BAD_RECIPIENT
    given = _parameters(m.group(2))
    if isinstance(given, Reply):
        return given
    notify: tuple[str, ...] = ()
    orcpt = ""
    for name, value in given.items():
        if name not in ("NOTIFY", "ORCPT"):
            return R.UNKNOWN_PARAMETER
        try:
            if name == "NOTIFY":
                notify = dsnparams.parse_notify(value)
            else:
                orcpt = dsnparams.parse_orcpt(value)
        except dsnparams.DSNParamError:
            return R.BAD_DSN_PARAMETER
    refusal = _path_refusal(m.group(1), smtputf8)
    if refusal is not None:
        return refusal
    return RcptTo(m.group(1), notify, orcpt)


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


def parse_rcpt_to(arg: str, postmaster_domain: str, smtputf8: bool = False) -> Address | Reply:
    """``TO:<path>`` -> the recipient address, or the reply refusing it."""
    rcpt = parse_rcpt(arg, smtputf8)
    if isinstance(rcpt, Reply):
        return rcpt
    return recipient(rcpt.path, postmaster_domain)
