# -*- test-case-name: tests.delivery.test_remote -*-
"""The outbound reply vocabulary: what we record when no server answered, or answered badly.

These replies are never sent to an SMTP client.  They go into the queue
envelope (``last_reply``, ``history``), the delivery log and the DSN's
``Diagnostic-Code``, so each says in plain words what happened, with an
RFC 3463 enhanced code (section 3.4 network and routing, 3.5 protocol,
3.7 security, 3.3 system).  4xx means the queue tries again later, 5xx
fails the recipient.  Names are bare upper-case, as in ``smtp/replies.py``;
modules import this one as ``OR``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailstack.errors import Reply


@dataclass(frozen=True)
class RemoteReply(Reply):
    """A reply plus the MX host and IP it came from (or that we failed to reach)."""

    host: str = ""
    ip: str = ""


def at_host(reply: Reply, host: str, ip: str) -> RemoteReply:
    """``reply`` as a RemoteReply from ``host`` [``ip``]."""
    return RemoteReply(reply.code, reply.enhanced, reply.text, host=host, ip=ip)


# -- MX lookups (mx.py) --------------------------------------------------------

NULL_MX = Reply(556, "5.1.10", "Recipient domain does not accept mail (null MX, RFC 7505)")
NO_DOMAIN = Reply(550, "5.1.2", "Recipient domain does not exist")
NO_MAIL_HOST = Reply(550, "5.4.4", "Recipient domain has no mail server")
DNS_TEMPORARY = Reply(451, "4.4.3", "Temporary DNS failure looking up the recipient domain")
NO_ADDRESS = Reply(451, "4.4.3", "No address found for any mail server of the recipient domain")
MAIL_LOOP = Reply(554, "5.4.6", "Mail for the recipient domain loops back to this server")
LOOPS_BACK = Reply(554, "5.4.6", "Mail for the recipient domain loops back to myself (an MX host is this server)")

# -- one SMTP session (smtp/client.py) -----------------------------------------

CONNECTION_LOST = Reply(451, "4.4.2", "Connection lost during the SMTP session")
TIMEOUT = Reply(451, "4.4.2", "Timeout waiting for the remote server")
PROTOCOL_VIOLATION = Reply(451, "4.5.0", "Remote server violated the SMTP protocol")
TLS_UNAVAILABLE = Reply(451, "4.7.4", "STARTTLS required but not offered by the remote server")
TLS_FAILED = Reply(451, "4.7.5", "TLS negotiation with the remote server failed")
TLS_NOT_VERIFIED = Reply(
    451, "4.7.5", "TLS with the remote server failed or its certificate could not be verified for its name"
)
AUTH_UNAVAILABLE = Reply(451, "4.7.0", "Authentication required but not offered by the remote server")
READ_ERROR = Reply(451, "4.3.0", "Local error reading the message")
NO_SMTPUTF8 = Reply(553, "5.6.7", "Remote server does not support SMTPUTF8 for this address")


def too_big_for_remote(limit: str) -> Reply:
    """RFC 1870 section 6: the server announced a SIZE limit below the message."""
    return Reply(552, "5.3.4", f"Message size exceeds the remote server's limit of {limit} bytes")


# -- one attempt over all hosts (delivery/remote.py) ---------------------------

CONNECT_FAILED = Reply(451, "4.4.1", "Connection to the remote server failed")
NO_HOSTS = Reply(451, "4.4.4", "No mail server could be reached")
OPEN_ERROR = Reply(451, "4.3.0", "Local error opening the message")
SHUTTING_DOWN = Reply(451, "4.3.2", "Delivery interrupted: the mail system is shutting down")


def mta_sts_no_mx(domain: str, patterns: tuple[str, ...]) -> Reply:
    """RFC 8461 section 4.1/5: no MX host matches the domain's enforced policy."""
    allowed = ", ".join(patterns)[:200]
    return Reply(451, "4.7.5", f"No MX host of {domain} matches its MTA-STS policy (mx: {allowed})")


def session_refused(reply: Reply) -> Reply:
    """A host-level 5xx (greeting, EHLO, AUTH) as a 4xx: worth retrying later."""
    if reply.temporary:
        return reply
    return Reply(451, "4.4.0", f"Remote server refused the session: {reply}")


def smarthost_refused(reply: Reply) -> Reply:
    """A smarthost's 5xx is our configuration's problem, never the sender's: retry."""
    return Reply(451, "4.7.0", f"Smarthost refused the session: {reply}")


def smarthost_auth_failed(reply: Reply) -> Reply:
    """AUTH at the smarthost failed: temporary, never a bounce."""
    return Reply(451, "4.7.0", f"Authentication at the smarthost failed: {reply}")


# -- local delivery (delivery/local.py) ----------------------------------------

DELIVERED = Reply(250, "2.0.0", "Delivered")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in delivery")
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full")  # retried, not bounced
BAD_MAILBOX = Reply(550, "5.1.3", "Bad destination mailbox address")

# -- the queue manager -----------------------------------------------------------

NO_RESULT = Reply(451, "4.3.0", "Delivery agent gave no result")
