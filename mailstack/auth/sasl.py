# -*- test-case-name: tests.auth.test_sasl -*-
"""SASL PLAIN (RFC 4616) and LOGIN decoding for SMTP AUTH (RFC 4954) and POP3 AUTH (RFC 5034).

Pure functions over the client's lines; the protocols decide the reply texts.
Nothing here logs, and nothing keeps a password longer than the call.
"""

from __future__ import annotations

import base64
import binascii

# draft-murchison-sasl-login: the server's two prompts, base64-encoded.
LOGIN_USERNAME_PROMPT = base64.b64encode(b"Username:")
LOGIN_PASSWORD_PROMPT = base64.b64encode(b"Password:")

MECHANISMS = ("PLAIN", "LOGIN")


class SASLError(Exception):
    """A client response that is not valid for the exchange."""


class Cancelled(SASLError):
    """The client sent ``*`` (RFC 4954 section 4, RFC 5034 section 4)."""


class BadBase64(SASLError):
    """The response is not strict base64."""


class Malformed(SASLError):
    """Valid base64 that is not a PLAIN message."""


def decode_response(line: bytes, cancel_ok: bool = True, empty_ok: bool = True) -> bytes:
    """The decoded bytes of one client response line.

    ``cancel_ok``: ``*`` cancels (``Cancelled``).  ``empty_ok``: ``=`` stands for
    an empty response (RFC 4954 section 4 for any response; RFC 5034 section 4
    only for the initial one).  Anything else must be strict base64.
    """
    if cancel_ok and line == b"*":
        raise Cancelled()
    if empty_ok and line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise BadBase64() from None


def decode_plain(message: bytes) -> tuple[bytes, bytes, bytes]:
    """RFC 4616 section 2: ``[authzid] NUL authcid NUL passwd`` -> the three parts."""
    parts = message.split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        raise Malformed()
    authzid, authcid, password = parts
    return authzid, authcid, password


def plain_credentials(message: bytes) -> tuple[bytes, bytes | None]:
    """``(authcid, password)`` of a PLAIN message; password None if the client asks to
    act as someone else (an authzid other than its authcid): no proxy authorization."""
    authzid, authcid, password = decode_plain(message)
    if authzid and authzid != authcid:
        return authcid, None
    return authcid, password


class Exchange:
    """One AUTH PLAIN or LOGIN exchange after the command line.

    ``challenge`` is the first server challenge (base64, possibly empty);
    ``step(decoded)`` takes each decoded client response and returns either the
    next challenge (bytes) or the credentials ``(username, password or None)``.
    """

    def __init__(self, mechanism: str) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(mechanism)
        self.mechanism = mechanism
        self._username: bytes | None = None
        self.challenge = b"" if mechanism == "PLAIN" else LOGIN_USERNAME_PROMPT

    def step(self, decoded: bytes) -> bytes | tuple[bytes, bytes | None]:
        if self.mechanism == "PLAIN":
            return plain_credentials(decoded)
        if self._username is None:
            self._username = decoded
            return LOGIN_PASSWORD_PROMPT
        return self._username, decoded
