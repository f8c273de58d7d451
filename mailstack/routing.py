# -*- test-case-name: tests.test_routing -*-
"""Where a recipient's mail goes: local mailboxes, remote addresses, or a refusal.

The SMTP server asks at RCPT time, so every refusal is a reply the client sees
at once (RFC 5321 section 3.3), and the intake only ever queues destinations
that can be delivered.  Pure apart from reading the user and alias tables.

Rules
-----
* A domain in ``[domains] local`` is ours; anything else, address literals
  included, is remote and is accepted only from an authenticated client
  (otherwise 550 5.7.1: we are no open relay).  An address literal in a
  loopback, link-local or private range is refused with 553 5.7.1 unless
  ``relay.allow_private_literals`` (``netpolicy``).
* A local address with an alias expands to the alias targets, recursively;
  targets may be local or remote (forwarding is the administrator's decision,
  so it is allowed for unauthenticated clients too).  An alias wins over a
  user of the same name, as in Postfix's virtual alias maps.
* Otherwise a local address that is a user is its own mailbox.
* ``postmaster@<local domain>`` always exists (RFC 5321 section 4.5.1): its
  alias (or a user of that name) if that yields anything, else the dedicated
  Maildir ``mail/<domain>/postmaster/``.  Never some other user's mailbox:
  reports to the postmaster (abuse complaints, bounces) are not meant for
  whichever user happens to sort first.  ``mailstack check-config`` warns
  about a local domain with neither alias nor user, so that Maildir is read.
* Any other local address is unknown: 550 5.1.1.

Loops (RFC 3463 X.4.6)
----------------------
An address that comes back to an alias that is still being expanded ends
there: if it is a user it is that user's mailbox (``bob -> bob, bob@remote``
keeps a copy, as in sendmail), otherwise it contributes nothing.  So a loop
that still reaches some mailbox delivers to those mailboxes, and only an
expansion that yields nothing *because of* a loop is refused, with
550 5.4.6.  (RFC 5321 section 4.3.2 lists no 554 for RCPT; 550 with the
routing-loop enhanced code is the refusal a client expects there.)  Targets
that name unknown local users are dropped; if nothing is left the address is
unknown (550 5.1.1).  Each alias is expanded at most once per lookup, so
expansion is linear in the size of the alias table, and the result has no
duplicates.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from mailstack.address import Address, AddressError, parse_address
from mailstack.envelope import Destination
from mailstack.errors import PermanentFailure
from mailstack.interfaces import IRouter
from mailstack.mx import literal_address
from mailstack.netpolicy import is_private_literal
from mailstack.smtp.replies import ALIAS_LOOP, PRIVATE_LITERAL, RELAY_DENIED, UNKNOWN_USER


@implementer(IRouter)
class Router:
    """Recipient routing over a config, an IUserDB and an IAliasDB."""

    log = Logger()

    def __init__(self, config: Any, users: Any, aliases: Any) -> None:
        self._config = config
        self._users = users
        self._aliases = aliases

    def resolve(self, address: Address, authenticated: bool) -> list[Destination]:
        """The destinations of RCPT ``address``; PermanentFailure to refuse it."""
        if not self._config.is_local_domain(address.domain):
            if not authenticated:
                raise PermanentFailure(RELAY_DENIED)
            literal = literal_address(address.domain)
            if literal is not None and is_private_literal(literal) and not self._config.relay.allow_private_literals:
                raise PermanentFailure(PRIVATE_LITERAL)  # see netpolicy: no relaying into our own network
            return [Destination(address, address, False)]
        walk = _Walk(self, address)
        found = walk.expand(address)
        if not found:
            raise PermanentFailure(ALIAS_LOOP if walk.looped else UNKNOWN_USER)
        return list(dict.fromkeys(found))

    def _postmaster(self, address: Address, original: Address) -> Destination:
        """The mailbox behind a postmaster address that has no alias and no user: its own."""
        return Destination(Address("postmaster", address.domain), original, True)


class _Walk:
    """One depth-first alias expansion (white/grey/black marking of aliases)."""

    def __init__(self, router: Router, original: Address) -> None:
        self._router = router
        self._original = original
        self._active: set[str] = set()  # aliases being expanded (grey)
        self._done: set[str] = set()  # aliases fully expanded (black)
        self.looped = False

    def expand(self, address: Address) -> list[Destination]:
        router = self._router
        if not router._config.is_local_domain(address.domain):
            return [Destination(address, self._original, False)]
        key = address.key
        is_user = router._users.exists(key)
        if key in self._active:
            if is_user:
                return [Destination(_mailbox(address), self._original, True)]
            self.looped = True
            return []
        if key in self._done:
            return []  # its destinations are already in the result
        found: list[Destination] = []
        targets = router._aliases.targets(key)
        if targets is not None:
            self._active.add(key)
            for target in targets:
                try:
                    found.extend(self.expand(parse_address(target)))
                except AddressError:
                    router.log.warn("alias {alias} has a bad target {target!r}", alias=key, target=target)
            self._active.discard(key)
            self._done.add(key)
        if not found and is_user:
            found.append(Destination(_mailbox(address), self._original, True))
        if not found and address.is_postmaster:
            found.append(router._postmaster(address, self._original))
        return found


def _mailbox(address: Address) -> Address:
    """The canonical mailbox address: lowercase local part, as users are keyed."""
    return Address(address.local.lower(), address.domain)
