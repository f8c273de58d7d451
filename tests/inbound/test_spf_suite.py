"""The RFC 7208 test suite (openspf.org, release 2014.04, BSD licence: see
data/rfc7208-tests.LICENSE) run against SPFVerifier on an in-memory resolver."""

from __future__ import annotations

import os

import pytest
import yaml
from twisted.internet.interfaces import IResolver
from zope.interface.verify import verifyObject

from mailstack.inbound.spf import SPFVerifier
from tests.support.dnsserver import ZoneResolver

SUITE = os.path.join(os.path.dirname(__file__), "data", "rfc7208-tests.yml")


def zone_from_suite(zonedata):
    """The suite's zone -> ZoneResolver zone.  Type SPF records are served as TXT
    unless the name has TXT records of its own (``TXT: NONE``: none at all), as
    the suite's own driver does; RFC 7208 uses TXT only (section 3.1)."""
    zone = {}
    for name, entries in zonedata.items():
        records, spf, has_txt = [], [], False
        for entry in entries:
            if entry == "TIMEOUT":
                records.append("TIMEOUT")
                continue
            ((kind, value),) = entry.items()
            if kind == "SPF":
                spf.append(("TXT", value))
                continue
            if kind == "TXT":
                has_txt = True
                if value == "NONE":
                    continue
            records.append((kind, value))
        if not has_txt:
            records.extend(spf)
        zone[name] = records
    return zone


def load_cases():
    with open(SUITE, "rb") as f:
        scenarios = list(yaml.safe_load_all(f))
    cases = []
    for scenario in scenarios:
        zone = zone_from_suite(scenario["zonedata"])
        for name, test in scenario["tests"].items():
            cases.append(pytest.param(zone, test, id=name))
    return cases


@pytest.mark.parametrize("zone,test", load_cases())
def test_rfc7208_suite(zone, test):
    """Each suite case gives one of its accepted results, and its explanation when the case names one."""
    resolver = ZoneResolver(zone)
    verifier = SPFVerifier(resolver, test.get("receiver", "receiver.test"), lambda: 1_700_000_000.0, default_explanation="DEFAULT")
    got = []
    verifier.check(test["host"], test["mailfrom"], test["helo"]).addBoth(got.append)
    assert len(got) == 1, "the fake resolver answers synchronously"
    result = got[0]
    expected = test["result"] if isinstance(test["result"], list) else [test["result"]]
    assert result.result in expected, (result, test.get("description"))
    if "explanation" in test and result.result == "fail":
        # Case-insensitive: %{i} of an IPv6 client is lower-case hex, as in the
        # RFC 7208 section 7.4 example, where the suite's own driver keeps the
        # case the address was written in (v-macro-ip6).
        assert result.explanation.lower() == test["explanation"].lower()


def test_fake_resolver_provides_iresolver():
    """The suite's in-memory resolver is a full twisted.names IResolver."""
    assert verifyObject(IResolver, ZoneResolver({}))
