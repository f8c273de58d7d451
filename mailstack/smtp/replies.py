# -*- test-case-name: tests.smtp.test_smtp_replies -*-
"""Every reply the ESMTP server sends, as named ``errors.Reply`` constants.

Codes are RFC 5321 section 4.2; enhanced codes RFC 3463 / RFC 5248 (registry).
Texts never contain exception text, paths or configuration values; the few
replies that carry a variable part (banner, EHLO, queue id, SIZE) are built by
the small functions at the end.
"""

from __future__ import annotations

from functools import lru_cache

from mailstack.errors import Reply

# -- 2xx ---------------------------------------------------------------------
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
RESET_OK = Reply(250, "2.0.0", "Ok")
NOOP_OK = Reply(250, "2.0.0", "Ok")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH")
BYE = Reply(221, "2.0.0", "Bye")
CHUNK_OK_TEXT = "octets received"  # RFC 3030 section 4.2: 250 after each non-LAST chunk
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")

# -- 3xx ---------------------------------------------------------------------
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")

# -- 4xx ---------------------------------------------------------------------
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_CONNECTIONS_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
AUTH_LOCKED = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")  # also: the commit failed
DISK_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")

# -- 5xx ---------------------------------------------------------------------
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
BARE_CR_LF_COMMAND = Reply(500, "5.5.2", "Bare CR or LF in command line; use CRLF")
SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
NEED_HELO = Reply(503, "5.5.1", "Send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
TLS_NOT_AVAILABLE = Reply(502, "5.5.1", "STARTTLS not available")
AUTH_NOT_AVAILABLE = Reply(502, "5.5.1", "AUTH not available")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT <size> [LAST]")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "DATA not allowed after BDAT")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
BAD_UTF8 = Reply(501, "5.6.7", "Address is not valid UTF-8")
BAD_DSN_PARAMETER = Reply(501, "5.5.4", "Malformed DSN parameter")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_EXPIRED = Reply(530, "5.7.0", "Authentication no longer valid; authenticate again")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
SESSION_REFUSED = Reply(503, "5.5.1", "Session refused; only QUIT is accepted")
PIPELINING_FORBIDDEN = Reply(554, "5.5.0", "Improper command pipelining after DATA, closing connection")  # RFC 2920 3.1
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header section too big")
BARE_CR_LF_DATA = Reply(
    550, "5.6.0", "Message contains a bare CR or LF; lines must end with CRLF (SMTP smuggling protection)"
)
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "MAIL FROM/RCPT TO parameters not recognized or not implemented")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
NULL_SENDER_NOT_ALLOWED = Reply(553, "5.7.1", "Null sender not allowed for authenticated submission")
# RCPT refusals of routing.Router (RFC 5321 section 3.3; RFC 3463 X.7.1, X.1.1, X.4.6).
RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")
UNKNOWN_USER = Reply(550, "5.1.1", "No such user here")
PRIVATE_LITERAL = Reply(553, "5.7.1", "Relaying to an address literal in a private or loopback range is not allowed")
ALIAS_LOOP = Reply(550, "5.4.6", "Routing loop detected")
TLS_FAILED = Reply(454, "4.7.0", "TLS not available due to temporary reason")


def banner(hostname: str) -> Reply:
    """RFC 5321 4.3.1 greeting: ``220 <hostname> ESMTP mailstack``."""
    return Reply(220, "", f"{hostname} ESMTP mailstack")


def helo(hostname: str, client: str) -> Reply:
    return Reply(250, "", f"{hostname} Hello {client}")


def ehlo(hostname: str, client: str, keywords: list[str]) -> Reply:
    """RFC 5321 4.1.1.1: the first line is the greeting, then one keyword per line."""
    return Reply(250, "", "\n".join([f"{hostname} Hello {client}"] + keywords))


@lru_cache(maxsize=1024)
def ehlo_wire(hostname: str, client: str, keywords: tuple[str, ...]) -> bytes:
    """``ehlo(...).encode()``, remembered: a client says the same EHLO on every
    connection, and building and encoding the reply was a visible part of a
    session's CPU."""
    return ehlo(hostname, client, list(keywords)).encode()


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def chunk_ok(size: int) -> Reply:
    return Reply(250, "2.0.0", f"{size} {CHUNK_OK_TEXT}")


def auth_challenge(b64: bytes) -> bytes:
    """RFC 4954 section 4: ``334 <base64>`` (the text may be empty)."""
    return b"334 " + b64 + b"\r\n"


ALL = {name: value for name, value in globals().items() if isinstance(value, Reply)}
