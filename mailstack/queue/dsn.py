# -*- test-case-name: tests.queue.test_dsn -*-
"""RFC 3464 delivery status notifications (bounces and delay warnings). Pure.

``build`` returns the message bytes (CRLF line endings) of a
``multipart/report; report-type=delivery-status`` (RFC 6522) with three parts:

1. ``text/plain``: what happened, for a human, with the remote server's reply;
2. ``message/delivery-status`` (RFC 3464 section 2): per-message fields
   ``Reporting-MTA``, ``Arrival-Date``, then per recipient ``Final-Recipient``,
   ``Original-Recipient``, ``Action``, ``Status``, ``Remote-MTA``,
   ``Diagnostic-Code``, ``Last-Attempt-Date`` (and ``Will-Retry-Until`` for
   delayed);
3. ``text/rfc822-headers`` (RFC 6522 section 4): the original header section,
   or ``message/rfc822`` with the whole message when ``original_message`` is
   given (RFC 3461 RET=FULL; the bouncer decides when).

Actions (RFC 3464 2.3.3): ``failed`` and ``delayed``, and for NOTIFY=SUCCESS
(RFC 3461 section 4.1) ``delivered`` (into a mailbox here) and ``relayed``
(to a next hop that does not offer DSN).  RFC 3461 ENVID is echoed as
``Original-Envelope-Id``, ORCPT as ``Original-Recipient``.

The DSN is from ``MAILER-DAEMON@<hostname>``; the queue manager submits it with
the null reverse-path ``<>`` (RFC 3464 section 2 / RFC 5321 section 4.5.5).
It goes to ``to``: the message's sender, or postmaster for a bounce that
could not be delivered (a double bounce).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"
RELAYED = "relayed"
_SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    DELIVERED: "Successful Mail Delivery Report",
    RELAYED: "Successful Mail Delivery Report",
}

_REPLY = re.compile(r"^([245]\d\d)(?:[ -]([245]\.\d{1,3}\.\d{1,3}))?\s*(.*)$", re.S)


def _date(t: float) -> str:
    """RFC 5322 section 3.3 date-time."""
    return format_datetime(datetime.fromtimestamp(t, UTC))


def _clean(text: str) -> str:
    """One header-safe line: no CR/LF/control characters, ASCII only."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text)
    return text.encode("ascii", "replace").decode("ascii").strip()


def split_reply(last_reply: str) -> tuple[int, str, str]:
    """``"550 5.1.1 no such user"`` -> ``(550, "5.1.1", "no such user")``."""
    m = _REPLY.match(last_reply.strip())
    if not m:
        return 0, "", last_reply.strip()
    return int(m.group(1)), m.group(2) or "", m.group(3).strip()


def status_for(last_reply: str, action: str) -> str:
    """The RFC 3463 status for a recipient from its last reply (RFC 3464 2.3.4)."""
    code, enhanced, _ = split_reply(last_reply)
    if action in (DELIVERED, RELAYED):
        return enhanced if enhanced[:1] == "2" else "2.0.0"
    if enhanced:
        if action == FAILED and enhanced[0] == "2":
            return "5.0.0"
        return enhanced
    if action == DELAYED:
        return "4.0.0"
    if code and str(code)[0] in "45":
        return f"{str(code)[0]}.0.0"
    return "5.0.0" if action == FAILED else "4.0.0"


def _host_of(last_host: str) -> str:
    """``mx.example.org[192.0.2.1]`` -> ``mx.example.org``; ``local`` for local recipients."""
    return last_host.split("[", 1)[0].strip()


def make_message_id(hostname: str, queue_id: str, now: float, rng: random.Random | None = None) -> str:
    rnd = (rng or random.Random()).getrandbits(48)
    return f"<{int(now)}.{rnd:012x}.{_clean(queue_id)}@{hostname}>"


