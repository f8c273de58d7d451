# -*- test-case-name: tests.test_checks_inbound -*-
"""The inbound checks that ``[inbound]`` turns on, in the order they run.

The ``[inbound]`` keys alone configure them: each key adds its check to the
pipeline, ahead of the checks listed in ``[pipeline] checks``, so the
Authentication-Results field is there for those.  All of them run in MX
sessions of unauthenticated clients only (``submission = False``):

==========  =============  ===========================================
stage       check          key
==========  =============  ===========================================
connect     ``dnsbl``      ``inbound.dnsbl``
MAIL        ``rate``       ``inbound.max_messages_per_minute``
MAIL        ``spf``        ``inbound.spf`` (evaluated while RCPT/DATA go on)
RCPT        ``greylist``   ``inbound.greylist``
end of data ``spf``        collects the SPF result
end of data ``dkim``       ``inbound.dkim``
end of data ``dmarc``      ``inbound.dmarc``
end of data authresults    always: Authentication-Results, forged ones removed
end of data ``rspamd``     ``inbound.rspamd``
==========  =============  ===========================================

Every DNS question goes through the one shared resolver (``dnsresolver``).
"""

from __future__ import annotations

import os
import random
from typing import Any

from twisted.internet.interfaces import IResolver
from twisted.web.client import Agent, HTTPConnectionPool

from mailstack.checks.authresults import AuthResultsCheck
from mailstack.checks.clientrate import ClientRateCheck
from mailstack.checks.dkimverify import DKIMCheck
from mailstack.checks.dmarc import DMARCCheck
from mailstack.checks.dnsbl import DNSBLCheck
from mailstack.checks.greylisting import GreylistCheck
from mailstack.checks.rspamd import RspamdCheck
from mailstack.checks.spf import SPFCheck
from mailstack.inbound.dkimverify import DKIMVerifier
from mailstack.inbound.dmarc import DMARCEvaluator
from mailstack.inbound.dnsbl import DNSBLChecker
from mailstack.inbound.greylist import Greylist
from mailstack.inbound.interfaces import IGreylist
from mailstack.inbound.rspamd import RspamdClient
from mailstack.inbound.spf import SPFVerifier
from mailstack.interfaces import IMessageCheck, IRateLimit


def greylist_table(runtime: Any) -> Greylist:
    """The greylisting table of ``inbound.greylist``, kept in ``<data_dir>/greylist.json``;
    a service to start (it loads the file) and stop (it writes it)."""
    config = runtime.config
    path = os.path.join(config.data_dir, "greylist.json")
    return Greylist(path, runtime.reactor, runtime.run_blocking, config.inbound.greylist)


def build(
    runtime: Any, resolver: IResolver, rate: IRateLimit | None, greylist: IGreylist | None
) -> list[IMessageCheck]:
    """The checks of ``runtime.config.inbound``, asking the DNS through ``resolver``.

    ``rate`` and ``greylist`` are the per-client counts and the greylist table
    that every session shares (``procs.stateserver.build``: the master's own,
    or a worker's proxies of them); None when ``[inbound]`` does not ask for them.
    """
    config = runtime.config
    cfg = config.inbound
    reactor = runtime.reactor
    checks: list[IMessageCheck] = []
    if cfg.dnsbl:
        checks.append(DNSBLCheck(DNSBLChecker(resolver, cfg.dnsbl)))
    if cfg.max_messages_per_minute:
        if rate is None:
            raise ValueError("inbound.max_messages_per_minute is set but no client counts were given")
        checks.append(ClientRateCheck(rate, cfg.max_messages_per_minute))
    if cfg.spf:
        checks.append(SPFCheck(SPFVerifier(resolver, config.hostname, reactor.seconds), reactor))
    if cfg.greylist is not None:
        if greylist is None:
            raise ValueError("inbound.greylist is set but no greylist table was given")
        checks.append(GreylistCheck(greylist))
    if cfg.dkim:
        checks.append(DKIMCheck(DKIMVerifier(resolver, runtime.run_blocking)))
    if cfg.dmarc:
        checks.append(DMARCCheck(DMARCEvaluator(resolver, random.SystemRandom())))
    checks.append(AuthResultsCheck(config.hostname, cfg.spf, cfg.dkim, cfg.dmarc))
    if cfg.rspamd:
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        client = RspamdClient(cfg.rspamd, agent, reactor, runtime.run_blocking)
        checks.append(RspamdCheck(client, tempfail_when_down=cfg.rspamd_failure == "tempfail"))
    return checks
