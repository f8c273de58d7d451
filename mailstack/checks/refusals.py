"""The replies of the inbound checks and the one log line for each refusal.

Every refused connection, command or message of an inbound check is logged as
one line in a stable format, for fail2ban and log searches::

    inbound refused peer=192.0.2.7 check=dnsbl reason="listed in zen.example"

``peer`` is the client IP address, ``check`` the check's name (``dnsbl``,
``rate``, ``greylist``, ``dmarc``, ``rspamd``), ``reason`` a short text with
peer-supplied parts escaped (``logsafe.escape``) and ``"`` written as ``'``, so
the line stays one line and the quotes stay balanced.
"""

from __future__ import annotations

from twisted.logger import Logger

from mailstack.errors import Reply
from mailstack.logsafe import escape
from mailstack.pipeline import Connection

# RFC 3463 5.7.1: delivery not authorized, message refused; 4.7.1: the same, for now.
RATE_EXCEEDED = Reply(451, "4.7.1", "Too many messages from your address, try again later")
GREYLISTED = Reply(451, "4.7.1", "Greylisted, please try again later")
DMARC_REJECT = Reply(550, "5.7.1", "Message rejected by the DMARC policy of the From domain")
SPAM = Reply(550, "5.7.1", "Message rejected as spam")
SPAM_TEMPFAIL = Reply(451, "4.7.1", "Message deferred by the spam filter, try again later")
SCANNER_DOWN = Reply(451, "4.7.1", "Message cannot be scanned now, try again later")


def listed(zone: str) -> Reply:
    """554 5.7.1 naming the block list, as Postfix does: the sender's postmaster learns where to ask."""
    return Reply(554, "5.7.1", f"Service unavailable; client host listed in {zone}")


_log = Logger(namespace="mailstack.inbound")


def refuse(conn: Connection, check: str, reason: str, reply: Reply) -> Reply:
    """Log the refusal line (module docstring) and return ``reply``."""
    text = escape(reason).replace('"', "'")
    _log.info('inbound refused peer={peer} check={check} reason="{reason}"', peer=conn.peer, check=check, reason=text)
    return reply
