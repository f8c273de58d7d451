# -*- test-case-name: tests.pop3.test_server -*-
"""Every POP3 reply line the server sends, as bytes constants and small formatters.

Status indicators are RFC 1939 section 3 (``+OK`` / ``-ERR``).  Extended response
codes in brackets follow RFC 2449 section 8 and RFC 3206:

* ``[IN-USE]`` (RFC 2449 8.1.1): credentials were fine but the maildrop is locked
  by another session.
* ``[AUTH]`` (RFC 3206 section 4): a problem with the credentials or with the
  policy of logging in, which includes "an attempt to authenticate in violation of
  policy" such as a plaintext password before STLS, and a peer or account locked
  out after too many failures.
* ``[SYS/TEMP]`` / ``[SYS/PERM]`` (RFC 3206 section 4): a system problem (disk,
  user database) that should go away by itself / that will not.

Texts never contain exception text, paths or configuration values.
"""

from __future__ import annotations

CRLF = b"\r\n"

# Multi-line responses end with a line holding a single dot (RFC 1939 section 3).
TERMINATOR = b".\r\n"


def _line(text: str) -> bytes:
    return text.encode("ascii") + CRLF


# -- AUTHORIZATION state ----------------------------------------------------

GREETING = _line("+OK mailstack POP3 ready")
TOO_MANY_CONNECTIONS = _line("-ERR [SYS/TEMP] Too many connections, try again later")
TOO_MANY_CONNECTIONS_IP = _line("-ERR [SYS/TEMP] Too many connections from your address, try again later")
LOGIN_TIMEOUT = _line("-ERR [SYS/TEMP] Login timeout, closing connection")
USER_OK = _line("+OK Send your password")
USER_FIRST = _line("-ERR Send USER first")
USER_BAD = _line("-ERR [AUTH] Bad user name")
TLS_REQUIRED = _line("-ERR [AUTH] Plaintext authentication is disallowed without TLS; use STLS")
LOGIN_FAILED = _line("-ERR [AUTH] Authentication failed")
LOCKED_OUT = _line("-ERR [AUTH] Too many failed logins, try again later")
AUTH_SERVICE_FAILED = _line("-ERR [SYS/TEMP] Authentication is temporarily unavailable")
IN_USE = _line("-ERR [IN-USE] Mailbox is locked by another POP3 session")
MAILDROP_UNAVAILABLE = _line("-ERR [SYS/TEMP] Mailbox is temporarily unavailable")
MAILDROP_INVALID = _line("-ERR [SYS/PERM] This account has no usable mailbox")

# RFC 5034 section 4
AUTH_MECHANISMS = [_line("+OK Supported SASL mechanisms follow"), _line("PLAIN"), TERMINATOR]
AUTH_CONTINUE = b"+ " + CRLF  # PLAIN sends an empty challenge
AUTH_CANCELLED = _line("-ERR AUTH cancelled")
AUTH_BAD_BASE64 = _line("-ERR Invalid base64 data")
AUTH_BAD_MECHANISM = _line("-ERR Unsupported SASL mechanism")
AUTH_MALFORMED = _line("-ERR [AUTH] Malformed PLAIN credentials")

# RFC 2595 section 4
STLS_BEGIN = _line("+OK Begin TLS negotiation")
STLS_ALREADY = _line("-ERR TLS is already active")
STLS_UNAVAILABLE = _line("-ERR TLS is not available")


# -- TRANSACTION state ------------------------------------------------------


def login_ok(count: int, octets: int) -> bytes:
    """RFC 1939 section 7 (PASS): ``+OK maildrop locked and ready``."""
    return _line(f"+OK Logged in, {count} messages ({octets} octets)")


def stat(count: int, octets: int) -> bytes:
    """RFC 1939 section 5 (STAT): exactly ``+OK nn mm``."""
    return _line(f"+OK {count} {octets}")


def scan_listing(number: int, octets: int) -> bytes:
    """RFC 1939 section 5 (LIST n): ``+OK n octets``."""
    return _line(f"+OK {number} {octets}")


def list_header(count: int, octets: int) -> bytes:
    return _line(f"+OK {count} messages ({octets} octets)")


def uidl_listing(number: int, uid: str) -> bytes:
    """RFC 1939 section 7 (UIDL n): ``+OK n uid``."""
    return _line(f"+OK {number} {uid}")


def retr_header(octets: int) -> bytes:
    return _line(f"+OK {octets} octets")


def deleted(number: int) -> bytes:
    return _line(f"+OK Message {number} deleted")


def rset(count: int, octets: int) -> bytes:
    return _line(f"+OK Maildrop has {count} messages ({octets} octets)")


def signing_off(left: int) -> bytes:
    """RFC 1939 section 6 (QUIT in UPDATE)."""
    return _line(f"+OK mailstack POP3 server signing off ({left} messages left)")


UIDL_HEADER = _line("+OK Unique-ID listing follows")
TOP_HEADER = _line("+OK Top of message follows")
NOOP = _line("+OK")
NO_SUCH_MESSAGE = _line("-ERR No such message")
ALREADY_DELETED = _line("-ERR Message is deleted")
MESSAGE_GONE = _line("-ERR Message is no longer available")
READ_FAILED = _line("-ERR [SYS/TEMP] Cannot read the message now")
NOT_REMOVED = _line("-ERR [SYS/TEMP] Some deleted messages were not removed")

# -- any state --------------------------------------------------------------

CAPA_HEADER = _line("+OK Capability list follows")
BYE = _line("+OK mailstack POP3 server signing off")
UNKNOWN_COMMAND = _line("-ERR Unknown command")
BAD_STATE = _line("-ERR Command not valid in this state")
BAD_ARGUMENTS = _line("-ERR Invalid arguments")
LINE_TOO_LONG = _line("-ERR Line too long")
TOO_MANY_ERRORS = _line("-ERR Too many errors, closing connection")
AUTOLOGOUT = _line("-ERR Autologout: idle for too long")
SHUTTING_DOWN = _line("-ERR [SYS/TEMP] Server shutting down, try again later")
INTERNAL_ERROR = _line("-ERR [SYS/TEMP] Internal server error")

# RFC 2449 section 6: capability lines (without the list header and terminator).
CAPA_TOP = _line("TOP")
CAPA_UIDL = _line("UIDL")
CAPA_USER = _line("USER")
CAPA_SASL = _line("SASL PLAIN")
CAPA_STLS = _line("STLS")
CAPA_RESP_CODES = _line("RESP-CODES")
CAPA_AUTH_RESP_CODE = _line("AUTH-RESP-CODE")
CAPA_PIPELINING = _line("PIPELINING")
CAPA_EXPIRE = _line("EXPIRE NEVER")
CAPA_IMPLEMENTATION = _line("IMPLEMENTATION mailstack")
CAPA_UTF8 = _line("UTF8 USER")  # RFC 6856 section 2: USER/PASS take UTF-8 too
UTF8_OK = _line("+OK UTF8 enabled")
