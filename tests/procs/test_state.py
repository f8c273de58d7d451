"""The shared state over real AMP: two workers' proxies (procs.stateclient) against
one master (procs.stateserver) holding the real throttle, sending limits, client
counts and greylist, on a task.Clock, connected by iosim pumps."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailstack import config as configmod
from mailstack.auth.login import Authenticator
from mailstack.auth.throttle import LoginThrottle
from mailstack.checks import clientrate
from mailstack.errors import Reply
from mailstack.inbound.greylist import Greylist
from mailstack.inbound.interfaces import IGreylist
from mailstack.interfaces import ILoginThrottle, ILoginTicket, IRateLimit, IReservation, ISendLimits
from mailstack.procs import stateclient, statecmds, stateserver
from mailstack.sendlimits import SendLimits
from tests.support.fakes import FakeChecker
from tests.support.runtime import fake_runtime

PEER = "192.0.2.9"


def immediately(f: Any, *args: Any, **kwargs: Any) -> Deferred:
    """run_blocking stand-in: the call runs at once."""
    return maybeDeferred(f, *args, **kwargs)


class Channel(amp.AMP):
    """The master's end of one worker connection, mounting the state as
    ``procs.master.MasterChannel`` does: a ``WorkerState`` per connection,
    ``lost()`` when it goes."""

    def __init__(self, server: stateserver.StateServer) -> None:
        self.shared = server.worker()
        super().__init__(locator=self.shared)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.shared.lost()
        super().connectionLost(reason)


class Worker:
    """One worker's AMP connection to the master, its proxies and its pump."""

    def __init__(self, server: stateserver.StateServer) -> None:
        self.client, self.master, self.pump = iosim.connectedServerAndClient(lambda: Channel(server), amp.AMP)
        self.state = stateclient.remote_state(self.client)

    def answer(self, d: Deferred) -> Any:
        """Pump the connection; what ``d`` fired with (a Failure left as is).

        The result is taken before the pump, as the sessions do: AMP drops the
        connection on an error answer nobody has an errback for by then."""
        results: list[Any] = []
        d.addBoth(results.append)
        self.pump.flush()
        assert results, "no answer"
        return results[0]

    def send(self) -> None:
        """Deliver the answerless commands sent so far."""
        self.pump.flush()

    def disconnect(self) -> None:
        self.client.transport.loseConnection()
        self.pump.flush()


class StateTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        auth = configmod.from_mapping(
            {"auth": {"failure_delay": "1s", "max_failure_delay": "16s", "lockout_failures": 3, "lockout_time": "5m"}}
        ).auth
        self.throttle = LoginThrottle(self.clock, auth)
        data = os.path.abspath(self.mktemp())
        os.makedirs(data)
        self.limits = SendLimits(self.clock, immediately, data, 1, 0)
        self.rate = clientrate.limiter(self.clock, 2)
        self.greylist = Greylist(os.path.join(data, "greylist.json"), self.clock, immediately, 300.0)
        self.server = stateserver.StateServer(self.throttle, self.limits, self.rate, self.greylist)
        self.a = Worker(self.server)
        self.b = Worker(self.server)


class InterfaceTests(StateTestCase):
    def test_proxiesProvideTheInterfaces(self) -> None:
        """Each proxy, ticket and hold provides the interface of the local object it stands for."""
        state = self.a.state
        verifyObject(ILoginThrottle, state.throttle)
        verifyObject(ISendLimits, state.send_limits)
        verifyObject(IRateLimit, state.rate)
        verifyObject(IGreylist, state.greylist)
        verifyObject(ILoginTicket, self.a.answer(state.throttle.begin(PEER, "alice@example.org")))
        verifyObject(IReservation, self.a.answer(state.send_limits.reserve("alice@example.org")))

    def test_localObjectsProvideTheInterfaces(self) -> None:
        """The master's objects provide the same interfaces the proxies do."""
        verifyObject(ILoginThrottle, self.throttle)
        verifyObject(ISendLimits, self.limits)
        verifyObject(IRateLimit, self.rate)
        verifyObject(IGreylist, self.greylist)


