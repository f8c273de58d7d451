# -*- test-case-name: tests.test_threadpool -*-
"""The threads behind ``run_blocking``: one shared queue, results back by ``callFromThread``.

Smaller than ``twisted.python.threadpool.ThreadPool`` + ``deferToThreadPool``
(no ``Team`` coordinator, no worker wake-up per task while workers are busy),
because the reactor thread's CPU per hand-off limits throughput; and its
workers run under ``SCHED_BATCH`` on Linux so that a woken worker does not
preempt the reactor thread.  The measurements and the trade-offs are in
docs/threadpool.rst.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

# In-memory work on at most this many bytes (hashing, parsing, a signature
# over a small message) is done on the reactor thread: a pool call waits
# behind the queue's fsyncs and costs two thread wake-ups, more than the
# work itself (a few tenths of a millisecond at this size).
INLINE_BYTES = 32 * 1024


class ThreadPool:
    """``size`` threads from ``start()`` to ``stop()``; ``run(f, *a, **kw) -> Deferred``.

    Calls made before ``start()`` wait for it.  ``stop()`` lets every call
    already queued finish (an fsync in progress completes), then joins.
    """

    def __init__(self, reactor: Any, size: int, name: str) -> None:
        self._reactor = reactor
        self._size = size
        self._name = name
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.started = False

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        """Run ``f(*args, **kwargs)`` in a thread; the Deferred fires on the reactor thread."""
        d: Deferred = Deferred()
        self._queue.put((d, f, args, kwargs))
        return d

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        for i in range(self._size):
            t = threading.Thread(target=self._work, name=f"PoolThread-{self._name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)  # behind every queued call: those finish first
        for t in threads:
            t.join()

    def _work(self) -> None:
        _batch_scheduling()
        get = self._queue.get
        while True:
            task = get()
            if task is None:
                return
            self._call(*task)

    def _call(self, d: Deferred, f: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        # A function of its own so that nothing of the call (a message read
        # into memory) stays referenced while the thread waits for the next.
        try:
            result = f(*args, **kwargs)
        except BaseException:
            self._reactor.callFromThread(d.errback, Failure())
        else:
            self._reactor.callFromThread(d.callback, result)


def _batch_scheduling() -> None:
    """Put the calling thread under ``SCHED_BATCH`` where the OS has it (see the module docstring)."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or refused by a sandbox: normal scheduling
        pass
