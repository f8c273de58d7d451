# -*- test-case-name: tests.admin.test_dkimcmd -*-
"""``mailstack dkim keygen|list|retire`` and ``mailstack dns-records``.

The key store is ``dkim/keys.KeyStore`` under data_dir; a running server sees
a new or retired key at its next message, without a restart.  Handlers follow
``admin/cli.py``: ``handler(config, args) -> exit status``, ``Refused`` for a
refused request (a non-local domain, a taken selector, the last active key).
"""

from __future__ import annotations

import json
from typing import Any

from mailstack import dnsrecords
from mailstack.address import AddressError, normalize_domain
from mailstack.admin.cli import Refused
from mailstack.dkim.keys import ALGORITHMS, KeyStore, KeyStoreError


def local_domain(config: Any, text: str) -> str:
    """``text`` as a local domain's A-label; Refused otherwise."""
    try:
        domain = normalize_domain(text)
    except AddressError as e:
        raise Refused(f"{text}: not a domain: {e}") from None
    if not config.is_local_domain(domain):
        raise Refused(f"{text}: {domain} is not a local domain (domains.local)")
    return domain


def keys_of(config: Any) -> KeyStore:
    return KeyStore(config.data_dir)


def dkim_keygen(config: Any, args: Any) -> int:
    domain = local_domain(config, args.domain)
    try:
        info = keys_of(config).keygen(domain, selector=args.selector, algorithm=args.algorithm)
    except KeyStoreError as e:
        raise Refused(str(e)) from None
    print(dnsrecords.zone_line(dnsrecords.Record(info.name, "TXT", info.record)), file=args.stdout)
    return 0


def dkim_list(config: Any, args: Any) -> int:
    infos = keys_of(config).list()
    if args.json:
        print(json.dumps([i.as_dict() for i in infos], indent=2), file=args.stdout)
    else:
        for i in infos:
            print(f"{i.domain} {i.selector} {i.algorithm} {i.state} {i.record}", file=args.stdout)
    return 0


def dkim_retire(config: Any, args: Any) -> int:
    domain = local_domain(config, args.domain)
    try:
        info = keys_of(config).retire(domain, args.selector.lower())
    except KeyStoreError as e:
        raise Refused(str(e)) from None
    print(
        f"retired {info.name}; keep its DNS record for a week: mail signed with it may still be on its way",
        file=args.stdout,
    )
    return 0


def dns_records(config: Any, args: Any) -> int:
    domain = local_domain(config, args.domain)
    try:
        keys = [i for i in keys_of(config).list() if i.domain == domain]
        recs = dnsrecords.records(config, domain, args.ip, keys)
    except ValueError as e:  # a bad --ip
        raise Refused(str(e)) from None
    if args.json:
        print(json.dumps(dnsrecords.as_json(domain, config.hostname, recs), indent=2), file=args.stdout)
    else:
        print(dnsrecords.zone_text(domain, config.hostname, recs), end="", file=args.stdout)
    return 0


def add_parser(commands: Any) -> None:
    """Add ``dkim`` and ``dns-records`` to the command's subparsers."""
    dkim = commands.add_parser("dkim", help="DKIM signing keys").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = dkim.add_parser("keygen", help="make a new signing key; prints its DNS TXT record")
    p.add_argument("domain")
    p.add_argument("--selector", help="DNS selector (default: <year>a, <year>b, ...)")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="rsa", help="rsa (2048 bits, default) or ed25519")
    p.set_defaults(func=dkim_keygen)
    p = dkim.add_parser("list", help="list the active keys and their DNS records")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=dkim_list)
    p = dkim.add_parser("retire", help="stop signing with a key")
    p.add_argument("domain")
    p.add_argument("selector")
    p.set_defaults(func=dkim_retire)

    p = commands.add_parser("dns-records", help="print the DNS records to publish for a local domain")
    p.add_argument("domain")
    p.add_argument(
        "--ip", action="append", default=[], metavar="ADDR", help="a public address of this server (repeatable)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=dns_records)

