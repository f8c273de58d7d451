"""A slow, obviously correct DATA decoder: the oracle the streaming ``DataDecoder`` is tested against;
and the end-of-data lookalikes of SMTP smuggling (docs/smtp-smuggling.rst) every DATA test feeds."""

from __future__ import annotations


def decode_reference(raw: bytes) -> tuple[bytes, bytes] | None:
    """Split ``raw`` into lines at CRLF and apply RFC 5321 4.5.2: ``(content, rest)``, or None if unterminated."""
    lines = (b"\r\n" + raw).split(b"\r\n")[1:]
    out: list[bytes] = []
    for i, line in enumerate(lines):
        if line == b"." and i < len(lines) - 1:
            rest = b"\r\n".join(lines[i + 1 :])
            return b"".join(out), rest
        if i == len(lines) - 1:
            return None  # incomplete last line
        out.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
    return None


# Scanner end-of-data lookalikes: none of them may end DATA (only CRLF.CRLF does).
SMUGGLING = [
    b"\n.\n",
    b"\n.\r",
    b"\r.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r",
    b"\r\n\x00.\n",
    b"\r\n.\x00\r\n",
    b"\r\n.",
    b"\n\n.\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
    b"\r\n.\n",
]
