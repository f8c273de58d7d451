# -*- test-case-name: tests.test_limits -*-
"""The smallest values the protocol limits in ``[smtp]`` may take.

Today ``0`` in ``smtp.max_line_length`` or ``smtp.max_message_size`` removes
the limit, so one typo lets a client grow a line or a message without bound.
These floors come from RFC 5321 section 4.5.3.1, the sizes every SMTP server
must accept:

* 4.5.3.1.6: a text line is at least 1000 octets with its CRLF, and a command
  line carrying extension parameters (``SIZE=``, ``AUTH=``, a long ``AUTH PLAIN``
  response) outgrows the 512 octets of 4.5.3.1.4, so no command line limit
  below a text line is useful;
* 4.5.3.1.7: message content of at least 64K octets.

``check_minimums`` returns the problems as ``"key: reason"`` lines for the
config loader to report; an empty list means the values are usable.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Minimum(NamedTuple):
    section: str
    key: str
    least: int
    why: str


MINIMUMS = (
    Minimum("smtp", "max_line_length", 1000, "RFC 5321 section 4.5.3.1.6: lines of 1000 octets must be accepted"),
    Minimum("smtp", "max_message_size", 65536, "RFC 5321 section 4.5.3.1.7: messages of 64K octets must be accepted"),
)


def check_minimums(config: Any) -> list[str]:
    """One ``"section.key = value: reason"`` line per limit below its floor (0 included)."""
    errors = []
    for m in MINIMUMS:
        value = getattr(getattr(config, m.section), m.key)
        if value < m.least:
            errors.append(f"{m.section}.{m.key} = {value}: must be at least {m.least} ({m.why})")
    return errors
