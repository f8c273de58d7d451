# -*- test-case-name: tests.test_config -*-
"""Configuration: one TOML file loaded into frozen value objects.

Every key is declared once in ``KEYS`` below with its parser, default and a
one-line doc; ``etc/mailstack.toml`` and README's config reference are checked
against the declarations by the tests.  Errors name the key and the file in one
line (``ConfigError``); nothing here ever raises a traceback at a user.

Each section is an explicit frozen dataclass (``RelaySection`` ...), so that
``config.relay.port`` is an ``int`` to the type checker.  Adding a key is two
lines: its ``Key(...)`` line in ``KEYS`` and a field of the same name, typed as
the parser's return type, at the same position in the section's dataclass
(plus its line in ``etc/mailstack.toml`` and its row in README's table, which the
tests demand).  ``tests/test_config.py`` checks that the dataclasses and ``KEYS``
agree exactly.  A new section is a new dataclass and a ``Config`` field named
after it.

Parsers take the raw TOML value and return the field's value or raise
ValueError with the message users see.  Path keys (``_path``) are resolved
against the config file's folder by ``from_mapping``.

With no file, the embedded defaults apply: hostname ``localhost``, local domain
``localhost``, data in ``./mailstack-data`` and loopback listeners on high ports.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, get_type_hints

from mailstack.limits import check_minimums

ENV_VAR = "MAILSTACK_CONFIG"


class ConfigError(Exception):
    """One line naming the file and key: ``etc/x.toml: relay.port: must be ...``."""


# -- value parsers ----------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> float:
    """``"30s"``, ``"5m"``, ``"4h"``, ``"5d"`` -> seconds.  A unit is required."""
    if not isinstance(value, str):
        raise ValueError('must be a duration string such as "30s", "5m", "4h" or "5d"')
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f'{value!r} is not a duration such as "30s", "5m", "4h" or "5d"')
    return float(m.group(1)) * _UNITS[m.group(2)]


def _duration(value: Any) -> float:
    return parse_duration(value)


def _optional_duration(value: Any) -> float | None:
    if value == "":
        return None
    return parse_duration(value)


def _durations(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of durations")
    return tuple(parse_duration(v) for v in value)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("must be a non-negative integer")
    return value


def _port(value: Any) -> int:
    value = _int(value)
    if not 0 < value < 65536:
        raise ValueError("must be a TCP port (1-65535)")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _path(value: Any) -> str:
    """A file name; ``from_mapping`` resolves it against the config file's folder."""
    value = _str(value)
    return os.path.expanduser(value) if value else ""


def _hostname(value: Any) -> str:
    value = _str(value).strip().rstrip(".").lower()
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*", value):
        raise ValueError(f"{value!r} is not a host name")
    return value


def _domains(value: Any) -> tuple[str, ...]:
    from mailstack.address import AddressError, normalize_domain

    if not isinstance(value, list):
        raise ValueError("must be a list of domain names")
    out = []
    for v in value:
        try:
            out.append(normalize_domain(_str(v)))
        except AddressError as e:
            raise ValueError(str(e)) from None
    return tuple(dict.fromkeys(out))


def _hostport(value: Any) -> str:
    value = _str(value)
    if value and not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}", value):
        raise ValueError(f'{value!r} is not "host:port"')
    return value


def _nameservers(value: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list):
        raise ValueError('must be a list of "ip" or "ip:port" strings')
    out = []
    for v in value:
        v = _str(v)
        host, _, port = v.rpartition(":") if v.count(":") == 1 else (v, "", "53")
        if not host:
            host, port = v, "53"
        if not port.isdigit():
            raise ValueError(f"{v!r} is not ip:port")
        out.append((host, int(port)))
    return tuple(out)


def _listeners(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError('must be a list of endpoint strings such as "tcp:25"')
    out = []
    for v in value:
        v = _str(v)
        validate_endpoint(v)
        out.append(v)
    return tuple(out)


def _check_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, str) and re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", v) for v in value
    ):
        raise ValueError('must be a list of check names such as ["loop"]')
    if len(set(value)) != len(value):
        raise ValueError("names a check twice")
    return tuple(value)


def _processes(value: Any) -> int:
    """``"auto"`` (0: one session process per core) or a count; 1 is one process for everything."""
    if value == "auto":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError('must be "auto" or a number of processes from 1 to 64')
    return value


