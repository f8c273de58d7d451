# -*- test-case-name: tests.test_netpolicy -*-
"""Which IP addresses outbound mail must not be sent to.

A recipient such as ``user@[10.0.0.5]`` or ``user@[127.0.0.1]`` (an address
literal, RFC 5321 section 4.1.3) would make the relay open a connection inside
the network it runs in: to a service on the loopback interface, a cloud
metadata endpoint (169.254.169.254), or hosts behind the firewall.  Such
literals are refused unless ``relay.allow_private_literals`` is set, and mail
must never be relayed back to the server's own listening addresses (a loop).

Pure functions over ``ipaddress``; the caller extracts the literal
(``mx.literal_address``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Networks no relay target may be in, by the RFC that sets them aside.
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network", 0.0.0.0 unspecified (RFC 1122 section 3.2.1.3)
        "10.0.0.0/8",  # private (RFC 1918)
        "100.64.0.0/10",  # carrier-grade NAT (RFC 6598)
        "127.0.0.0/8",  # loopback (RFC 1122)
        "169.254.0.0/16",  # link-local (RFC 3927)
        "172.16.0.0/12",  # private (RFC 1918)
        "192.168.0.0/16",  # private (RFC 1918)
        "::/128",  # unspecified (RFC 4291 section 2.5.2)
        "::1/128",  # loopback (RFC 4291 section 2.5.3)
        "fc00::/7",  # unique local (RFC 4193)
        "fe80::/10",  # link-local (RFC 4291 section 2.5.6)
    )
)


def _ip(address: str | IPAddress) -> IPAddress:
    ip = ipaddress.ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:10.0.0.1 reaches 10.0.0.1
    return ip


def is_private_literal(address: str | IPAddress) -> bool:
    """Whether ``address`` is loopback, link-local, private, unique local, unspecified or CGNAT.

    ValueError if ``address`` is not an IP address.
    """
    ip = _ip(address)
    return any(ip in net for net in PRIVATE_NETWORKS if net.version == ip.version)


def is_own_address(address: str | IPAddress, listening: Iterable[str | IPAddress]) -> bool:
    """Whether ``address`` is one the server listens on.

    ``listening`` holds the listeners' bind addresses.  A wildcard listener
    (``0.0.0.0`` or ``::``) listens on every local address; this function cannot
    list the host's interfaces, so it then counts only the loopback and
    unspecified addresses of that family (``::`` counts for both, being dual
    stack on Linux): pass the interface addresses in ``listening`` too.
    ValueError if ``address`` or an entry is not an IP address.
    """
    ip = _ip(address)
    for entry in listening:
        own = _ip(entry)
        if own == ip:
            return True
        covers = own.is_unspecified and own.version in (ip.version, 6)
        if covers and (ip.is_loopback or ip.is_unspecified):
            return True
    return False
