"""twistd plugin: ``twistd mailstack``."""

from twisted.application.service import ServiceMaker

mailstack = ServiceMaker(
    "mailstack",
    "mailstack.tap",
    "A complete mail server: ESMTP (MX and submission), outbound queue, POP3.",
    "mailstack",
)
