"""Tests for mailstack.batching.GroupCommit."""

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mailstack.batching import GroupCommit


class GroupCommitTests(SynchronousTestCase):
    def test_itemsSubmittedMeanwhileShareOneCall(self) -> None:
        """Items submitted while a batch is in the thread share the next thread call."""
        calls: list = []

        def run(f, *a, **kw):
            d = Deferred()
            calls.append((f, a, kw, d))
            return d

        b = GroupCommit(run, lambda items: [i * 2 for i in items])
        results = []
        for i in range(4):
            b.submit(i).addCallback(results.append)
        self.assertEqual(len(calls), 1)
        f, a, kw, d = calls[0]
        d.callback(f(*a))
        self.assertEqual(len(calls), 2)  # items 1-3 in one batch
        f, a, kw, d = calls[1]
        self.assertEqual(a[0], [1, 2, 3])
        d.callback(f(*a))
        self.assertEqual(results, [0, 2, 4, 6])
