# -*- test-case-name: tests.test_batching -*-
"""Group commit: blocking work done for batches of items, one batch at a time.

The queue manager batches its loads and removals this way: many entries'
removals then share one directory fsync, and the batch size follows the load
with no timer.  (The intake's commits share their directory fsyncs among
pool threads instead: ``storage.dirsync``.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure


class GroupCommit:
    """Run ``publish(items)`` in a thread for batches of items, one batch at a time.

    ``submit(item)`` returns a Deferred that fires with the item's result once
    its batch was published: ``publish`` returns one result per item, and an
    exception instance as a result errbacks that item's Deferred with it; if
    ``publish`` raises, every item of its batch fails with that error.
    While a batch is in flight new items wait, and all of them form the next
    batch: the batch size adapts to the load, with no timer.
    """

    def __init__(self, run_blocking: Callable[..., Deferred], publish: Callable[..., list]) -> None:
        self._run_blocking = run_blocking
        self._publish = publish
        self._waiting: list[tuple[Any, Deferred]] = []
        self._busy = False
        self.batches = 0  # for tests and diagnostics

    def submit(self, item: Any) -> Deferred:
        d: Deferred = Deferred()
        self._waiting.append((item, d))
        self._next()
        return d

    def _next(self) -> None:
        if self._busy or not self._waiting:
            return
        batch, self._waiting = self._waiting, []
        self._busy = True
        self.batches += 1
        try:
            d = self._run_blocking(self._publish, [item for item, _ in batch])
        except Exception:
            d = fail()
        d.addBoth(self._done, batch)

    def _done(self, results: Any, batch: list[tuple[Any, Deferred]]) -> None:
        self._busy = False
        self._next()  # start the next batch before running this one's callbacks
        if isinstance(results, Failure):
            for _, d in batch:
                d.errback(results)
            return
        for (_, d), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                d.errback(Failure(result))
            else:
                d.callback(result)
