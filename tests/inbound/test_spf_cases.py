"""The SPF case table (spf_cases.py, written from RFC 7208) run against SPFVerifier."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.interfaces import IResolver
from zope.interface.verify import verifyObject

from mailstack.inbound.spf import SPFVerifier
from tests.inbound.spf_cases import BASE, CASES, CLIENT6, NIBBLES6, Case
from tests.support.dnsserver import ZoneResolver


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_spf_case(case: Case) -> None:
    """Each case gives one of the results RFC 7208 allows, and the explanation where it names one."""
    resolver = ZoneResolver({**BASE, **case.zone})
    verifier = SPFVerifier(resolver, "receiver.example", lambda: 1_700_000_000.0, default_explanation="DEFAULT")
    got: list = []
    verifier.check(case.ip, case.mail_from, case.helo).addBoth(got.append)
    assert len(got) == 1, "the in-memory resolver answers synchronously"
    result = got[0]
    assert result.result in case.expect, (case.section, case.description, result)
    if case.explanation is not None:
        assert result.explanation == case.explanation, (case.section, case.description, result)


def test_table_is_well_formed() -> None:
    """Case names are unique, every case cites a section, and the table is as large as promised."""
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert all(c.section and c.description for c in CASES)
    assert len(CASES) >= 150


def test_ipv6_nibbles_constant() -> None:
    """The table's spelled-out %{i} of the IPv6 client is its 32 nibbles (RFC 7208 7.3)."""
    assert NIBBLES6.replace(".", "") == ipaddress.IPv6Address(CLIENT6).exploded.replace(":", "")


def test_resolver_provides_iresolver() -> None:
    """The in-memory resolver the cases run on is a full twisted.names IResolver."""
    assert verifyObject(IResolver, ZoneResolver(BASE))
