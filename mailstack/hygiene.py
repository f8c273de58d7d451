# -*- test-case-name: tests.test_hygiene -*-
"""Submission hygiene: the Date and Message-ID fields a submitted message lacks.

RFC 6409 section 8.2 (Date) and section 8.3 (Message-ID) let a submission
server add them when missing; RFC 5322 section 3.6 requires Date and
recommends Message-ID, and large receivers refuse mail without one.  Present
fields are never touched: changing them would break the sender's own
signatures and threading.  The caller (a pipeline stage for authenticated
sessions) puts the returned fields at the top of the header before signing,
so DKIM covers them.
"""

from __future__ import annotations

import datetime
import email.utils
import secrets
from collections.abc import Sequence

from mailstack.dkim.canon import HeaderField


def message_id(hostname: str, now: float) -> str:
    """``<time.random@hostname>``: unique without state (RFC 5322 section 3.6.4)."""
    return f"<{int(now * 1000):x}.{secrets.token_hex(8)}@{hostname}>"


def missing_fields(headers: Sequence[HeaderField], hostname: str, now: float) -> list[bytes]:
    """Raw ``Date:`` and ``Message-ID:`` fields (CRLF-terminated) for those absent
    from ``headers`` (``(name, raw)`` pairs); an empty list when both are there.

    ``Date`` is ``now`` in UTC with a numeric zone (``+0000``), as RFC 5322
    section 3.3 prefers over the obsolete ``GMT``.
    """
    present = {name.strip().lower() for name, _ in headers}
    added = []
    if "date" not in present:
        when = datetime.datetime.fromtimestamp(now, datetime.UTC)
        added.append(f"Date: {email.utils.format_datetime(when)}\r\n".encode("ascii"))
    if "message-id" not in present:
        added.append(f"Message-ID: {message_id(hostname, now)}\r\n".encode("ascii"))
    return added