def _log_format(value: Any) -> str:
    if value not in ("text", "json"):
        raise ValueError('must be "text" or "json"')
    return str(value)


def _tables(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError("must hold one table per check: [pipeline.options.<name>]")
    return {name: dict(v) for name, v in value.items()}


def _dnsbl_zones(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and _ZONE.fullmatch(v.strip(".")) for v in value):
        raise ValueError('must be a list of DNS block list zones such as ["zen.spamhaus.org"]')
    return tuple(dict.fromkeys(v.strip(".").lower() for v in value))


_ZONE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+")


def _http_url(value: Any) -> str:
    value = _str(value)
    if value and not re.fullmatch(r"https?://[^/\s]+/?", value):
        raise ValueError(f'{value!r} is not a URL such as "http://127.0.0.1:11333"')
    return value


def _failure_mode(value: Any) -> str:
    if value not in ("tempfail", "accept"):
        raise ValueError('must be "tempfail" or "accept"')
    return str(value)


def validate_endpoint(description: str) -> None:
    """Parse a server endpoint string without listening; ValueError if bad.

    ``ssl:`` strings that name no certificate use ``[tls]``'s, so they are checked
    as the equivalent ``tcp:`` string.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    kind, _, rest = description.partition(":")
    if kind == "ssl" and "privateKey=" not in rest and "certKey=" not in rest:
        description = "tcp:" + rest
    try:
        serverFromString(MemoryReactor(), description)
    except Exception as e:  # the parser raises several kinds
        raise ValueError(f"{description!r} is not a valid endpoint: {e}") from None


# -- declarations -----------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One config key: where it lives, how its TOML value is checked, its default and doc."""

    section: str  # "" for top level
    name: str
    parse: Callable[[Any], object]  # TOML value -> the field's value; ValueError if bad
    default: object  # raw TOML value, parsed like a configured one
    doc: str

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name

    @property
    def is_path(self) -> bool:
        """Relative values are resolved against the folder of the config file."""
        return self.parse is _path


_LOOP = "interface=127.0.0.1"

KEYS: tuple[Key, ...] = (
    Key("", "hostname", _hostname, "localhost", "HELO/EHLO name, Received headers, bounce sender"),
    Key("", "data_dir", _path, "mailstack-data", "queue, maildirs, users, aliases"),
    Key("domains", "local", _domains, ["localhost"], "domains whose mail is delivered here"),
    Key("listen", "smtp", _listeners, [f"tcp:2525:{_LOOP}"], "MX listeners; relays only for authenticated users"),
    Key("listen", "submission", _listeners, [f"tcp:5870:{_LOOP}"], "submission listeners: STARTTLS, AUTH before MAIL"),
    Key("listen", "submissions", _listeners, [f"ssl:4650:{_LOOP}"], "implicit-TLS submission listeners (RFC 8314)"),
    Key("listen", "pop3", _listeners, [f"tcp:1100:{_LOOP}"], "POP3 listeners, STLS offered"),
    Key("listen", "pop3s", _listeners, [f"ssl:9950:{_LOOP}"], "implicit-TLS POP3 listeners"),
    Key(
        "listen",
        "metrics",
        _listeners,
        [],
        'Prometheus metrics over HTTP at /metrics, e.g. ["tcp:9125:interface=127.0.0.1"]',
    ),
    Key("tls", "certificate", _path, "", "PEM certificate (chain allowed); empty: self-signed in data_dir"),
    Key("tls", "private_key", _path, "", "PEM private key; empty: the certificate file, or self-signed"),
    Key("smtp", "max_message_size", _int, 26214400, "bytes; advertised in EHLO SIZE"),
    Key("smtp", "max_recipients", _int, 100, "recipients per message"),
    Key("smtp", "max_line_length", _int, 4096, "bytes per command line (RFC 5321 4.5.3.1.4 minimum 512)"),
    Key("smtp", "max_connections", _int, 500, "simultaneous connections on the MX (smtp) listeners"),
    Key("smtp", "max_connections_per_ip", _int, 50, "simultaneous MX connections per client IP"),
    Key("smtp", "max_errors", _int, 10, "protocol errors before a session is dropped with 421"),
    Key("smtp", "command_timeout", _duration, "5m", "idle time allowed between commands (RFC 5321 4.5.3.2.7)"),
    Key("smtp", "data_timeout", _duration, "10m", "idle time allowed inside DATA (RFC 5321 4.5.3.2.6)"),
    Key("smtp", "data_total_timeout", _duration, "10m", "total time one DATA may take, however busy the client"),
    Key(
        "smtp",
        "forbid_unauth_pipelining",
        _bool,
        True,
        "drop an unauthenticated client that sends on before the 354 after DATA",
    ),
    Key("smtp", "shutdown_grace", _duration, "10s", "on SIGTERM, how long transactions in flight may finish"),
    Key("auth", "plaintext_on_loopback", _bool, False, "allow AUTH and USER/PASS without TLS from 127.0.0.0/8 and ::1"),
    Key("auth", "failure_delay", _duration, "1s", "delay after a failed login; doubles per failure from one peer"),
    Key("auth", "max_failure_delay", _duration, "15s", "ceiling of that delay"),
    Key(
        "auth",
        "lockout_failures",
        _int,
        10,
        "failed logins per address or (address, account) before a lockout; 0: never",
    ),
    Key("auth", "lockout_time", _duration, "5m", "how long such a lockout lasts"),
    Key("auth", "cache_ttl", _duration, "5m", "how long a verified login is remembered (as a keyed hash); 0s: never"),
    Key("pop3", "idle_timeout", _duration, "10m", "autologout timer (RFC 1939 section 3)"),
    Key("pop3", "max_connections", _int, 500, "simultaneous POP3 connections"),
    Key("pop3", "max_connections_per_ip", _int, 10, "simultaneous POP3 connections per client IP"),
    Key("pop3", "login_timeout", _duration, "60s", "time allowed to log in before the connection is closed"),
    Key("relay", "port", _port, 25, "TCP port of remote MX hosts"),
    Key("relay", "nameservers", _nameservers, [], '["127.0.0.1:5353"]; empty: the system resolver'),
    Key("relay", "smarthost", _hostport, "", '"host:port": send all outbound mail through it'),
    Key("relay", "smarthost_user", _str, "", "AUTH at the smarthost (only over STARTTLS verified for its name)"),
    Key("relay", "smarthost_password_file", _path, "", "file holding that password"),
    Key("relay", "source_address", _str, "", "local IP that outbound connections bind to"),
    Key("relay", "retry_intervals", _durations, ["1m", "5m", "15m", "30m", "1h", "2h", "4h"], "the last one repeats"),
    Key("relay", "max_queue_lifetime", _duration, "5d", "then the message bounces"),
    Key("relay", "delay_warning_after", _optional_duration, "4h", '"": no warning'),
    Key("relay", "connect_timeout", _duration, "30s", "TCP connect timeout per MX host"),
    Key("relay", "command_timeout", _duration, "5m", "per SMTP command at the remote (RFC 5321 4.5.3.2)"),
    Key("relay", "max_connections", _int, 100, "simultaneous outbound connections"),
    Key("relay", "max_per_domain", _int, 20, "simultaneous outbound connections per destination domain"),
    Key(
        "relay",
        "tls_verify",
        _bool,
        False,
        "require STARTTLS with a verified certificate (false: opportunistic TLS, RFC 7435)",
    ),
    Key("relay", "tls_ca_file", _path, "", "PEM file of extra trusted CAs for verified outbound TLS and MTA-STS"),
    Key("relay", "mta_sts", _bool, True, "honour MTA-STS policies of recipient domains (RFC 8461)"),
    Key("relay", "max_mx_hosts", _int, 5, "MX hosts tried per delivery attempt"),
    Key(
        "relay",
        "allow_private_literals",
        _bool,
        False,
        "accept recipients like user@[10.0.0.1] (private, loopback, link-local)",
    ),
    Key("limits", "messages_per_hour", _int, 100, "per authenticated sender; 0: no limit"),
    Key("limits", "messages_per_day", _int, 1000, "per authenticated sender, last 24 hours; 0: no limit"),
    Key(
        "pipeline",
        "checks",
        _check_names,
        ["loop", "dkimsign"],
        "message checks run in this order; built-in: loop, dkimsign; more from plugins",
    ),
    Key("pipeline", "options", _tables, {}, "per-check options, one table each: [pipeline.options.<name>]"),
    Key("pipeline", "timeout", _duration, "1m", "a check that takes longer is answered 451 4.3.0"),
    Key("dns", "nameservers", _nameservers, [], "every lookup; empty: relay.nameservers, else the system resolver"),
    Key("inbound", "spf", _bool, True, "RFC 7208 on MAIL FROM (HELO for <>); feeds DMARC, never rejects alone"),
    Key("inbound", "dkim", _bool, True, "RFC 6376 verification of every DKIM-Signature"),
    Key("inbound", "dmarc", _bool, True, "RFC 7489: p=reject failing -> 550 5.7.1, p=quarantine -> X-Spam: yes"),
    Key(
        "inbound",
        "dnsbl",
        _dnsbl_zones,
        [],
        'block lists asked at connect, e.g. ["zen.spamhaus.org"]; listed: 554 5.7.1',
    ),
    Key(
        "inbound",
        "greylist",
        _optional_duration,
        "",
        '"5m": unknown (client net, sender, recipient) gets 451 4.7.1; "": off',
    ),
    Key("inbound", "rspamd", _http_url, "", '"http://127.0.0.1:11333": ask rspamd after DATA; "": off'),
    Key(
        "inbound", "rspamd_failure", _failure_mode, "tempfail", 'rspamd unreachable: "tempfail" (451 4.7.1) or "accept"'
    ),
    Key("inbound", "max_messages_per_minute", _int, 0, "per client IP on the MX listener (451 4.7.1); 0: no limit"),
    Key(
        "submission",
        "max_connections",
        _int,
        100,
        "simultaneous connections on the submission and submissions listeners",
    ),
    Key("submission", "max_connections_per_ip", _int, 20, "simultaneous submission connections per client IP"),
    Key("log", "format", _log_format, "text", '"json": one JSON object per line (JSON Lines)'),
    Key("dovecot", "passwd_file", _path, "", "Dovecot passwd-file kept in step with the users; empty: none"),
    Key(
        "server",
        "processes",
        _processes,
        "auto",
        '"auto": one session process per core, plus the master; 1: one process',
    ),
)


# -- the value objects ------------------------------------------------------
# One frozen dataclass per section, its fields in KEYS order and typed as the
# parser's return type (tests/test_config.py checks both against KEYS).


@dataclass(frozen=True)
class DomainsSection:
    local: tuple[str, ...]


@dataclass(frozen=True)
class ListenSection:
    smtp: tuple[str, ...]
    submission: tuple[str, ...]
    submissions: tuple[str, ...]
    pop3: tuple[str, ...]
    pop3s: tuple[str, ...]
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class TLSSection:
    certificate: str
    private_key: str


@dataclass(frozen=True)
class SMTPSection:
    max_message_size: int
    max_recipients: int
    max_line_length: int
    max_connections: int
    max_connections_per_ip: int
    max_errors: int
    command_timeout: float
    data_timeout: float
    data_total_timeout: float
    forbid_unauth_pipelining: bool
    shutdown_grace: float


@dataclass(frozen=True)
class AuthSection:
    plaintext_on_loopback: bool
    failure_delay: float
    max_failure_delay: float
    lockout_failures: int
    lockout_time: float
    cache_ttl: float


@dataclass(frozen=True)
class POP3Section:
    idle_timeout: float
    max_connections: int
    max_connections_per_ip: int
    login_timeout: float


@dataclass(frozen=True)
class RelaySection:
    port: int
    nameservers: tuple[tuple[str, int], ...]
    smarthost: str
    smarthost_user: str
    smarthost_password_file: str
    source_address: str
    retry_intervals: tuple[float, ...]
    max_queue_lifetime: float
    delay_warning_after: float | None
    connect_timeout: float
    command_timeout: float
    max_connections: int
    max_per_domain: int
    tls_verify: bool
    tls_ca_file: str
    mta_sts: bool
    max_mx_hosts: int
    allow_private_literals: bool


@dataclass(frozen=True)
class LimitsSection:
    messages_per_hour: int
    messages_per_day: int


@dataclass(frozen=True)
class PipelineSection:
    checks: tuple[str, ...]
    options: dict[str, dict[str, Any]]
    timeout: float


@dataclass(frozen=True)
class DNSSection:
    nameservers: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class InboundSection:
    spf: bool
    dkim: bool
    dmarc: bool
    dnsbl: tuple[str, ...]
    greylist: float | None
    rspamd: str
    rspamd_failure: str
    max_messages_per_minute: int


@dataclass(frozen=True)
class SubmissionSection:
    max_connections: int
    max_connections_per_ip: int


@dataclass(frozen=True)
class LogSection:
    format: str


@dataclass(frozen=True)
class DovecotSection:
    passwd_file: str


@dataclass(frozen=True)
class ServerSection:
    processes: int  # 0: "auto"


@dataclass(frozen=True)
class Config:
    """The whole configuration.  Sections are attributes: ``config.relay.port``."""

    hostname: str
    data_dir: str
    domains: DomainsSection
    listen: ListenSection
    tls: TLSSection
    smtp: SMTPSection
    auth: AuthSection
    pop3: POP3Section
    relay: RelaySection
    limits: LimitsSection
    pipeline: PipelineSection
    dns: DNSSection
    inbound: InboundSection
    submission: SubmissionSection
    log: LogSection
    dovecot: DovecotSection
    server: ServerSection
    source: str = field(default="", compare=False)  # the file it came from, or ""

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.domains.local


SECTIONS = tuple(dict.fromkeys(k.section for k in KEYS if k.section))


def _section_classes() -> dict[str, type]:
    """Section name -> its dataclass, read from Config's annotations.

    Fails at import, naming what is missing, if KEYS and the dataclasses
    disagree (a key added to one and not the other).
    """
    hints = get_type_hints(Config)
    classes: dict[str, type] = {}
    for section in SECTIONS:
        if section not in hints:
            raise TypeError(f"config: [{section}] is in KEYS but Config has no field {section!r}")
        classes[section] = hints[section]
        declared = [k.name for k in KEYS if k.section == section]
        fields = [f.name for f in dataclasses.fields(classes[section])]
        if fields != declared:
            raise TypeError(f"config: {classes[section].__name__} fields {fields} != KEYS [{section}] {declared}")
    return classes


SECTION_CLASSES = _section_classes()


def load(path: str | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """Load ``path`` (or ``$MAILSTACK_CONFIG``, or nothing: embedded defaults)."""
    path = path or environ.get(ENV_VAR) or None
    if path is None:
        return from_mapping({}, source="", base=os.getcwd())
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    cfg = from_mapping(raw, source=path, base=os.path.dirname(os.path.abspath(path)))
    # The protocol floors (limits.MINIMUMS) are checked here, where a server
    # starts, so that tests may still build tiny limits with from_mapping.
    problems = check_minimums(cfg)  # 0 is no longer "unlimited": it is below the floor
    if problems:
        raise ConfigError(f"{path}: {problems[0]}")
    return cfg


def from_mapping(raw: Mapping[str, Any], source: str = "", base: str = ".") -> Config:
    """Validate a parsed TOML document; ConfigError names the first bad key."""
    where = source or "<defaults>"
    known = {k.dotted: k for k in KEYS}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name}: must be a table [{name}]")
            for sub, v in value.items():
                if f"{name}.{sub}" not in known:
                    raise ConfigError(f"{where}: {name}.{sub}: unknown key")
                values[f"{name}.{sub}"] = v
        elif name in known:
            values[name] = value
        else:
            raise ConfigError(f"{where}: {name}: unknown key")
    parsed: dict[str, Any] = {}
    for key in KEYS:
        raw_value = values.get(key.dotted, key.default)
        try:
            value = key.parse(raw_value)
        except ValueError as e:
            raise ConfigError(f"{where}: {key.dotted}: {e}") from None
        if key.is_path and isinstance(value, str) and value:
            value = os.path.normpath(os.path.join(base, value))
        parsed[key.dotted] = value
    top = {k.name: parsed[k.dotted] for k in KEYS if not k.section}
    sections = {s: SECTION_CLASSES[s](**{k.name: parsed[k.dotted] for k in KEYS if k.section == s}) for s in SECTIONS}
    tls = sections["tls"]
    assert isinstance(tls, TLSSection)
    if tls.certificate and not tls.private_key:
        sections["tls"] = replace(tls, private_key=tls.certificate)
    if tls.private_key and not tls.certificate:
        raise ConfigError(f"{where}: tls.certificate: required when tls.private_key is set")
    return Config(source=source, **top, **sections)
