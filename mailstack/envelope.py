# -*- test-case-name: tests.test_intake,tests.test_routing -*-
"""Value objects handed from an SMTP session (or the DSN builder) to the intake."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mailstack.address import Address


@dataclass(frozen=True)
class Destination:
    """One final recipient after alias expansion."""

    address: Address  # the mailbox (local) or remote address mail goes to
    original: Address  # as the client gave it at RCPT TO
    local: bool  # a maildir here, or the outbound queue
    notify: tuple[str, ...] = ()  # RFC 3461 NOTIFY= given at RCPT, () if none
    orcpt: str = ""  # RFC 3461 ORCPT= given at RCPT, "addr-type;decoded"


@dataclass(frozen=True)
class Envelope:
    """One transaction: who sent it, to whom, and how it reached us (for Received:)."""

    sender: Address | None  # None is the null reverse-path <>
    recipients: tuple[Destination, ...]
    helo: str = ""
    peer: str = ""  # client IP address
    protocol: str = "ESMTP"  # RFC 3848: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA
    tls: str = ""  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", empty without TLS
    user: str = ""  # authenticated user key, empty if none
    ret: str = ""  # RFC 3461 RET= ("FULL", "HDRS") or ""
    envid: str = ""  # RFC 3461 ENVID=, decoded
    smtputf8: bool = False  # RFC 6531: the message needs SMTPUTF8 on the way out


@dataclass(frozen=True)
class HeaderChanges:
    """What the message checks change in the header section, applied by the intake.

    ``prepend``: complete fields (``b"Name: value\\r\\n"``), placed right after
    our ``Received:``, in this order.  ``remove``: predicates of a field's name
    and raw bytes; a field of the client's header section is dropped if any
    says so (fields in ``prepend`` are never removed).
    """

    prepend: tuple[bytes, ...] = ()
    remove: tuple[Callable[[str, bytes], bool], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.prepend or self.remove)

    def removes(self, name: str, raw: bytes) -> bool:
        return any(predicate(name, raw) for predicate in self.remove)