class SendLimitTests(StateTestCase):
    def test_holdOfOneWorkerCountsForTheOther(self) -> None:
        """At one message an hour, a hold taken through worker A refuses worker B
        (451 4.7.1 naming the limit) until A releases it."""
        hold = self.a.answer(self.a.state.send_limits.reserve("alice@example.org"))
        refused = self.b.answer(self.b.state.send_limits.reserve("alice@example.org"))
        self.assertIsInstance(refused, Reply)
        self.assertEqual((refused.code, refused.enhanced), (451, "4.7.1"))
        self.assertIn("Hourly sending limit of 1", refused.text)
        hold.release()
        self.a.send()
        self.assertEqual(self.limits.held, {})
        self.assertNotIsInstance(self.b.answer(self.b.state.send_limits.reserve("alice@example.org")), Reply)

    def test_commitCounts(self) -> None:
        """A committed hold is a message sent; committing again (or releasing) changes nothing."""
        hold = self.a.answer(self.a.state.send_limits.reserve("alice@example.org"))
        hold.commit()
        hold.commit()
        hold.release()
        self.a.send()
        self.assertEqual(self.limits.usage("alice@example.org").sent_last_hour, 1)
        self.assertEqual(self.limits.held, {})
        self.assertIsInstance(self.b.answer(self.b.state.send_limits.reserve("alice@example.org")), Reply)


class ThrottleTests(StateTestCase):
    def fail(self, worker: Worker, account: str = "alice@example.org") -> float:
        """One wrong password through ``worker``; the reply delay the master gives."""
        ticket = worker.answer(worker.state.throttle.begin(PEER, account))
        self.assertIsNotNone(ticket)
        return float(worker.answer(ticket.failed()))

    def test_lockoutShared(self) -> None:
        """Failures through both workers add up: the third locks the peer out for both;
        the reply delays double as in one process."""
        self.assertEqual([self.fail(self.a), self.fail(self.b, "bob@example.org"), self.fail(self.a)], [1.0, 2.0, 4.0])
        self.assertIsNone(self.b.answer(self.b.state.throttle.begin(PEER, "carol@example.org")))
        self.assertIsNone(self.a.answer(self.a.state.throttle.begin(PEER, "alice@example.org")))

    def test_attemptsInFlightCount(self) -> None:
        """Attempts begun through one worker count against the other while their checks run."""
        tickets = [self.a.answer(self.a.state.throttle.begin(PEER, f"u{i}@example.org")) for i in range(3)]
        self.assertIsNone(self.b.answer(self.b.state.throttle.begin(PEER, "x@example.org")))
        for ticket in tickets:
            ticket.abandoned()
        self.a.send()
        self.assertIsNotNone(self.b.answer(self.b.state.throttle.begin(PEER, "x@example.org")))

    def test_successForgetsThePair(self) -> None:
        """A success through the other worker forgets the pair's failures and makes the
        peer known for that account, as in one process; other accounts stay locked."""
        self.fail(self.a)
        self.fail(self.a)
        ticket = self.b.answer(self.b.state.throttle.begin(PEER, "alice@example.org"))
        ticket.succeeded()
        self.b.send()
        self.fail(self.a)
        self.assertIsNotNone(self.b.answer(self.b.state.throttle.begin(PEER, "alice@example.org")))
        self.assertIsNone(self.b.answer(self.b.state.throttle.begin(PEER, "bob@example.org")))

    def test_ticketEndsOnce(self) -> None:
        """Only the first verdict on a remote ticket counts; a second failed() is 0.0 without asking."""
        ticket = self.a.answer(self.a.state.throttle.begin(PEER, "alice@example.org"))
        self.assertEqual(self.a.answer(ticket.failed()), 1.0)
        self.assertEqual(self.a.answer(ticket.failed()), 0.0)
        ticket.succeeded()
        self.a.send()
        self.assertEqual(self.throttle._peers.get(PEER, self.clock.seconds()).failures, 1)

    def test_loginThroughTheMaster(self) -> None:
        """auth.login.Authenticator runs unchanged on the remote throttle: a wrong
        password gets the master's delay, the right one logs in."""
        auth = Authenticator(FakeChecker(), self.a.state.throttle, self.clock)
        wrong = self.a.answer(auth.login(PEER, b"alice@example.org", b"nope"))
        self.assertEqual((wrong.key, wrong.delay), (None, 1.0))
        right = self.a.answer(auth.login(PEER, b"alice@example.org", b"secret"))
        self.assertEqual(right.key, "alice@example.org")


