# -*- test-case-name: tests.test_sdnotify -*-
"""systemd's readiness protocol (``sd_notify(3)``) without a dependency.

With ``Type=notify`` systemd sets ``$NOTIFY_SOCKET`` to an ``AF_UNIX`` datagram
socket and waits for ``READY=1`` before it considers the unit started (so
``systemctl start`` returns, and units ordered after it start, only once every
listener is up).  ``STOPPING=1`` says a graceful stop has begun; ``STATUS=...``
is the free text ``systemctl status`` shows.  A name starting with ``@`` is in
the abstract namespace (the ``@`` stands for a leading NUL byte).

Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) every call is
a no-op, as is a send that fails: readiness is advice to the supervisor, never
a reason to stop serving mail.  One datagram to a local socket does not block
in practice, so this is called from the reactor thread.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

READY = "READY=1"
STOPPING = "STOPPING=1"


def status(text: str) -> str:
    """A ``STATUS=`` line; newlines would start new assignments, so they become spaces."""
    return "STATUS=" + " ".join(text.splitlines())


def socket_address(environ: Mapping[str, str] | None = None) -> str | bytes | None:
    """The address to send to, from ``$NOTIFY_SOCKET``; None when unset or unusable."""
    name = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # unset, or a vsock address (not used for services on the host)


def notify(*states: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``states`` (e.g. ``READY``, ``status("...")``) as one datagram.

    Returns whether it was sent: False when not under systemd or when the
    socket is gone.
    """
    address = socket_address(environ)
    if address is None or not states:
        return False
    message = "\n".join(states).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError:
        return False
    return True
