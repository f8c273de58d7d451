# -*- test-case-name: tests.admin.test_cli -*-
"""``mailstack``: the admin command (users, aliases, config check, queue, DKIM keys).

Works whether or not the server runs: it edits the same files the server
reads (``auth/userdb.py``, ``auth/aliases.py``), under the same locks, and the
server notices the change on its next lookup.

Exit status (as README documents): 0 success; 1 a refused request, with one line on
stderr (unknown user, bad or unsafe address, user exists, bad config); 2 bad
usage (argparse).

The ``queue`` subcommands live in ``admin/queuecmd.py`` (the outbound queue's
owner).  Its ``add_parser(subparsers)`` adds the ``queue`` parser and sets
``func`` on each subcommand with ``set_defaults(func=handler)``; a handler is
called as ``handler(config, args)`` with the loaded ``config.Config`` and
returns the exit status, raising ``Refused(message)`` for a refused request.
``dkim`` and ``dns-records`` live in ``admin/dkimcmd.py`` the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from mailstack import config as configmod
from mailstack import dovecotpw, pipeline
from mailstack.address import AddressError, mailbox_components, parse_address
from mailstack.auth.aliases import AliasDB, NoSuchAlias
from mailstack.auth.jsonfile import FileFormatError
from mailstack.auth.userdb import NoSuchUser, UserDB, UserExists
from mailstack.logsafe import escape
from mailstack.sendlimits import LimitsFile, usage_report
from mailstack.storage import fsutil
from mailstack.storage.maildir import MaildirStore
from mailstack.tls import TLSError, load_options
from mailstack.trust import TrustError, trust_root

PROG = "mailstack"


_UNSET = object()  # an option not given (None means "default")


class Refused(Exception):
    """A request the command refuses: exit 1 with this one line on stderr."""


def user_key(config: configmod.Config, text: str) -> str:
    """The key of a would-be user: a valid, path-safe address in a local domain."""
    try:
        address = parse_address(text)
        mailbox_components(address)
    except AddressError as e:
        raise Refused(f"{text}: not a usable address: {e}") from None
    if not config.is_local_domain(address.domain):
        raise Refused(f"{text}: {address.domain} is not a local domain (domains.local)")
    return address.key


def address_key(text: str) -> str:
    try:
        key = parse_address(text).key
        # Keys are stored unquoted: one that does not read back (a quoted local
        # part such as "../x" or "a b") would break the file's readers later.
        parse_address(key)
    except AddressError as e:
        raise Refused(f"{text}: not a usable address: {e}") from None
    return key


def users_of(config: configmod.Config) -> UserDB:
    return UserDB(os.path.join(config.data_dir, "users.json"))


def aliases_of(config: configmod.Config) -> AliasDB:
    return AliasDB(os.path.join(config.data_dir, "aliases.json"))


def read_password(args: argparse.Namespace, stdin: TextIO) -> str:
    """One line from stdin with ``--password-stdin``, else two matching prompts."""
    if args.password_stdin:
        password = stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise Refused("passwords do not match")
    if not password:
        raise Refused("empty password")
    return password


# -- handlers: (config, args) -> exit status ------------------------------------


def user_add(config: configmod.Config, args: argparse.Namespace) -> int:
    key = user_key(config, args.address)
    users = users_of(config)
    if users.exists(key):  # before prompting; add() checks again under the lock
        raise Refused(f"{key}: user exists")
    try:
        users.add(key, read_password(args, args.stdin))
    except UserExists:
        raise Refused(f"{key}: user exists") from None
    print(f"added {key}", file=args.stdout)
    sync_dovecot(config, users)
    return 0


def user_passwd(config: configmod.Config, args: argparse.Namespace) -> int:
    key = address_key(args.address)
    users = users_of(config)
    if not users.exists(key):
        raise Refused(f"{key}: no such user")
    try:
        users.set_password(key, read_password(args, args.stdin))
    except NoSuchUser:
        raise Refused(f"{key}: no such user") from None
    print(f"password changed for {key}", file=args.stdout)
    sync_dovecot(config, users)
    return 0


def retire_maildir(mail_root: str, key: str, now: float) -> str | None:
    """Move the Maildir of ``key`` to ``.deleted/<domain>/<localpart>-<UTC time>/``.

    So an address created again later starts with an empty mailbox instead of
    the deleted user's mail, which stays on disk for the administrator.  One
    rename, durable once both parent directories are fsynced.  The new path,
    or None if the user never had a Maildir.  ``.deleted`` cannot be a domain
    (``address.mailbox_components`` refuses a leading dot).
    """
    source = MaildirStore(mail_root).path_for(key)
    if not os.path.isdir(source):
        return None
    parent, local = os.path.split(source)
    folder = os.path.join(os.path.dirname(parent), ".deleted", os.path.basename(parent))
    fsutil.ensure_dir(folder)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = os.path.join(folder, f"{local}-{stamp}")
    serial = 1
    while os.path.lexists(target):  # deleted twice within a second
        serial += 1
        target = os.path.join(folder, f"{local}-{stamp}-{serial}")
    os.rename(source, target)
    fsutil.fsync_dir(parent)
    fsutil.fsync_dir(folder)
    return target


def sync_dovecot(config: configmod.Config, users: UserDB) -> None:
    """Rewrite ``dovecot.passwd_file`` (if set) after a user change, so IMAP via
    Dovecot takes the same passwords at once (``dovecotpw``)."""
    path = config.dovecot.passwd_file
    if not path:
        return
    try:
        dovecotpw.sync(users, path)
    except OSError as e:
        # The user change itself is done; the next change rewrites the file.
        raise Refused(f"{path}: cannot write the Dovecot passwd-file: {e.strerror}") from None


def user_del(config: configmod.Config, args: argparse.Namespace) -> int:
    key = address_key(args.address)
    users = users_of(config)
    try:
        users.delete(key)
    except NoSuchUser:
        raise Refused(f"{key}: no such user") from None
    sync_dovecot(config, users)
    limits = LimitsFile(config.data_dir)
    if limits.override(key):  # a new user of that name starts with the defaults
        limits.set(key, per_hour=None, per_day=None)
    # After the user is gone, so the server accepts no new mail for it meanwhile.
    kept = retire_maildir(os.path.join(config.data_dir, "mail"), key, time.time())
    print(f"deleted {key}" + (f" (its Maildir was moved to {kept})" if kept else ""), file=args.stdout)
    return 0


def configured_limits(config: configmod.Config) -> tuple[int, int]:
    """``(limits.messages_per_hour, limits.messages_per_day)``; 0 is no limit."""
    return config.limits.messages_per_hour, config.limits.messages_per_day


def user_list(config: configmod.Config, args: argparse.Namespace) -> int:
    users = users_of(config)
    keys = users.keys()
    if args.json:
        usage = usage_report(config.data_dir, keys, *configured_limits(config), time.time())
        rows = [{"address": k, **users.info(k), **dataclasses.asdict(usage[k])} for k in keys]
        print(json.dumps(rows, indent=2), file=args.stdout)
    else:
        for k in keys:
            print(k, file=args.stdout)
    return 0


def limit_value(text: str) -> int | None:
    """``--per-hour``/``--per-day``: a count (0: no limit) or ``default`` (None)."""
    if text == "default":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a number of messages (0: no limit) or 'default'")
    return int(text)


def user_limit(config: configmod.Config, args: argparse.Namespace) -> int:
    """Override (or reset) one user's sending limits; with no option, show them."""
    key = address_key(args.address)
    if not users_of(config).exists(key):
        raise Refused(f"{key}: no such user")
    limits = LimitsFile(config.data_dir)
    given = {"per_hour": args.per_hour, "per_day": args.per_day}
    changes = {name: value for name, value in given.items() if value is not _UNSET}
    if changes:
        limits.set(key, **changes)
    override = limits.override(key)
    hourly, daily = limits.effective(key, *configured_limits(config))

    def shown(value: int, name: str) -> str:
        return f"{value or 'no limit'}{'' if name in override else ' (default)'}"

    print(f"{key}: per hour {shown(hourly, 'per_hour')}, per day {shown(daily, 'per_day')}", file=args.stdout)
    return 0


