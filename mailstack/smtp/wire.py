# -*- test-case-name: tests.smtp.test_client -*-
"""A server's reply lines as a ``Reply`` (RFC 5321 section 4.2, RFC 3463 section 2)."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from mailstack.errors import Reply

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


def make_reply(code: int, lines: Sequence[str]) -> Reply:
    """A Reply from a server's reply texts (the lines without code and separator).

    The RFC 3463 code is taken from the first line, and only when its class
    digit matches the reply code; it is stripped from every line that carries it.
    """
    texts = []
    enhanced = ""
    for i, line in enumerate(lines):
        m = _ENHANCED.match(line)
        if m and m.group(1) == str(code)[0]:
            if i == 0:
                enhanced = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
            line = line[m.end():]
        texts.append(line)
    return Reply(code, enhanced, "\n".join(texts).strip())


@functools.lru_cache(maxsize=256)
def one_line_reply(line: str) -> Reply:
    """``make_reply`` for a one-line reply ("250 2.1.0 Ok"), cached: a server
    sends the same few replies message after message (Reply is immutable)."""
    return make_reply(int(line[:3]), [line[4:]])
