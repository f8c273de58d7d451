# -*- test-case-name: tests.procs.test_slots -*-
"""The AMP commands between the master process and a session worker.

Worker -> master: connection slots (``AcquireSlot``/``ReleaseSlot``, the caps
of ``connlimit`` kept in one place for every worker, lent in small batches:
``procs.slots``), ``Kick`` (a message was queued: deliver it now, as
``IQueueKicker.kick`` in one process), ``Ready`` (the worker listens).
Master -> worker: ``ReturnSpares`` (a cap is reached: give back the lent slots
not in use), ``Exposition`` (its metrics, for a scrape of the master's
``/metrics``).  The master stops a worker with
SIGTERM, the same graceful stop as a single process.
"""

from __future__ import annotations

from twisted.protocols import amp


class AcquireSlot(amp.Command):
    """Take a session slot of ``kind`` (smtp, submission, pop3) for ``host``, and
    ``spares`` more for the same host that the worker may hand out itself."""

    arguments = [(b"kind", amp.Unicode()), (b"host", amp.Unicode())]
    response = [
        (b"over", amp.Unicode()),  # "": granted; else connlimit.TOTAL / PER_IP (nothing taken)
        (b"spares", amp.Integer()),
    ]


class ReleaseSlot(amp.Command):
    """Give back ``count`` slots of ``host`` that ``AcquireSlot`` granted (used or spare)."""

    arguments = [(b"kind", amp.Unicode()), (b"host", amp.Unicode()), (b"count", amp.Integer())]
    requiresAnswer = False


class ReturnSpares(amp.Command):
    """Give back the spare slots of ``kind`` for ``host`` ("": for every host):
    a cap is reached, and a slot lent but not in use must not refuse a client."""

    arguments = [(b"kind", amp.Unicode()), (b"host", amp.Unicode())]
    response = [(b"returned", amp.AmpList([(b"host", amp.Unicode()), (b"count", amp.Integer())]))]


class Kick(amp.Command):
    """Queue entries were committed: the master's queue manager looks at them now (the
    worker sends those of one reactor turn together: ``slots.RemoteKicker``)."""

    arguments = [(b"queue_ids", amp.ListOf(amp.Unicode()))]
    requiresAnswer = False


class Ready(amp.Command):
    """The worker has adopted its listening sockets and accepts connections."""

    arguments = []
    response = []


class Exposition(amp.Command):
    """The worker's metrics in the Prometheus text format (empty without ``listen.metrics``)."""

    arguments = []
    response = [(b"text", amp.String())]
