# -*- test-case-name: tests.test_config -*-
"""Configuration: one TOML file loaded into frozen value objects.

Every key is declared once in ``KEYS`` below with its type, default and a one-line
doc; ``etc/mailstack.toml`` and README's config reference are checked against the
declarations by the tests.  Errors name the key and the file in one line
(``ConfigError``); nothing here ever raises a traceback at a user.

With no file, the embedded defaults apply: hostname ``localhost``, local domain
``localhost``, data in ``./mailstack-data`` and loopback listeners on high ports.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

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


def _duration(value: Any, base: str) -> float:
    return parse_duration(value)


def _optional_duration(value: Any, base: str) -> float | None:
    if value == "":
        return None
    return parse_duration(value)


def _durations(value: Any, base: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of durations")
    return tuple(parse_duration(v) for v in value)


def _str(value: Any, base: str) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _int(value: Any, base: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("must be a non-negative integer")
    return value


def _port(value: Any, base: str) -> int:
    value = _int(value, base)
    if not 0 < value < 65536:
        raise ValueError("must be a TCP port (1-65535)")
    return value


def _bool(value: Any, base: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _path(value: Any, base: str) -> str:
    value = _str(value, base)
    if value == "":
        return ""
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _hostname(value: Any, base: str) -> str:
    value = _str(value, base).strip().rstrip(".").lower()
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*", value):
        raise ValueError(f"{value!r} is not a host name")
    return value


def _domains(value: Any, base: str) -> tuple[str, ...]:
    from mailstack.address import AddressError, normalize_domain

    if not isinstance(value, list):
        raise ValueError("must be a list of domain names")
    out = []
    for v in value:
        try:
            out.append(normalize_domain(_str(v, base)))
        except AddressError as e:
            raise ValueError(str(e)) from None
    return tuple(dict.fromkeys(out))


def _hostport(value: Any, base: str) -> str:
    value = _str(value, base)
    if value and not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}", value):
        raise ValueError(f'{value!r} is not "host:port"')
    return value


def _nameservers(value: Any, base: str) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list):
        raise ValueError('must be a list of "ip" or "ip:port" strings')
    out = []
    for v in value:
        v = _str(v, base)
        host, _, port = v.rpartition(":") if v.count(":") == 1 else (v, "", "53")
        if not host:
            host, port = v, "53"
        if not port.isdigit():
            raise ValueError(f"{v!r} is not ip:port")
        out.append((host, int(port)))
    return tuple(out)


def _listeners(value: Any, base: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("must be a list of endpoint strings such as \"tcp:25\"")
    out = []
    for v in value:
        v = _str(v, base)
        validate_endpoint(v)
        out.append(v)
    return tuple(out)


def _check_names(value: Any, base: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", v) for v in value):
        raise ValueError('must be a list of check names such as ["loop"]')
    if len(set(value)) != len(value):
        raise ValueError("names a check twice")
    return tuple(value)


def _log_format(value: Any, base: str) -> str:
    if value not in ("text", "json"):
        raise ValueError('must be "text" or "json"')
    return str(value)


def _tables(value: Any, base: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError("must hold one table per check: [pipeline.options.<name>]")
    return {name: dict(v) for name, v in value.items()}


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
    section: str  # "" for top level
    name: str
    parse: Callable[[Any, str], Any]
    default: Any  # raw TOML value, parsed like a configured one
    doc: str

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name


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
    Key("listen", "metrics", _listeners, [], 'Prometheus metrics over HTTP at /metrics, e.g. ["tcp:9125:interface=127.0.0.1"]'),
    Key("tls", "certificate", _path, "", "PEM certificate (chain allowed); empty: self-signed in data_dir"),
    Key("tls", "private_key", _path, "", "PEM private key; empty: the certificate file, or self-signed"),
    Key("smtp", "max_message_size", _int, 26214400, "bytes; advertised in EHLO SIZE"),
    Key("smtp", "max_recipients", _int, 100, "recipients per message"),
    Key("smtp", "max_line_length", _int, 4096, "bytes per command line (RFC 5321 4.5.3.1.4 minimum 512)"),
    Key("smtp", "max_connections", _int, 500, "simultaneous SMTP connections over all listeners"),
    Key("smtp", "max_connections_per_ip", _int, 50, "simultaneous SMTP connections per client IP"),
    Key("smtp", "max_errors", _int, 10, "protocol errors before a session is dropped with 421"),
    Key("smtp", "command_timeout", _duration, "5m", "idle time allowed between commands (RFC 5321 4.5.3.2.7)"),
    Key("smtp", "data_timeout", _duration, "10m", "idle time allowed inside DATA (RFC 5321 4.5.3.2.6)"),
    Key("smtp", "shutdown_grace", _duration, "10s", "on SIGTERM, how long transactions in flight may finish"),
    Key("auth", "plaintext_on_loopback", _bool, False, "allow AUTH and USER/PASS without TLS from 127.0.0.0/8 and ::1"),
    Key("auth", "failure_delay", _duration, "1s", "delay after a failed login; doubles per failure from one peer"),
    Key("auth", "max_failure_delay", _duration, "15s", "ceiling of that delay"),
    Key("auth", "lockout_failures", _int, 10, "failed logins per peer or account before a lockout; 0: never"),
    Key("auth", "lockout_time", _duration, "5m", "how long such a lockout lasts"),
    Key("pop3", "idle_timeout", _duration, "10m", "autologout timer (RFC 1939 section 3)"),
    Key("pop3", "max_connections", _int, 500, "simultaneous POP3 connections"),
    Key("relay", "port", _port, 25, "TCP port of remote MX hosts"),
    Key("relay", "nameservers", _nameservers, [], '["127.0.0.1:5353"]; empty: the system resolver'),
    Key("relay", "smarthost", _hostport, "", '"host:port": send all outbound mail through it'),
    Key("relay", "smarthost_user", _str, "", "AUTH at the smarthost (STARTTLS required)"),
    Key("relay", "smarthost_password_file", _path, "", "file holding that password"),
    Key("relay", "source_address", _str, "", "local IP that outbound connections bind to"),
    Key("relay", "retry_intervals", _durations, ["1m", "5m", "15m", "30m", "1h", "2h", "4h"], "the last one repeats"),
    Key("relay", "max_queue_lifetime", _duration, "5d", "then the message bounces"),
    Key("relay", "delay_warning_after", _optional_duration, "4h", '"": no warning'),
    Key("relay", "connect_timeout", _duration, "30s", "TCP connect timeout per MX host"),
    Key("relay", "command_timeout", _duration, "5m", "per SMTP command at the remote (RFC 5321 4.5.3.2)"),
    Key("relay", "max_connections", _int, 100, "simultaneous outbound connections"),
    Key("relay", "max_per_domain", _int, 20, "simultaneous outbound connections per destination domain"),
    Key("relay", "tls_verify", _bool, False, "require STARTTLS with a verified certificate (false: opportunistic TLS, RFC 7435)"),
    Key("limits", "messages_per_hour", _int, 100, "per authenticated sender; 0: no limit"),
    Key("limits", "messages_per_day", _int, 1000, "per authenticated sender, last 24 hours; 0: no limit"),
    Key("pipeline", "checks", _check_names, ["loop"], "message checks run in this order; built-in: loop; more from plugins"),
    Key("pipeline", "options", _tables, {}, "per-check options, one table each: [pipeline.options.<name>]"),
    Key("pipeline", "timeout", _duration, "1m", "a check that takes longer is answered 451 4.3.0"),
    Key("log", "format", _log_format, "text", '"json": one JSON object per line (JSON Lines)'),
    Key("dovecot", "passwd_file", _path, "", "Dovecot passwd-file kept in step with the users; empty: none"),
)

SECTIONS = tuple(dict.fromkeys(k.section for k in KEYS if k.section))


# -- the value objects ------------------------------------------------------


def _section_class(section: str) -> type:
    names = [k.name for k in KEYS if k.section == section]
    return dataclass(frozen=True)(type(section.title(), (), {"__annotations__": {n: Any for n in names}}))


_CLASSES = {s: _section_class(s) for s in SECTIONS}


@dataclass(frozen=True)
class Config:
    """The whole configuration.  Sections are attributes: ``config.relay.port``."""

    hostname: str
    data_dir: str
    domains: Any
    listen: Any
    tls: Any
    smtp: Any
    auth: Any
    pop3: Any
    relay: Any
    limits: Any
    pipeline: Any
    log: Any
    dovecot: Any
    source: str = field(default="", compare=False)  # the file it came from, or ""

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.domains.local


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
    return from_mapping(raw, source=path, base=os.path.dirname(os.path.abspath(path)))


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
            parsed[key.dotted] = key.parse(raw_value, base)
        except ValueError as e:
            raise ConfigError(f"{where}: {key.dotted}: {e}") from None
    top = {k.name: parsed[k.dotted] for k in KEYS if not k.section}
    sections = {
        s: _CLASSES[s](**{k.name: parsed[k.dotted] for k in KEYS if k.section == s}) for s in SECTIONS
    }
    tls = sections["tls"]
    if tls.certificate and not tls.private_key:
        sections["tls"] = _CLASSES["tls"](certificate=tls.certificate, private_key=tls.certificate)
    if bool(tls.private_key) and not tls.certificate:
        raise ConfigError(f"{where}: tls.certificate: required when tls.private_key is set")
    return Config(source=source, **top, **sections)
