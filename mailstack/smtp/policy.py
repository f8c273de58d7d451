# -*- test-case-name: tests.smtp.test_smtp_policy -*-
"""What each SMTP listener allows: pure decisions, no I/O.

Three listener kinds (RFC 6409, RFC 8314):

``smtp``         MX: mail for local domains from anyone; relaying only after AUTH;
                 STARTTLS offered; AUTH offered once in TLS.
``submission``   STARTTLS offered; AUTH only after TLS; MAIL only after AUTH.
``submissions``  implicit TLS (the transport is TLS from the start); MAIL only after AUTH.

With ``auth.plaintext_on_loopback`` AUTH is also allowed without TLS from a
loopback address (local scripts and tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailstack.address import Address
from mailstack.net import is_loopback

KINDS = ("smtp", "submission", "submissions")

# Alias chains deeper than this are not followed when checking sender ownership.
MAX_ALIAS_DEPTH = 10


@dataclass(frozen=True)
class ListenerPolicy:
    kind: str
    offers_starttls: bool  # STARTTLS is offered while the session is plaintext
    auth_required: bool  # MAIL needs an authenticated session
    implicit_tls: bool

    @classmethod
    def for_kind(cls, kind: str) -> ListenerPolicy:
        if kind == "smtp":
            return cls(kind, offers_starttls=True, auth_required=False, implicit_tls=False)
        if kind == "submission":
            return cls(kind, offers_starttls=True, auth_required=True, implicit_tls=False)
        if kind == "submissions":
            return cls(kind, offers_starttls=False, auth_required=True, implicit_tls=True)
        raise ValueError(f"unknown SMTP listener kind {kind!r}")


def auth_allowed(tls: bool, peer: str, plaintext_on_loopback: bool) -> bool:
    """RFC 4954 section 4 / RFC 8314: credentials only over TLS (or loopback if configured)."""
    return tls or (plaintext_on_loopback and is_loopback(peer))


def sender_owned(sender: Address | None, user: str, aliases: Any) -> bool:
    """Whether an authenticated ``user`` (a user key) may use ``sender`` in MAIL FROM.

    The user's own address, or an alias whose expansion (through chains) reaches
    the user.  The null sender is never owned.
    """
    if sender is None:
        return False
    start = sender.key
    if start == user:
        return True
    seen = {start}
    frontier = [start]
    for _ in range(MAX_ALIAS_DEPTH):
        nxt = []
        for key in frontier:
            targets = aliases.targets(key) if aliases is not None else None
            for target in targets or ():
                t = _target_key(target)
                if t == user:
                    return True
                if t and t not in seen:
                    seen.add(t)
                    nxt.append(t)
        if not nxt:
            return False
        frontier = nxt
    return False


def _target_key(target: Any) -> str:
    if isinstance(target, Address):
        return target.key
    from mailstack.address import AddressError, parse_address

    try:
        return parse_address(str(target)).key
    except AddressError:
        return ""