def alias_add(config: configmod.Config, args: argparse.Namespace) -> int:
    key = address_key(args.address)
    if not config.is_local_domain(key.rpartition("@")[2]):
        raise Refused(f"{args.address}: {key.rpartition('@')[2]} is not a local domain (domains.local)")
    targets = [address_key(t.strip()) for arg in args.targets for t in arg.split(",") if t.strip()]
    if not targets:
        raise Refused("no targets given")
    if key in targets:
        raise Refused(f"{key}: an alias cannot point to itself")
    aliases_of(config).add(key, targets)
    print(f"{key} -> {', '.join(aliases_of(config).targets(key) or [])}", file=args.stdout)
    return 0


def alias_del(config: configmod.Config, args: argparse.Namespace) -> int:
    key = address_key(args.address)
    try:
        aliases_of(config).delete(key)
    except NoSuchAlias:
        raise Refused(f"{key}: no such alias") from None
    print(f"deleted alias {key}", file=args.stdout)
    return 0


def alias_list(config: configmod.Config, args: argparse.Namespace) -> int:
    items = aliases_of(config).items()
    if args.json:
        print(json.dumps([{"address": k, "targets": v} for k, v in items], indent=2), file=args.stdout)
    else:
        for k, v in items:
            print(f"{k} -> {', '.join(v)}", file=args.stdout)
    return 0


