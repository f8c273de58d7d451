# -*- test-case-name: tests.queue.test_manager -*-
"""Delivery status notifications owed by a queue entry, submitted through the intake.

After each round the queue manager asks ``Bouncer.notify(entry, now)``:

* failed recipients not yet ``notified`` get one RFC 3464 DSN per entry and
  round (``queue/dsn.py``); they are marked ``notified`` only once that DSN
  is committed, so a DSN that cannot be submitted is tried again later;
* pending recipients get one "delayed" DSN once ``relay.delay_warning_after``
  has passed (RFC 3464 ``Action: delayed``);
* RFC 3461 NOTIFY decides per recipient: NEVER gets nothing, a list without
  FAILURE no failure DSN, without DELAY no delay warning; SUCCESS gets a
  ``delivered`` notice (local mailbox) or a ``relayed`` one (a next hop that
  does not offer DSN; one that does took the request over, see
  ``delivery/remote.py``).  RET=HDRS returns headers only; RET=FULL the whole
  message, but only for authenticated submissions of at most ``FULL_MAX``
  octets: a notice about mail that came in over the MX carries the original
  header section only (RFC 6522 ``text/rfc822-headers``), at most
  ``DSN_HEADER_LIMIT`` bytes of it, which bounds what a forged sender can make
  us reflect at a third party (backscatter; Postfix caps returned content
  similarly with ``bounce_size_limit``);
* never a DSN to ``<>`` (RFC 5321 section 6.1: never bounce a bounce): a
  bounce that cannot be delivered goes once to postmaster of the first local
  domain (a double bounce); one that was itself for that postmaster is logged
  and dropped, so there is never a loop;
* the DSN re-enters through the normal door (``IIntake.begin`` with sender
  ``<>``), so it is queued, retried and logged like any message.  A local
  sender's DSN follows the router (aliases); an unknown local sender (a
  forged MAIL FROM at the MX) gets nothing;
* a DSN whose From domain (``MAILER-DAEMON@hostname``) is local is DKIM-signed
  first, like submitted mail (``signer``).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailstack.address import Address, AddressError, parse_address
from mailstack.config import Config
from mailstack.dkim.signer import IDKIMSigner
from mailstack.envelope import Destination, Envelope
from mailstack.errors import MailError
from mailstack.interfaces import IIntake, IQueueStore, IRouter
from mailstack.queue import dsn, schedule
from mailstack.queue.entry import FAILED, QueueEntry, RecipientState

DSN_HEADER_LIMIT = 16 * 1024  # bytes of original headers returned in a DSN
FULL_MAX = 1024 * 1024  # RET=FULL returns the whole message up to this size, else its headers


class Bouncer:
    """Sends the DSNs a queue entry owes (see the module docstring).

    ``intake`` may be set after construction: the intake needs the queue
    manager as its kicker, and the manager needs the intake for DSNs.
    """

    log = Logger()

    def __init__(
        self,
        store: IQueueStore,
        config: Config,
        run_blocking: Callable[..., Deferred],
        rng: random.Random,
        router: IRouter | None = None,
        intake: IIntake | None = None,
        signer: IDKIMSigner | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.run_blocking = run_blocking
        self.rng = rng
        self.router = router
        self.intake = intake
        self.signer = signer  # DKIM-signs DSNs whose From domain (our hostname) is local

    async def notify(self, entry: QueueEntry, now: float) -> bool:
        """Send owed failure and delay DSNs; True if the entry changed."""
        relay = self.config.relay
        changed = False
        failed = [r for r in entry.recipients if r.status == FAILED and not r.notified]
        unwanted = [r for r in failed if entry.sender and not r.wants("FAILURE")]
        for r in unwanted:  # RFC 3461 4.1: NOTIFY without FAILURE
            r.notified = True
            changed = True
        failed = [r for r in failed if not r.notified]
        if failed:
            if not entry.sender:
                changed |= await self._double_bounce(entry, failed, now)
            elif await self._send(entry, failed, dsn.FAILED, now):
                for r in failed:
                    r.notified = True
                changed = True
        succeeded = [r for r in entry.recipients if r.success_owed] if entry.sender else []
        for action, rcpts in ((dsn.DELIVERED, [r for r in succeeded if r.local]),
                              (dsn.RELAYED, [r for r in succeeded if not r.local])):
            if rcpts and await self._send(entry, rcpts, action, now):
                for r in rcpts:
                    r.notified = True
                changed = True
        pending = [r for r in entry.recipients if not r.final and r.wants("DELAY")]
        if (
            pending
            and entry.sender
            and schedule.delay_warning_due(entry.arrival, now, relay.delay_warning_after, entry.delay_warned)
        ):
            if await self._send(entry, pending, dsn.DELAYED, now):
                entry.delay_warned = True
                changed = True
        return changed

    def _postmaster(self) -> Address:
        local = self.config.domains.local
        return Address("postmaster", local[0] if local else self.config.hostname)

    async def _double_bounce(self, entry: QueueEntry, failed: list[RecipientState], now: float) -> bool:
        """A message from <> failed: once to postmaster (never for a failed postmaster copy)."""
        postmaster = self._postmaster()
        if any(r.original.lower() == postmaster.key for r in failed):
            for r in failed:
                self.log.warn(
                    "{queue_id}: undeliverable bounce to <{rcpt}> dropped (it was for postmaster already)",
                    queue_id=entry.id,
                    rcpt=r.address,
                )
                r.notified = True
            return True
        if not await self._send(entry, failed, dsn.FAILED, now, to=postmaster):
            return False
        for r in failed:
            r.notified = True
        return True

    async def _send(
        self, entry: QueueEntry, rcpts: list[RecipientState], action: str, now: float, to: Address | None = None
    ) -> bool:
        """Submit one DSN to ``to`` (default: the sender); True if it is committed or
        nobody can be told (do not retry)."""
        if self.intake is None:
            self.log.error("{queue_id}: no intake to send a DSN through", queue_id=entry.id)
            return False
        if to is None:
            try:
                to = parse_address(entry.sender)
            except AddressError:
                self.log.warn("{queue_id}: sender <{sender}> cannot get a DSN", queue_id=entry.id, sender=entry.sender)
                return True  # nobody to tell; do not retry forever
        try:
            headers = await self.run_blocking(self.store.message_headers, entry.id, DSN_HEADER_LIMIT)
            full = None
            # RFC 3461 4.3 RET=FULL; only for authenticated senders (backscatter bound, see above).
            if entry.ret == "FULL" and entry.user and entry.size <= FULL_MAX:
                full = await self.run_blocking(self.store.read_message, entry.id)
            message = dsn.build(
                to=str(to),
                original_message=full,
                hostname=self.config.hostname,
                entry=entry,
                recipients=rcpts,
                action=action,
                original_headers=headers,
                now=now,
                lifetime=self.config.relay.max_queue_lifetime,
                message_id=dsn.make_message_id(self.config.hostname, entry.id, now, self.rng),
            )
            if self.signer is not None:
                message = await self.run_blocking(self.signer.sign_message, message, now)
            destinations = self._destinations(to)
            if not destinations:
                self.log.warn("{queue_id}: no DSN: <{sender}> is no local mailbox", queue_id=entry.id, sender=str(to))
                return True
            incoming = self.intake.begin(
                Envelope(sender=None, recipients=destinations, protocol="ESMTP", smtputf8=not str(to).isascii())
            )
            incoming.write(message)
            dsn_id = await incoming.finish()
        except MailError as e:
            self.log.warn("{queue_id}: cannot submit the DSN: {reply}", queue_id=entry.id, reply=str(e.reply))
            return False
        except Exception:
            self.log.failure("{queue_id}: cannot submit the DSN", queue_id=entry.id)
            return False
        self.log.info(
            "{queue_id}: sender non-delivery notification {dsn_id} ({action}) for {rcpts}",
            queue_id=entry.id,
            dsn_id=dsn_id,
            action=action,
            rcpts=[r.address for r in rcpts],
        )
        return True

    def _destinations(self, sender: Address) -> tuple[Destination, ...]:
        """Where the DSN goes: a local sender through the router (aliases), so an
        unknown local sender (a forged MAIL FROM at the MX) gets nothing."""
        local = self.config.is_local_domain(sender.domain)
        if local and self.router is not None:
            try:
                return tuple(self.router.resolve(sender, True))
            except MailError:
                return ()
        return (Destination(address=sender, original=sender, local=local),)
