"""Tests for mailstack.sdnotify against real AF_UNIX datagram sockets."""

import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from mailstack import sdnotify


class NotifyTests(SynchronousTestCase):
    def bind(self, address):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(address)
        sock.settimeout(5)
        return sock

    def test_readyToPathSocket(self):
        """READY=1 arrives as one datagram on the socket named by NOTIFY_SOCKET."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "notify")
        sock = self.bind(path)
        self.assertTrue(sdnotify.notify(sdnotify.READY, environ={"NOTIFY_SOCKET": path}))
        self.assertEqual(sock.recv(4096), b"READY=1")

    def test_abstractNamespace(self):
        """A leading @ names a socket in the abstract namespace."""
        name = f"mailstack-test-{os.getpid()}-{id(self)}"
        sock = self.bind(b"\0" + name.encode())
        sent = sdnotify.notify(sdnotify.STOPPING, sdnotify.status("draining"), environ={"NOTIFY_SOCKET": "@" + name})
        self.assertTrue(sent)
        self.assertEqual(sock.recv(4096), b"STOPPING=1\nSTATUS=draining")

    def test_statusIsOneLine(self):
        """A multi-line status text cannot smuggle another assignment in."""
        self.assertEqual(sdnotify.status("a\nREADY=1"), "STATUS=a READY=1")

    def test_unsetIsNoOp(self):
        """Without NOTIFY_SOCKET nothing is sent and nothing fails."""
        self.assertFalse(sdnotify.notify(sdnotify.READY, environ={}))
        self.assertFalse(sdnotify.notify(sdnotify.READY, environ={"NOTIFY_SOCKET": "vsock:2:1"}))

    def test_missingSocketIsNoOp(self):
        """A socket that went away makes notify return False, not raise."""
        path = os.path.join(os.path.abspath(self.mktemp()), "gone")
        self.assertFalse(sdnotify.notify(sdnotify.READY, environ={"NOTIFY_SOCKET": path}))
