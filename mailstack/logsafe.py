# -*- test-case-name: tests.test_logsafe -*-
"""Peer-supplied text made safe for logs and admin output.

Login names, remote servers' replies, envelope addresses and message headers
come from peers.  Printed raw, a CR or LF forges extra log lines, and an ESC
(or a C1 CSI, U+009B) drives the terminal of the administrator reading
``mailstack queue show``.  ``escape`` returns one printable line: every
control character becomes a visible escape and the length is bounded.

Escaped: C0 controls and DEL (``\\r``, ``\\n``, ``\\t`` or ``\\xNN``), C1
controls (``\\xNN``), and the Unicode format and separator characters
(categories Cf, Zl, Zp: bidirectional overrides, U+2028/U+2029 line breaks,
zero-width characters) as ``\\uNNNN``, since they reorder or split what the
reader sees.  Backslashes are left alone: a peer who writes ``\\x1b`` as text
only gets those four harmless characters shown.
"""

from __future__ import annotations

import unicodedata

#: The default bound, in characters of input (RFC 5321 section 4.5.3.1.6 lets
#: a text line be 1000 octets, so a whole header or reply line fits).
LIMIT = 1000

_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _shown(c: str) -> bool:
    if c.isascii():
        return " " <= c <= "~"
    return unicodedata.category(c) not in _UNSAFE_CATEGORIES


def _escape_char(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    code = ord(c)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def escape(text: str | bytes, limit: int = LIMIT) -> str:
    """``text`` as one line of printable characters, cut to ``limit`` characters.

    Bytes are decoded as UTF-8; undecodable bytes are shown as ``\\xNN``.  A
    cut is marked with ``...(N more)``, so the reader knows there was more.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    extra = len(text) - limit
    if extra > 0:
        text = text[:limit]
    if text.isascii() and text.isprintable():
        out = text  # nearly every line: ASCII " " to "~", nothing to escape
    else:
        out = "".join(c if _shown(c) else _escape_char(c) for c in text)
    return out + f"...({extra} more)" if extra > 0 else out
