"""A slow, obviously correct DATA decoder: the oracle the streaming ``DataDecoder`` is tested against."""

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