def _human(entry: Any, recipients: Sequence[Any], action: str, hostname: str, lifetime: float | None) -> str:
    lines = [
        f"This is the mail system at host {hostname}.",
        "",
    ]
    if action == FAILED:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
            "For further assistance, please send mail to postmaster.",
            "",
            "If you do so, please include this problem report. You can",
            "delete your own text from the attached returned message.",
        ]
    elif action in (DELIVERED, RELAYED):
        lines += [
            "Your message was successfully delivered to the destination(s)",
            "listed below." if action == DELIVERED else "listed below; the next mail system does not",
        ]
        if action == RELAYED:
            lines.append("report delivery status, so no further notice will be sent.")
    else:
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet to the recipients below.",
            "The mail system will keep trying to deliver it",
        ]
        if lifetime is not None:
            lines[-1] += f" until {_date(entry.arrival + lifetime)}."
        else:
            lines[-1] += "."
    lines.append("")
    for r in recipients:
        reply = _clean(r.last_reply) or "(no reply)"
        host = _host_of(r.last_host)
        where = f" (host {_clean(r.last_host)} said: {reply})" if host and not r.local else f": {reply}"
        lines.append(f"<{_clean(r.address)}>{where}")
    lines.append("")
    return "\r\n".join(lines)


def build(
    *,
    hostname: str,
    entry: Any,
    recipients: Sequence[Any],
    action: str,
    original_headers: bytes,
    now: float,
    message_id: str,
    lifetime: float | None = None,
    to: str | None = None,
    original_message: bytes | None = None,
) -> bytes:
    """The whole DSN message as bytes (CRLF), ready for ``IIncoming.write``.

    ``entry`` is the QueueEntry (for ``sender``, ``id``, ``arrival``);
    ``recipients`` the RecipientStates to report, each with ``last_reply``
    and ``last_host``; ``action`` one of the four above; ``to``: who gets
    it (default: the sender).
    """
    if action not in _SUBJECTS:
        raise ValueError(f"bad DSN action {action!r}")
    to = entry.sender if to is None else to
    if not to:
        raise ValueError("never a DSN to <>")
    boundary = f"{_clean(entry.id)}.{int(now)}/{hostname}"
    subject = _SUBJECTS[action]
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{_clean(to)}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",  # RFC 3834 section 5
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    human = [
        f"--{boundary}",
        "Content-Description: Notification",
        'Content-Type: text/plain; charset="us-ascii"',
        "",
        _human(entry, recipients, action, hostname, lifetime),
    ]
    # RFC 3464 section 2.2: per-message fields.
    status = [
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {hostname}",
        *([f"Original-Envelope-Id: {_clean(entry.envid)}"] if entry.envid else []),
        f"X-Mailstack-Queue-ID: {_clean(entry.id)}",
        f"Arrival-Date: {_date(entry.arrival)}",
    ]
    # RFC 3464 section 2.3: per-recipient fields, each group after a blank line.
    for r in recipients:
        status.append("")
        status.append(f"Final-Recipient: rfc822; {_clean(r.address)}")
        orcpt = r.orcpt
        if orcpt:  # RFC 3461 4.2 / RFC 3464 2.3.1: as the client gave it in ORCPT
            addr_type, _, address = orcpt.partition(";")
            status.append(f"Original-Recipient: {_clean(addr_type)}; {_clean(address)}")
        elif r.original and r.original != r.address:
            status.append(f"Original-Recipient: rfc822; {_clean(r.original)}")
        status.append(f"Action: {action}")
        status.append(f"Status: {status_for(r.last_reply, action)}")
        host = _host_of(r.last_host)
        if host and not r.local:
            status.append(f"Remote-MTA: dns; {_clean(host)}")
        if r.last_reply:
            status.append(f"Diagnostic-Code: smtp; {_clean(r.last_reply)}")
        if r.history:
            status.append(f"Last-Attempt-Date: {_date(r.history[-1]['time'])}")
        if action == DELAYED and lifetime is not None:
            status.append(f"Will-Retry-Until: {_date(entry.arrival + lifetime)}")
    status.append("")
    headers = original_headers.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    what = {FAILED: "Undelivered", DELAYED: "Delayed"}.get(action, "Delivered")
    headers_part = [
        f"--{boundary}",
        f"Content-Description: {what} Message" + ("" if original_message is not None else " Headers"),
        "Content-Type: message/rfc822" if original_message is not None else "Content-Type: text/rfc822-headers",
        "",
    ]
    out = "\r\n".join(head + human + status + headers_part).encode("ascii") + b"\r\n"
    if original_message is not None:
        out += original_message if original_message.endswith(b"\r\n") else original_message + b"\r\n"
    elif headers:
        body = headers.rstrip(b"\n").replace(b"\n", b"\r\n") + b"\r\n"
        out += body
    out += b"\r\n" + f"--{boundary}--".encode("ascii") + b"\r\n"
    return out