class InboundTests(StateTestCase):
    def test_clientCountsShared(self) -> None:
        """At two messages a minute, one through each worker uses the allowance of both."""
        admit = [w.answer(w.state.rate.admit(PEER)) for w in (self.a, self.b, self.a)]
        self.assertEqual(admit, [True, True, False])
        self.clock.advance(61)
        self.assertTrue(self.b.answer(self.b.state.rate.admit(PEER)))

    def test_greylistTripletShared(self) -> None:
        """A triplet first seen through worker A passes through worker B after the delay."""
        triplet = (PEER, "bob@remote.test", "alice@example.org")
        self.assertFalse(self.a.answer(self.a.state.greylist.check(*triplet)))
        self.clock.advance(301)
        self.assertTrue(self.b.answer(self.b.state.greylist.check(*triplet)))

    def test_offInTheMaster(self) -> None:
        """A worker asking for counts or a greylist the master does not keep gets NotShared;
        the connection stays up."""
        server = stateserver.StateServer(self.throttle, self.limits)
        worker = Worker(server)
        self.assertTrue(worker.answer(worker.state.rate.admit(PEER)).check(statecmds.NotShared))
        self.assertTrue(worker.answer(worker.state.greylist.check(PEER, "a@b", "c@d")).check(statecmds.NotShared))
        self.assertNotIsInstance(worker.answer(worker.state.send_limits.reserve("alice@example.org")), Reply)


@implementer(ILoginThrottle)
class BrokenThrottle:
    """A throttle with a bug."""

    def begin(self, peer: str, account: str) -> Deferred:
        raise ZeroDivisionError("bug")


@implementer(ILoginThrottle)
class LateThrottle:
    """A throttle whose answers the test fires; its tickets record their verdicts."""

    def __init__(self) -> None:
        self.asked: list[Deferred] = []

    def begin(self, peer: str, account: str) -> Deferred:
        d: Deferred = Deferred()
        self.asked.append(d)
        return d


@implementer(ILoginTicket)
class Ticket:
    """A login attempt that records its verdicts."""

    delay = 0.0

    def __init__(self) -> None:
        self.verdicts: list[str] = []

    def succeeded(self) -> None:
        self.verdicts.append("succeeded")

    def failed(self) -> Deferred:
        self.verdicts.append("failed")
        return succeed(1.0)

    def abandoned(self) -> None:
        self.verdicts.append("abandoned")