def postmaster_warnings(config: configmod.Config, users: UserDB, aliases: AliasDB) -> list[str]:
    """One line per local domain whose postmaster is neither an alias nor a user.

    Its mail is then kept in that domain's ``postmaster`` Maildir (``routing.py``),
    which nobody may be reading; RFC 5321 section 4.5.1 wants it read.
    """
    return [
        f"warning: postmaster@{domain} is neither an alias nor a user; its mail is kept in "
        f"{os.path.join(config.data_dir, 'mail', domain, 'postmaster')}/ "
        f"(mailstack alias add postmaster@{domain} ADDRESS)"
        for domain in config.domains.local
        if aliases.targets(f"postmaster@{domain}") is None and not users.exists(f"postmaster@{domain}")
    ]


def check_config(config: configmod.Config, args: argparse.Namespace) -> int:
    """The config already loaded; also check a configured certificate loads.

    Warnings (exit status still 0) for anything that works but needs attention.
    """
    if config.tls.certificate:
        try:
            load_options(config.tls.certificate, config.tls.private_key)
        except TLSError as e:
            raise Refused(str(e)) from None
    secret = config.relay.smarthost_password_file
    if secret and not os.access(secret, os.R_OK):
        raise Refused(f"{secret}: relay.smarthost_password_file cannot be read")
    try:
        trust_root(config.relay.tls_ca_file)
    except TrustError as e:
        raise Refused(f"relay.tls_ca_file: {e}") from None
    try:
        pipeline.configured(config.pipeline)
    except pipeline.PipelineError as e:
        raise Refused(f"{config.source or '<embedded defaults>'}: {e}") from None
    for line in postmaster_warnings(config, users_of(config), aliases_of(config)):
        print(line, file=args.stdout)
    print(f"{config.source or '<embedded defaults>'}: ok", file=args.stdout)
    return 0


# -- parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Administer a mailstack mail server.")
    parser.add_argument(
        "--config", metavar="FILE", help=f"TOML config file (default: ${configmod.ENV_VAR}, else embedded defaults)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    user = commands.add_parser("user", help="add, change, delete and list users").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = user.add_parser("add", help="add a user (prompts twice for the password)")
    p.add_argument("address")
    p.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    p.set_defaults(func=user_add)
    p = user.add_parser("passwd", help="change a user's password")
    p.add_argument("address")
    p.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    p.set_defaults(func=user_passwd)
    p = user.add_parser("del", help="delete a user (the Maildir is moved to mail/.deleted/)")
    p.add_argument("address")
    p.set_defaults(func=user_del)
    p = user.add_parser("limit", help="override a user's sending limits ('default' resets)")
    p.add_argument("address")
    for flag in ("--per-hour", "--per-day"):
        p.add_argument(flag, type=limit_value, default=_UNSET, metavar="N|default", help="messages (0: no limit)")
    p.set_defaults(func=user_limit)
    p = user.add_parser("list", help="list users")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=user_list)

    alias = commands.add_parser("alias", help="add, delete and list aliases").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = alias.add_parser("add", help="add targets to an alias (created if new)")
    p.add_argument("address")
    p.add_argument("targets", nargs="+", metavar="TARGET[,TARGET...]")
    p.set_defaults(func=alias_add)
    p = alias.add_parser("del", help="delete an alias")
    p.add_argument("address")
    p.set_defaults(func=alias_del)
    p = alias.add_parser("list", help="list aliases")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=alias_list)

    p = commands.add_parser("check-config", help="load the config (and certificate) and report problems")
    p.set_defaults(func=check_config)

    # Imported here: queuecmd imports Refused from this module.
    from mailstack.admin import queuecmd

    queuecmd.add_parser(commands)

    # dkim keygen|list|retire and dns-records (imports Refused too).
    from mailstack.admin import dkimcmd

    dkimcmd.add_parser(commands)
    return parser


def main(
    argv: Sequence[str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    environ: dict[str, str] | None = None,
) -> int:
    """Run the command; returns the exit status (argparse exits 2 on bad usage)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = build_parser().parse_args(argv)
    args.stdin, args.stdout = stdin, stdout
    handler: Callable[[Any, Any], int] = args.func
    try:
        config = configmod.load(args.config, environ if environ is not None else os.environ)
        return handler(config, args)
    except (Refused, configmod.ConfigError, FileFormatError) as e:
        # One line, whatever the user typed: control characters (a newline, a
        # terminal escape) in an argument are shown escaped.
        print(f"{PROG}: {escape(str(e))}", file=stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: {where}{e.strerror or e}", file=stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=stderr)
        return 1
