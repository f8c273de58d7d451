# -*- test-case-name: tests.procs.test_slots -*-
"""The AMP commands between the master process and a session worker.

Worker -> master: connection slots (``AcquireSlot``/``ReleaseSlot``, the caps
of ``connlimit`` kept in one place for every worker), ``Kick`` (a message was
queued: deliver it now, as ``IQueueKicker.kick`` in one process), ``Ready``
(the worker listens).  Master -> worker: ``Exposition`` (its metrics, for a
scrape of the master's ``/metrics``).  The master stops a worker with
SIGTERM, the same graceful stop as a single process.
"""

from __future__ import annotations

from twisted.protocols import amp


class AcquireSlot(amp.Command):
    """Take a session slot of ``kind`` (smtp, submission, pop3) for ``host``."""

    arguments = [(b"kind", amp.Unicode()), (b"host", amp.Unicode())]
    response = [(b"over", amp.Unicode())]  # "": granted; else connlimit.TOTAL / PER_IP


class ReleaseSlot(amp.Command):
    """Give back a slot that ``AcquireSlot`` granted."""

    arguments = [(b"kind", amp.Unicode()), (b"host", amp.Unicode())]
    requiresAnswer = False


class Kick(amp.Command):
    """A queue entry was committed: the master's queue manager looks at it now."""

    arguments = [(b"queue_id", amp.Unicode())]
    requiresAnswer = False


class Ready(amp.Command):
    """The worker has adopted its listening sockets and accepts connections."""

    arguments = []
    response = []


class Exposition(amp.Command):
    """The worker's metrics in the Prometheus text format (empty without ``listen.metrics``)."""

    arguments = []
    response = [(b"text", amp.String())]