class FailureTests(StateTestCase):
    def test_answerAfterTheWorkerLeft(self) -> None:
        """An attempt the master's throttle grants after the worker's connection
        was lost is abandoned at once, not kept under an id nobody will end."""
        throttle = LateThrottle()
        verifyObject(ILoginThrottle, throttle)
        verifyObject(ILoginTicket, Ticket())
        worker = Worker(stateserver.StateServer(throttle, self.limits))
        asked = worker.state.throttle.begin(PEER, "alice@example.org")
        worker.pump.flush()
        worker.disconnect()
        ticket = Ticket()
        throttle.asked[0].callback(ticket)
        self.assertEqual(ticket.verdicts, ["abandoned"])
        self.assertEqual(worker.master.shared.tickets, {})
        self.failureResultOf(asked)

    def test_bugAnsweredStateFailed(self) -> None:
        """An error in the master's object is logged there and answered StateFailed;
        the worker's connection stays up for the next request."""
        verifyObject(ILoginThrottle, BrokenThrottle())
        worker = Worker(stateserver.StateServer(BrokenThrottle(), self.limits))
        self.assertTrue(worker.answer(worker.state.throttle.begin(PEER, "a@b")).check(statecmds.StateFailed))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertNotIsInstance(worker.answer(worker.state.send_limits.reserve("alice@example.org")), Reply)

    def test_lostWorkerEndsItsAttemptsAndHolds(self) -> None:
        """When worker A's connection is lost, its holds are released and its attempts
        abandoned (uncounted); worker B's are kept."""
        self.a.answer(self.a.state.send_limits.reserve("alice@example.org"))
        for i in range(2):
            self.a.answer(self.a.state.throttle.begin(PEER, f"u{i}@example.org"))
        kept = self.b.answer(self.b.state.throttle.begin(PEER, "v@example.org"))
        self.assertIsNone(self.b.answer(self.b.state.throttle.begin(PEER, "w@example.org")))
        self.a.disconnect()
        self.assertEqual(self.limits.held, {})
        self.assertNotIsInstance(self.b.answer(self.b.state.send_limits.reserve("alice@example.org")), Reply)
        self.assertIsNotNone(self.b.answer(self.b.state.throttle.begin(PEER, "w@example.org")))
        self.assertEqual(self.b.answer(kept.failed()), 1.0)

    def test_masterGone(self) -> None:
        """Once the master's connection is lost, a worker's requests fail (the session
        answers 4xx) and ending an attempt or a hold is a quiet no-op."""
        ended = self.a.answer(self.a.state.throttle.begin(PEER, "alice@example.org"))
        asked = self.a.answer(self.a.state.throttle.begin(PEER, "bob@example.org"))
        hold = self.a.answer(self.a.state.send_limits.reserve("alice@example.org"))
        self.a.disconnect()
        self.assertIsInstance(self.a.answer(self.a.state.send_limits.reserve("alice@example.org")), Failure)
        self.assertIsInstance(self.a.answer(asked.failed()), Failure)
        ended.abandoned()
        hold.commit()
        self.assertEqual((self.limits.held, self.throttle._peers.get(PEER, self.clock.seconds()).pending), ({}, 0))

    def test_oversizedArgumentFails(self) -> None:
        """A value AMP cannot carry (over 64 KiB) fails the Deferred, not the caller; the connection stays up."""
        failure = self.a.answer(self.a.state.throttle.begin(PEER, "x" * 70_000))
        self.assertIsInstance(failure, Failure)
        self.assertIsNotNone(self.a.answer(self.a.state.throttle.begin(PEER, "alice@example.org")))


class BuildTests(SynchronousTestCase):
    def test_buildFromConfig(self) -> None:
        """build() keeps the runtime's throttle and limits, and client counts and a greylist
        table (to be started by the master) only when [inbound] turns them on."""
        data = self.mktemp()
        on = fake_runtime(
            configmod.from_mapping({"data_dir": data, "inbound": {"greylist": "5m", "max_messages_per_minute": 9}})
        )
        server, table = stateserver.build(on)
        self.assertIs(server.throttle, on.throttle)
        self.assertIs(server.send_limits, on.send_limits)
        self.assertEqual((server.rate.limit, server.rate.window), (9, 60.0))
        self.assertIs(server.greylist, table)
        self.assertEqual(table.delay, 300.0)
        off, none = stateserver.build(fake_runtime(configmod.from_mapping({"data_dir": data})))
        self.assertEqual((off.rate, off.greylist, none), (None, None, None))
