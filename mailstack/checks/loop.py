# -*- test-case-name: tests.test_check_loop -*-
"""Mail loop detection by counting ``Received:`` fields (RFC 5321 section 6.3).

Every SMTP server prepends a ``Received:`` field (section 4.4), so a message
going round a loop of forwarders grows one per hop.  RFC 5321 section 6.3 calls
the simple count "an effective, although rarely optimal, method of detecting
loops" and suggests a large threshold, "normally at least 100"; Postfix
refuses above 50 (``hopcount_limit``), and so does this check by default
(``[pipeline.options.loop] max_received`` raises it).  A message whose header
section already holds more than ``max_received`` of them is refused with 554
5.4.6 (RFC 3463: routing loop detected) at the end of data, in MX and
submission sessions alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mailstack.errors import Reply
from mailstack.interfaces import IMessage
from mailstack.pipeline import Check, CheckFactory, Connection, Transaction, Verdict

MAX_RECEIVED = 50
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops: mail loop detected")


class LoopCheck(Check):
    """Refuses a message with more than ``max_received`` ``Received:`` fields."""

    name = "loop"

    def __init__(self, max_received: int = MAX_RECEIVED) -> None:
        self.max_received = max_received

    def data(self, conn: Connection, txn: Transaction, message: IMessage) -> Verdict | None:
        hops = sum(1 for name, _ in message.header if name.lower() == "received")
        return Verdict(reply=TOO_MANY_HOPS) if hops > self.max_received else None


def build(runtime: Any, options: Mapping[str, Any]) -> LoopCheck:
    """Options: ``max_received`` (a positive integer, default 50)."""
    unknown = set(options) - {"max_received"}
    if unknown:
        raise ValueError(f"unknown option {min(unknown)!r}")
    limit = options.get("max_received", MAX_RECEIVED)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError("max_received must be a positive integer")
    return LoopCheck(limit)


factory = CheckFactory("loop", build)
