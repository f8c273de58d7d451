# -*- test-case-name: tests.test_lognoise -*-
"""Twisted's own lines that say nothing to an operator, kept out of the log.

twisted.names' client asks every question from a fresh UDP port (a random
source port per query, RFC 5452 section 9.2), and Twisted's UDP port logs its
start and end and its protocol's start and stop as legacy log lines: four
lines per DNS question, which the inbound checks ask for every client.  The
server opens no UDP port of its own, so every such line is the resolver's.
``quiet`` drops exactly those four kinds and passes everything else on.
"""

from __future__ import annotations

import re
from typing import cast

from twisted.logger import FilteringLogObserver, ILogFilterPredicate, ILogObserver, LogEvent, PredicateResult

_RESOLVER_PORT = re.compile(
    r"DNSDatagramProtocol starting on \d+"
    r"|(?:Starting|Stopping) protocol <twisted\.names\.dns\.DNSDatagramProtocol object at 0x[0-9a-fA-F]+>"
    r"|\(UDP Port \d+ Closed\)"
)


def resolver_port_event(event: LogEvent) -> PredicateResult:
    """``no`` for a legacy line about one of the resolver's UDP ports, else ``maybe``."""
    if event.get("log_namespace") == "log_legacy":
        text = event.get("log_text")
        if isinstance(text, str) and _RESOLVER_PORT.fullmatch(text):
            return PredicateResult.no
    return PredicateResult.maybe


def quiet(observer: ILogObserver) -> ILogObserver:
    """``observer`` without the resolver's port lines."""
    return FilteringLogObserver(observer, [cast(ILogFilterPredicate, resolver_port_event)])
