"""An in-memory twisted.names resolver answering from a zone dict, for unit tests.

``ZoneResolver({"example.com": [("TXT", "v=spf1 -all"), ("A", "192.0.2.1")]})``:
values are text (TXT: a str or a list of character-strings; MX: ``(pref,
name)``), ``"TIMEOUT"`` as a record makes every type not listed before it time
out, ``"SERVFAIL"`` fails every query of the name, a name missing from the zone is NXDOMAIN and a name listed without
records of the asked type answers NOERROR with no data.  A CNAME record is
answered with the target's records of the asked type after it, as a recursive
server does.
"""

from __future__ import annotations

from twisted.internet.defer import fail, succeed
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError, DNSQueryTimeoutError, DNSServerError

TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT, "PTR": dns.PTR, "CNAME": dns.CNAME}


def payload(kind, value):
    """A twisted.names record payload from the zone's text form."""
    if kind == "A":
        return dns.Record_A(value)
    if kind == "AAAA":
        return dns.Record_AAAA(value)
    if kind == "MX":
        return dns.Record_MX(int(value[0]), value[1].encode())
    if kind == "TXT":
        strings = [value] if isinstance(value, str) else list(value)
        return dns.Record_TXT(*[s.encode("utf-8") for s in strings])
    if kind == "PTR":
        return dns.Record_PTR(value.encode())
    if kind == "CNAME":
        return dns.Record_CNAME(value.encode())
    raise ValueError(kind)


class ZoneResolver(ResolverBase):
    """IResolver answering from ``zone``; ``queries`` records (name, type) asked."""

    def __init__(self, zone):
        ResolverBase.__init__(self)
        self.zone = {name.lower().rstrip("."): records for name, records in zone.items()}
        self.queries = []

    def _answers(self, name, qtype, depth=0):
        records = self.zone.get(name)
        if records is None:
            raise DNSNameError(name)
        out = []
        for record in records:
            if record == "SERVFAIL":
                raise DNSServerError(name)
            if record == "TIMEOUT":
                if not out:
                    raise DNSQueryTimeoutError(name)
                break
            kind, value = record
            if kind == "CNAME" and qtype != dns.CNAME and depth < 8:
                out.append(dns.RRHeader(name, dns.CNAME, dns.IN, 60, payload(kind, value)))
                out.extend(self._answers(value.lower().rstrip("."), qtype, depth + 1))
            elif TYPES[kind] == qtype:
                out.append(dns.RRHeader(name, qtype, dns.IN, 60, payload(kind, value)))
        return out

    def _lookup(self, name, cls, qtype, timeout):
        name = (name.decode() if isinstance(name, bytes) else name).lower().rstrip(".")
        self.queries.append((name, qtype))
        try:
            return succeed((self._answers(name, qtype), [], []))
        except (DNSNameError, DNSQueryTimeoutError, DNSServerError) as e:
            return fail(e)
