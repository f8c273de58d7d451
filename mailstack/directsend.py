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
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def send(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, straight to the socket if nothing is pending.

    Only a plain ``tcp.Server`` qualifies: its unsent output lives in
    ``dataBuffer`` and ``_tempDataLen``, both empty here, so nothing written
    earlier can be overtaken, and anything written later queues behind the
    remainder.  After ``startTLS`` (``transport.TLS``) bytes must go through
    the TLS layer; after ``loseConnection`` or ``loseWriteConnection`` the
    transport decides what still goes out.
    """
    if (
        type(transport) is tcp.Server
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport.dataBuffer
        and not transport._tempDataLen
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # EAGAIN, EINTR, or a dead peer: the transport meets the same
            # condition when it writes, and reports it its usual way.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
