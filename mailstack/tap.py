# -*- test-case-name: tests.test_service -*-
"""``twistd mailstack``: command-line options and the service maker.

The only module that imports the global reactor.  Options:
``--config FILE`` (default ``$MAILSTACK_CONFIG``, else the embedded defaults).

Everything that can fail because of the operator's setup (the config file,
``data_dir``, the certificate, the user and alias files) is checked in
``Options.postOptions``, before the reactor runs.  A failure prints one line
(``mailstack: etc/x.toml: relay.port: must be ...``) to stderr and exits 1, with
no traceback and no usage text (twistd would print its whole usage text in
front of a ``UsageError``'s line).

Run as root with ``--uid``/``--gid``, the start-up file work (``data_dir``, the
self-signed certificate, the files read at start) is done as that account
(``privileges.as_account``), so the server can still write them after twistd
drops privileges.  ``log.format = "json"`` makes twistd log JSON Lines where it
would have written its text log, ``"text"`` twistd's text format; both are
written once per reactor turn (``jsonlog.for_twistd``, ``logbatch``).

SIGTERM (``systemctl stop``) is a normal, graceful stop: the handler installed
here stops the reactor without recording the signal, so twistd exits 0 after
the service tree has drained (``service.MailService.stopService``).  twistd's own
handler would make the process die by the signal (status 143 in systemd).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import signal
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from mailstack import config as configmod
from mailstack import jsonlog, privileges
from mailstack.service import StartupError, load_parts, make_service

log = Logger()


class Options(usage.Options):
    """``twistd mailstack [--config FILE]``."""

    synopsis = "[--config FILE]"
    longdesc = (
        "Run the mailstack mail server: ESMTP (MX, submission, submissions), the "
        "outbound queue and POP3, on the listeners of the config file. "
        "Without --config, $MAILSTACK_CONFIG is read, else embedded defaults "
        "(loopback listeners on ports 2525, 5870, 4650, 1100, 9950; data in ./mailstack-data)."
    )
    optParameters = [
        ["config", "c", None, "TOML config file (default: $MAILSTACK_CONFIG, else embedded defaults)"],
    ]

    def postOptions(self) -> None:
        # twistd's own options (``--uid``, ``--logfile``, ...); absent when the
        # plugin's options are parsed on their own (tests, ``mailstack check-config``).
        self.server_options: Any = getattr(self, "parent", None) or {}
        # Files made at start belong to the account twistd will switch to.
        self.account = privileges.target_account(self.server_options)
        try:
            self.config = configmod.load(self["config"])
            with privileges.as_account(self.account):
                self.parts = load_parts(self.config)
        except (configmod.ConfigError, StartupError) as e:
            # SystemExit with a string: one line on stderr, status 1, no traceback.
            raise SystemExit(f"mailstack: {e}") from None


def install_sigterm(reactor: Any) -> None:
    """Make SIGTERM stop the reactor without recording the signal, from now on.

    Installed at once (twistd starts the listeners before the reactor runs),
    and as the reactor's own ``sigTerm``, which is what the reactor installs
    when it starts: re-installing it after start-up left a window in which
    the reactor's handler recorded the signal and twistd then killed itself
    with it.
    """

    def handler(signum: int, frame: Any) -> None:
        log.info("SIGTERM: stopping gracefully")
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, handler)
    _replace_reactor_sigterm(reactor, handler)


def _replace_reactor_sigterm(reactor: Any, handler: Callable[[int, Any], None]) -> None:
    """Make ``handler`` the SIGTERM handler the reactor installs when it starts.

    ``sigTerm`` is the reactor method its signal set-up installs (not an
    interface); ``tests/test_service.py`` checks that Twisted still does so, and
    ``tests/test_twisted_internals.py`` that the method exists.  Without it,
    the handler is installed again once the reactor runs: correct from then on,
    with a short start-up window in which the reactor's own handler is active.
    """
    if callable(getattr(reactor, "sigTerm", None)):
        reactor.sigTerm = handler
    else:
        reactor.callWhenRunning(signal.signal, signal.SIGTERM, handler)


# glibc mallopt parameter: allocations at least this big are mmapped.
_M_MMAP_THRESHOLD = -3


def return_big_frees_to_the_os(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold so that large freed blocks go back to the OS.

    Each Argon2 check allocates its 19 MiB work area in the pool thread that runs
    it; glibc's default *dynamic* threshold then serves such blocks from that
    thread's arena and keeps them after free, so 32 pool threads settled the
    process at ~700 MB RSS (measured) after one burst of logins.  A fixed
    threshold keeps them mmapped and returned at once: RSS stays flat.
    Returns False where the C library has no ``mallopt`` (not glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def freeze_startup_heap() -> None:
    """Leave every object that exists now out of the cyclic collector's scans.

    Call once the server has started.  What start-up made (the imported
    modules of Twisted, cryptography, dkimpy and ours, the config, the
    listeners) lives as long as the process, yet each full collection walked
    all of it: 24-32 ms with every session of the process stalled, measured in
    a worker under load.  Frozen (``gc.freeze``), a full collection walks only
    what came later: under 1 ms.  Objects still die when their last reference
    goes; only a cycle made at start-up and dropped later is never reclaimed.
    """
    gc.freeze()


def makeService(options: Options) -> Any:
    from twisted.internet import reactor

    return_big_frees_to_the_os()
    reactor.callWhenRunning(freeze_startup_heap)  # after the service tree has started

    tls, users, aliases = options.parts
    try:
        # Creates no file (the stores make their folders when first used, as
        # the account), so it runs as root: it imports modules the account
        # may not be able to read.
        service = make_service(options.config, reactor, tls, users, aliases, options.account)
    except StartupError as e:
        raise SystemExit(f"mailstack: {e}") from None
    install_sigterm(reactor)
    workers = service.workers  # a master's: its workers' lines go into our log as they are
    lines_to = workers.write_lines_to if workers is not None else None
    return jsonlog.for_twistd(service, options.server_options, options.config.log.format, reactor, lines_to)
