# -*- test-case-name: tests.test_privileges -*-
"""Start-up file work as the account twistd will switch to (``twistd --uid``).

twistd runs, in this order (``twisted/scripts/twistd.py`` and
``_twistd_unix.py``, Twisted 26.10):

1. option parsing: the plugin's ``Options.postOptions`` (mailstack: load the
   config, create ``data_dir``, generate the self-signed certificate, read
   the user, alias and limit files);
2. ``makeService`` (mailstack: build the service tree);
3. the log observer (``--logfile`` is opened or created);
4. ``setupEnvironment``: chroot, chdir, umask, daemonize, the pid file;
5. ``privilegedStartService``: the listeners bind (ports below 1024);
6. ``shedPrivileges``: ``setgid``, ``initgroups``, ``setuid`` to
   ``--uid``/``--gid`` (the gid defaults to the account's primary group);
7. ``startService``: thread pool, queue manager, deliveries.

Steps 1 to 4 run as root when twistd is started as root, so without care
``data_dir``, ``data_dir/tls/selfsigned.key`` and anything else made at start
would belong to root, and the server, once it is the target account, could
not write its queue or Maildirs.  ``as_account`` runs that work with the
target's effective uid, gid and groups and switches back to root afterwards
(the real uid stays 0, so twistd can still bind and then drop for good):
files are created owned by the account, and a file it could not read later
(a root-only private key) fails the start with one line instead of the first
certificate renewal.

The log file (step 3) and the pid file (step 4) are twistd's: give them a
folder the account owns, or use ``--logfile=-`` and ``--pidfile=`` under
systemd, which runs the server as its account in the first place
(``User=mailstack`` with ``AmbientCapabilities=CAP_NET_BIND_SERVICE``,
``etc/mailstack.service``), the recommended set-up.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any


def target_account(server_options: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(uid, gid)`` twistd will switch to, or None when it will not switch.

    ``server_options`` is twistd's own options (the plugin's
    ``Options.parent``), whose ``uid``/``gid`` twistd has already turned into
    numbers; the gid defaults to the uid's primary group, as twistd does.
    """
    uid, gid = server_options.get("uid"), server_options.get("gid")
    if uid is None or os.geteuid() != 0 or uid == 0:
        return None
    if gid is None:
        gid = pwd.getpwuid(uid).pw_gid
    return uid, gid


@contextmanager
def as_account(account: tuple[int, int] | None) -> Iterator[None]:
    """Run the block with ``account``'s effective ids (no-op for None).

    Only for the single-threaded start-up: effective ids are per process.
    """
    if account is None:
        yield
        return
    uid, gid = account
    groups = os.getgroups()
    try:
        name = pwd.getpwuid(uid).pw_name
        os.setgroups(os.getgrouplist(name, gid))
    except KeyError:  # a numeric uid with no passwd entry: its gid only
        os.setgroups([gid])
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)
