# -*- test-case-name: tests.smtp.test_smtp_directsend -*-
"""Replies straight to the socket when nothing is queued ahead of them.

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
