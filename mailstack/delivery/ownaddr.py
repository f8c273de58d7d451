# -*- test-case-name: tests.delivery.test_remote -*-
"""The addresses this server listens on for SMTP, so the relay never connects to itself.

An MX host (or an address literal) that resolves to one of them is a mail
loop: RFC 5321 section 5.1 lets a server that finds itself among the MX hosts
only use hosts of lower preference, and Postfix bounces such mail with "mail
for <domain> loops back to myself" (554 5.4.6) rather than connect to its own
port.  The listening addresses come from the ``[listen]`` SMTP endpoint
strings (``tcp:25:interface=192.0.2.1``); a wildcard listener (no interface,
``0.0.0.0`` or ``::``) also counts every address of the host's interfaces,
read once at start (``interface_addresses``).
"""

from __future__ import annotations

import fcntl
import ipaddress
import re
import socket
import struct
from collections.abc import Iterable

from mailstack.config import Config

SIOCGIFADDR = 0x8915  # Linux: the IPv4 address of an interface
WILDCARDS = ("", "0.0.0.0", "::")


def parse_listener(description: str) -> tuple[str, int] | None:
    """``(interface, port)`` of a ``tcp:``/``ssl:`` endpoint string; None for other kinds."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    if parts[0] not in ("tcp", "ssl", "tcp6"):
        return None
    interface, port = "", 0
    for i, part in enumerate(parts[1:]):
        key, eq, value = part.partition("=")
        if eq and key == "interface":
            interface = value
        elif eq and key == "port":
            port = int(value)
        elif not eq and i == 0:
            port = int(part)
    return interface, port


def interface_addresses() -> list[str]:
    """Every IPv6 address (``/proc/net/if_inet6``) and IPv4 address of the host (blocking; once at start)."""
    found: list[str] = []
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                raw = line.split()[0]
                found.append(str(ipaddress.IPv6Address(int(raw, 16))))
    except OSError:
        pass
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            found.append(socket.inet_ntoa(packed[20:24]))
    finally:
        probe.close()
    return found


def own_addresses(config: Config, interfaces: Iterable[str] | None = None) -> dict[int, tuple[str, ...]]:
    """Port -> the addresses this server accepts SMTP on at that port.

    ``interfaces``: the host's addresses for wildcard listeners (default:
    ``interface_addresses()``)."""
    listen = config.listen
    out: dict[int, set[str]] = {}
    host: list[str] | None = None if interfaces is None else list(interfaces)
    for description in (*listen.smtp, *listen.submission, *listen.submissions):
        parsed = parse_listener(description)
        if parsed is None:
            continue
        interface, port = parsed
        addresses = out.setdefault(port, set())
        if interface in WILDCARDS:
            if host is None:
                host = interface_addresses()
            addresses.update(host)
            addresses.add(interface or "0.0.0.0")
        else:
            addresses.add(interface)
    return {port: tuple(sorted(a for a in addresses if _is_ip(a))) for port, addresses in out.items()}


def _is_ip(text: str) -> bool:
    """Whether ``text`` is an IP address (an interface given as a name is skipped)."""
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True
