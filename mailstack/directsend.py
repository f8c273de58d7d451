# -*- test-case-name: tests.smtp.test_smtp_directsend -*-
"""Replies straight to the socket when nothing is queued ahead of them, and
the next command read from it before the reactor looks (``receive``).

Why: ``FileDescriptor.write`` only buffers.  The bytes leave on the next
reactor turn, after one ``epoll_ctl`` to watch for writability and another to
stop.  A command/reply protocol whose client waits for each reply (SMTP
without PIPELINING, POP3) pays those two syscalls and a reactor turn for
every reply; the benchmark profiles showed them as a large share of the
reactor thread's CPU.  When the transport holds no unsent bytes, sending now
is what its ``doWrite`` would do next, in the same order.  Whatever the
kernel does not take, and every case this module does not know (TLS, test
transports, a connection being closed), goes through ``transport.write``,
so Twisted's buffering, back-pressure (a streaming producer is paused by it
as usual) and error reporting stay as they are.

``receive`` serves a client that waits for each reply (POP3 without
pipelining): by the time a reply is written and the work after it done, the
next command is usually there, and taking it at once saves the reactor turn
(``epoll_wait`` and Twisted's dispatch) that would deliver it.  It reads only
from a plain ``tcp.Server`` with no unsent output, as ``send`` writes, and
gives up on anything but bytes: "nothing yet" (EAGAIN), end of input and
errors are left to the transport's own read, which meets them next (the end
of input stays readable; an error read here leaves the end of input behind,
so the session ends as on a close).

The test of "nothing pending" reads private attributes of ``tcp.Server``; it
is all in ``_idle_socket``, which answers "not idle" (so: ``transport.write``)
if a Twisted release renames any of them, and
``tests/test_twisted_internals.py`` fails loudly when that happens.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp


def send(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, straight to the socket if nothing is pending."""
    sock = _idle_socket(transport)
    if sock is not None:
        try:
            sent = sock.send(data)
        except OSError:
            # EAGAIN, EINTR, or a dead peer: the transport meets the same
            # condition when it writes, and reports it its usual way.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def receive(transport: Any, size: int) -> bytes:
    """Up to ``size`` bytes waiting on the socket now; b"" if none, or if the
    transport is not one this module reads (see the module docstring)."""
    sock = _idle_socket(transport)
    if sock is None:
        return b""
    try:
        return sock.recv(size)
    except OSError:  # EAGAIN: nothing yet; anything else: the transport's read reports it
        return b""


def _idle_socket(transport: Any) -> socket.socket | None:
    """The socket of a plain ``tcp.Server`` with no unsent output, else None.

    Its unsent output lives in ``dataBuffer`` and ``_tempDataLen``, both empty
    here, so nothing written earlier can be overtaken, and anything written
    later queues behind the remainder.  After ``startTLS`` (``transport.TLS``)
    bytes must go through the TLS layer; after ``loseConnection`` or
    ``loseWriteConnection`` the transport decides what still goes out.
    """
    if type(transport) is not tcp.Server:
        return None
    try:
        if (
            transport.TLS
            or not transport.connected
            or transport.disconnecting
            or transport._writeDisconnecting
            or transport.dataBuffer
            or transport._tempDataLen
        ):
            return None
        sock: socket.socket = transport.socket
    except AttributeError:  # a Twisted release without these internals: plain writes
        return None
    return sock
