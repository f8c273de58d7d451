"""A fake DNS: a twisted.names resolver and server answering from a dict of records.

The zone is ``{name: [(type, value), ...]}`` with types A, AAAA, MX
(``(preference, exchange)``), TXT (a str, or a list of character-strings),
PTR and CNAME; a name missing from the zone is NXDOMAIN, a name without
records of the asked type answers NOERROR with no data.  Two markers stand in
for broken servers: ``"TIMEOUT"`` (every type not listed before it times out;
the server answers SERVFAIL) and ``"SERVFAIL"``.

* ``ZoneResolver(zone)``: an in-memory ``IResolver`` for unit tests
  (answers synchronously, records the questions in ``queries``).
* ``listen(reactor, zone, port=0)``: serve the zone over UDP and TCP on
  127.0.0.1 from a reactor that is already running (trial tests).
* ``DNSServer(zone, tmp_path)``: the same server in a subprocess, for the
  end-to-end tests, whose own process runs no reactor (and whose ``twistd``
  runs in a subprocess too); the ``dns_server`` pytest fixture starts them and
  stops them after the test.  A reactor thread inside the pytest process is
  avoided on purpose: the global reactor runs once per process and trial
  tests in the same run need it.

This file imports nothing from the project, so it runs as a script
(``python dnsserver.py ZONE.json``) from any working directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.error import CannotListenError
from twisted.names import dns, server
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError, DNSQueryTimeoutError, DNSServerError

TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT, "PTR": dns.PTR, "CNAME": dns.CNAME}
START_TIMEOUT = 30.0


def payload(kind: str, value: Any) -> Any:
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
    raise ValueError(f"unsupported record type {kind}")


class ZoneResolver(ResolverBase):
    """IResolver answering from ``zone``; ``queries`` records (name, type) asked.

    A CNAME is answered with the target's records of the asked type after it,
    as a recursive server does.
    """

    def __init__(self, zone: dict[str, list[Any]]) -> None:
        ResolverBase.__init__(self)
        self.zone = {name.lower().rstrip("."): records for name, records in zone.items()}
        self.queries: list[tuple[str, int]] = []

    def _answers(self, name: str, qtype: int, depth: int = 0) -> list[dns.RRHeader]:
        records = self.zone.get(name)
        if records is None:
            raise DNSNameError(name)
        out: list[dns.RRHeader] = []
        for record in records:
            if record == "SERVFAIL":
                raise DNSServerError(name)
            if record == "TIMEOUT":
                if not out:
                    raise DNSQueryTimeoutError(name)
                break
            kind, value = record
            if kind == "CNAME" and qtype != dns.CNAME and depth < 8:
                out.append(dns.RRHeader(name, dns.CNAME, dns.IN, 60, payload(kind, value), auth=True))
                out.extend(self._answers(value.lower().rstrip("."), qtype, depth + 1))
            elif TYPES[kind] == qtype:
                out.append(dns.RRHeader(name, qtype, dns.IN, 60, payload(kind, value), auth=True))
        return out

    def _lookup(self, name: bytes | str, cls: int, qtype: int, timeout: Any) -> Any:
        text = (name.decode() if isinstance(name, bytes) else name).lower().rstrip(".")
        self.queries.append((text, qtype))
        try:
            return succeed((self._answers(text, qtype), [], []))
        except (DNSNameError, DNSQueryTimeoutError, DNSServerError) as e:
            return fail(e)


def listen(reactor: Any, zone: dict[str, list[Any]], port: int = 0) -> tuple[int, list[Any]]:
    """Serve ``zone`` on 127.0.0.1 over UDP and TCP; (port, [udp, tcp] listening ports).

    With ``port=0`` the UDP port is chosen by the system and TCP takes the same
    number; when another process holds that TCP port, another UDP port is tried.
    """
    factory = server.DNSServerFactory(authorities=[ZoneResolver(zone)])
    attempts = 0
    while True:
        udp = reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        number = udp.getHost().port
        try:
            tcp = reactor.listenTCP(number, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            attempts += 1
            if port or attempts == 20:
                raise
            continue
        return number, [udp, tcp]


def load_zone(path: str) -> dict[str, list[Any]]:
    """A zone written by ``DNSServer`` (JSON turns tuples into lists)."""
    with open(path) as f:
        raw = json.load(f)
    return {name: [r if isinstance(r, str) else (r[0], r[1]) for r in records] for name, records in raw.items()}


def main(argv: list[str]) -> None:
    """``dnsserver.py ZONE.json``: serve it and print ``ready PORT``."""
    from twisted.internet import reactor

    zone = load_zone(argv[1])
    for _ in range(20):  # the TCP port of the same number may be taken: try another
        try:
            port, _ports = listen(reactor, zone)
            break
        except OSError:
            continue
    else:
        raise SystemExit("no free port")
    print(f"ready {port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


class DNSServer:
    """``main`` in a subprocess; ``address`` is ``("127.0.0.1", port)`` once started."""

    def __init__(self, zone: dict[str, list[Any]], tmp_path: Any) -> None:
        self.zone = zone
        self.dir = str(tmp_path)
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> None:
        path = os.path.join(self.dir, f"zone-{id(self):x}.json")
        with open(path, "w") as f:
            json.dump(self.zone, f)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), path],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()  # blocks until the server is listening
        if line[:1] != ["ready"]:
            self.stop()
            raise RuntimeError(f"fake DNS server did not start: {line!r}")
        self.port = int(line[1])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=START_TIMEOUT)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def dns_server(tmp_path: Any) -> Any:
    """Factory fixture: ``dns_server(zone)`` -> a started DNSServer, stopped after the test."""
    servers: list[DNSServer] = []

    def start(zone: dict[str, list[Any]]) -> DNSServer:
        s = DNSServer(zone, tmp_path)
        s.start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


if __name__ == "__main__":
    main(sys.argv)
