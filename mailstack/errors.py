# -*- test-case-name: tests.test_errors -*-
"""Replies and the two kinds of failure every layer speaks.

A ``Reply`` is what a peer is told (SMTP code, RFC 3463 enhanced code, text).
Failures carry a Reply so that the layer that finally answers a client never has
to invent one, and never leaks exception text, paths or hostnames.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """An SMTP-style reply: ``code`` 2xx-5xx, ``enhanced`` like ``"5.7.1"``."""

    code: int
    enhanced: str
    text: str

    def __post_init__(self) -> None:
        # RFC 3463 section 2: the class digit of the enhanced code matches the reply.
        if self.enhanced and self.enhanced[0] != str(self.code)[0]:
            raise ValueError(f"enhanced code {self.enhanced} does not match {self.code}")

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def lines(self) -> list[str]:
        """The text split into lines, each prefixed by the enhanced code."""
        prefix = f"{self.enhanced} " if self.enhanced else ""
        return [prefix + t for t in self.text.split("\n")]

    def encode(self) -> bytes:
        """The whole reply on the wire, multi-line per RFC 5321 section 4.2.1."""
        lines = self.lines()
        out = [
            f"{self.code}{'-' if i < len(lines) - 1 else ' '}{line}\r\n"
            for i, line in enumerate(lines)
        ]
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


class MailError(Exception):
    """Base: a failure that carries the Reply to give."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class TemporaryFailure(MailError):
    """Try again later (4xx)."""


class PermanentFailure(MailError):
    """Will never work (5xx)."""


def failure_for(reply: Reply) -> MailError:
    """The failure class that fits ``reply``'s code."""
    return PermanentFailure(reply) if reply.permanent else TemporaryFailure(reply)
