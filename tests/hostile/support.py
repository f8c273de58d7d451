"""Shared helpers for the hostile-input tests: reply grammars, log capture, hypothesis settings."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, settings
from twisted.logger import globalLogPublisher

# Modest, deterministic: the whole tests/hostile directory must run in seconds.
FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# RFC 5321 section 4.2: Reply-line = *( Reply-code "-" [ textstring ] CRLF ) Reply-code [ SP textstring ] CRLF
# textstring = 1*(%d09 / %d32-126); we accept the empty text too.
SMTP_LINE = re.compile(rb"[2-5][0-5]\d([ -][\t\x20-\x7e]*)?\Z")
# RFC 3463 / 2034 section 4: status codes in every reply except the greeting, EHLO/HELO and 354/334.
ENHANCED = re.compile(rb"[2-5][0-5]\d[ -][245]\.\d{1,3}\.\d{1,3} ")
_NO_ENHANCED = (b"220", b"354", b"334")

# Text that would only appear if an exception leaked to a peer.
LEAKS = (b"Traceback", b"Error:", b'File "', b"Exception", b"/work/", b"site-packages", b"errno", b"Errno")


def smtp_replies(out: bytes) -> list[list[bytes]]:
    """Split server output into replies (lists of lines); assert each line's grammar."""
    assert out == b"" or out.endswith(b"\r\n"), out[-200:]
    replies: list[list[bytes]] = []
    current: list[bytes] = []
    for line in out.split(b"\r\n")[:-1]:
        assert SMTP_LINE.match(line), f"bad SMTP reply line {line!r}"
        if current:
            assert line[:3] == current[0][:3], f"multi-line reply changes code: {current + [line]!r}"
        current.append(line)
        if line[3:4] in (b" ", b""):
            replies.append(current)
            current = []
    assert not current, f"unterminated multi-line reply {current!r}"
    return replies


def check_smtp_output(out: bytes) -> list[list[bytes]]:
    """Grammar, enhanced codes where due, no leaked exception text; returns the replies."""
    for leak in LEAKS:
        assert leak not in out, f"{leak!r} leaked to the client: {out[-300:]!r}"
    replies = smtp_replies(out)
    for reply in replies:
        first = reply[0]
        if first[:3] in _NO_ENHANCED:
            continue
        if first[:3] == b"250" and not first[4:5].isdigit():
            continue  # EHLO/HELO greeting line
        for line in reply:
            assert ENHANCED.match(line), f"reply line without RFC 3463 code: {line!r}"
    return replies


POP3_STATUS = re.compile(rb"(\+OK|-ERR)( [\x20-\x7e]*)?\Z")


class LogFailures:
    """Collects logged failures (log.failure / errors) while active."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.events.append(event)

    def __enter__(self) -> LogFailures:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self)

    def describe(self) -> str:
        out = []
        for e in self.events:
            f = e.get("log_failure")
            out.append(f.getTraceback() if f is not None else repr(e))
        return "\n".join(out)
