"""The message pipeline: stage order, asynchronous stages, the first Reply stops,
failures become 451, header changes accumulate, MX and submission lists, and
building it from [pipeline] with plugins."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailstack import config as configmod
from mailstack.address import Address
from mailstack.checks.loop import LoopCheck
from mailstack.envelope import HeaderChanges
from mailstack.errors import Reply
from mailstack.interfaces import (
    IMessage,
    IMessageCheck,
    IMessageObserver,
    IPipeline,
)
from mailstack.metrics import Metrics, NoMetrics
from mailstack.pipeline import (
    Check,
    CheckFactory,
    Connection,
    ICheckFactory,
    Pipeline,
    PipelineError,
    Transaction,
    Verdict,
    build,
    factories,
)
from mailstack.smtp.replies import LOCAL_ERROR

REFUSE = Reply(550, "5.7.1", "Refused")
LATER = Reply(451, "4.7.1", "Later")
ALICE = Address("alice", "example.org")


@implementer(IMessage)
class FakeMessage:
    """A message's header fields, as the intake would give them."""

    def __init__(self, *fields: bytes) -> None:
        self.header = tuple((raw.split(b":", 1)[0].decode(), raw) for raw in fields)
        self.size = sum(len(f) for f in fields)

    def run_blocking(self, reader: Any) -> Deferred:
        return succeed(None)


class Recorder(Check):
    """A check that logs each call in a shared list and answers from ``answers``."""

    def __init__(self, name: str, log: list, mx: bool = True, submission: bool = True, **answers: Any) -> None:
        self.name = name
        self.calls = log
        self.mx = mx
        self.submission = submission
        self.answers = answers

    def _answer(self, stage: str) -> Any:
        self.calls.append((self.name, stage))
        answer = self.answers.get(stage)
        if isinstance(answer, Exception):
            raise answer
        return answer() if callable(answer) else answer

    def connect(self, conn):
        return self._answer("connect")

    def mail(self, conn, txn):
        return self._answer("mail")

    def rcpt(self, conn, txn, recipient):
        return self._answer("rcpt")

    def data(self, conn, txn, message):
        self.seen = [name for name, _ in message.header]
        return self._answer("data")


def mx_conn(**kw: Any) -> Connection:
    return Connection(peer="192.0.2.7", listener="smtp", hostname="mx.example.org", **kw)


def txn() -> Transaction:
    return Transaction(ALICE, {})


class InterfaceTests(SynchronousTestCase):
    def test_everyPartProvidesItsInterface(self):
        """Pipeline, the Check base, the loop check, the factory and this module's fakes verify."""
        log: list = []
        verifyObject(IPipeline, Pipeline([], Clock()))
        verifyObject(IMessageCheck, Check())
        verifyObject(IMessageCheck, Recorder("r", log))
        verifyObject(IMessageCheck, LoopCheck())
        verifyObject(IMessageCheck, Observing())
        verifyObject(IMessageObserver, Observing())
        verifyObject(ICheckFactory, CheckFactory("x", lambda rt, opts: Check()))
        verifyObject(IMessage, FakeMessage(b"A: 1\r\n"))
        verifyObject(IMessageObserver, Pipeline([Observing()], Clock()).data_begin(mx_conn(), txn()))


class OrderTests(SynchronousTestCase):
    def test_stagesRunInOrder(self):
        """Each stage calls the checks in configured order; with none refusing the answer is None."""
        log: list = []
        p = Pipeline([Recorder("a", log), Recorder("b", log)], Clock())
        conn, t = mx_conn(), txn()
        self.assertIsNone(p.connect(conn))
        self.assertIsNone(p.mail(conn, t))
        self.assertIsNone(p.rcpt(conn, t, ALICE))
        self.assertEqual(p.data(conn, t, FakeMessage()), HeaderChanges())
        self.assertEqual(
            log,
            [
                ("a", "connect"),
                ("b", "connect"),
                ("a", "mail"),
                ("b", "mail"),
                ("a", "rcpt"),
                ("b", "rcpt"),
                ("a", "data"),
                ("b", "data"),
            ],
        )

    def test_firstReplyStops(self):
        """The first Reply is the answer; the checks after it do not run."""
        log: list = []
        p = Pipeline([Recorder("a", log), Recorder("b", log, rcpt=REFUSE), Recorder("c", log)], Clock())
        with capturedLogs() as events:
            self.assertEqual(p.rcpt(mx_conn(), txn(), ALICE), REFUSE)
        self.assertEqual(log, [("a", "rcpt"), ("b", "rcpt")])
        self.assertTrue(any("check b refused rcpt" in e["log_format"].format(**e) for e in events))

    def test_refusalCountedByCheckName(self):
        """A check's refusal is counted in messages_refused_total under the check's name."""
        metrics = Metrics()
        p = Pipeline([Recorder("spf", [], mail=REFUSE), Recorder("custom", [], rcpt=REFUSE)], Clock(), metrics=metrics)
        p.mail(mx_conn(), txn())
        p.rcpt(mx_conn(), txn(), ALICE)
        text = metrics.exposition().decode()
        self.assertIn('mailstack_messages_refused_total{reason="spf"} 1.0', text)
        self.assertIn('mailstack_messages_refused_total{reason="other"} 1.0', text)

    def test_emptyPipelineIsSynchronous(self):
        """With no checks every stage answers at once (no Deferred per command)."""
        p = Pipeline([], Clock())
        self.assertIsNone(p.mail(mx_conn(), txn()))
        self.assertIsNone(p.data_begin(mx_conn(), txn()))
        self.assertEqual(p.data(mx_conn(), txn(), FakeMessage()), HeaderChanges())


class AsyncTests(SynchronousTestCase):
    def test_asynchronousStageHoldsTheRest(self):
        """A stage's Deferred delays the later stages until it fires; its Reply then stops them."""
        log: list = []
        pending: list[Deferred] = []

        def later() -> Deferred:
            pending.append(Deferred())
            return pending[-1]

        p = Pipeline([Recorder("a", log, mail=later), Recorder("b", log, mail=later), Recorder("c", log)], Clock())
        d = p.mail(mx_conn(), txn())
        self.assertIsInstance(d, Deferred)
        self.assertEqual(log, [("a", "mail")])
        pending[0].callback(None)
        self.assertEqual(log, [("a", "mail"), ("b", "mail")])
        pending[1].callback(LATER)
        self.assertEqual(self.successResultOf(d), LATER)
        self.assertEqual(log, [("a", "mail"), ("b", "mail")])

    def test_asynchronousDataVerdict(self):
        """An asynchronous Verdict's fields join the changes; a later stage sees them."""
        log: list = []
        late = Recorder("late", log)
        p = Pipeline([Recorder("a", log, data=lambda: succeed(Verdict(prepend=(b"X-A: 1\r\n",)))), late], Clock())
        result = self.successResultOf(p.data(mx_conn(), txn(), FakeMessage(b"Subject: s\r\n")))
        self.assertEqual(result.prepend, (b"X-A: 1\r\n",))
        self.assertEqual(late.seen, ["X-A", "Subject"])

    def test_timeout(self):
        """A stage that never answers is given up after pipeline.timeout: 451 4.3.0."""
        clock = Clock()
        p = Pipeline([Recorder("slow", [], connect=Deferred)], clock, timeout=30)
        d = p.connect(mx_conn())
        self.assertNoResult(d)
        clock.advance(30)
        self.assertEqual(self.successResultOf(d), LOCAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors()), 1)


class FailureTests(SynchronousTestCase):
    def assertAnswered451(self, check: Check, stage: str = "mail") -> None:
        p = Pipeline([check], Clock())
        result = p.mail(mx_conn(), txn()) if stage == "mail" else p.data(mx_conn(), txn(), FakeMessage())
        if isinstance(result, Deferred):
            result = self.successResultOf(result)
        self.assertEqual(result, LOCAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors()), 1, "the failure is logged")

    def test_exceptionIs451(self):
        """A stage that raises is logged and answered 451 4.3.0."""
        self.assertAnswered451(Recorder("boom", [], mail=RuntimeError("secret detail")))

    def test_errbackIs451(self):
        """A stage whose Deferred errbacks is logged and answered 451 4.3.0."""
        d: Deferred = Deferred()
        d.errback(RuntimeError("x"))
        self.assertAnswered451(Recorder("boom", [], mail=lambda: d))

    def test_nonReplyAnswerIs451(self):
        """A stage answering something that is no 4xx/5xx Reply is a bug: 451."""
        self.assertAnswered451(Recorder("odd", [], mail="yes"))
        self.assertAnswered451(Recorder("odd", [], mail=Reply(250, "2.0.0", "Ok")))

    def test_malformedPrependedFieldIs451(self):
        """A Verdict with a field that is not a well-formed header field: 451."""
        self.assertAnswered451(Recorder("odd", [], data=Verdict(prepend=(b"no colon\r\n",))), "data")
        self.assertAnswered451(Recorder("odd", [], data=Verdict(prepend=(b"X: a\nb\r\n",))), "data")


class DataTests(SynchronousTestCase):
    def test_changesAccumulate(self):
        """Prepends in stage order, removals from every stage; a Reply with changes still refuses."""
        log: list = []
        def drop_subject(name: str, raw: bytes) -> bool:
            return name.lower() == "subject"
        third = Recorder("c", log)
        p = Pipeline(
            [
                Recorder("a", log, data=Verdict(prepend=(b"X-A: 1\r\n",), remove=drop_subject)),
                Recorder("b", log, data=Verdict(prepend=(b"X-B: 2\r\n",))),
                third,
            ],
            Clock(),
        )
        changes = p.data(mx_conn(), txn(), FakeMessage(b"Subject: s\r\n", b"From: f\r\n"))
        self.assertEqual(changes.prepend, (b"X-A: 1\r\n", b"X-B: 2\r\n"))
        self.assertTrue(changes.removes("Subject", b"Subject: s\r\n"))
        self.assertFalse(changes.removes("From", b"From: f\r\n"))
        self.assertEqual(third.seen, ["X-A", "X-B", "From"])
        refusing = Pipeline([Recorder("a", [], data=Verdict(reply=REFUSE, prepend=(b"X: 1\r\n",)))], Clock())
        self.assertEqual(refusing.data(mx_conn(), txn(), FakeMessage()), REFUSE)

    def test_observersSeeTheBytes(self):
        """data_begin gathers the observers; each gets every chunk."""
        a, b = Observing(), Observing()
        p = Pipeline([a, Check(), b], Clock())
        observer = p.data_begin(mx_conn(), txn())
        observer.write(b"Subject: x\r\n")
        observer.write(b"\r\nbody\r\n")
        self.assertEqual(a.observed, [b"Subject: x\r\n", b"\r\nbody\r\n"])
        self.assertEqual(b.observed, a.observed)

    def test_failingObserverFailsTheMessage(self):
        """An observer that raises is dropped, the others go on, and data() answers 451."""
        bad, good = Observing(fail=True), Observing()
        p = Pipeline([bad, good], Clock())
        t = txn()
        observer = p.data_begin(mx_conn(), t)
        observer.write(b"a")
        observer.write(b"b")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(good.observed, [b"a", b"b"])
        self.assertEqual(p.data(mx_conn(), t, FakeMessage()), LOCAL_ERROR)


@implementer(IMessageObserver)
class Observing(Check):
    """A check whose stream observer records the chunks (or raises)."""

    name = "observing"

    def __init__(self, fail: bool = False) -> None:
        self.observed: list[bytes] = []
        self.fail = fail

    def data_begin(self, conn, txn):
        return self

    def write(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("observer bug")
        self.observed.append(data)


class SessionKindTests(SynchronousTestCase):
    def test_mxAndSubmissionLists(self):
        """Unauthenticated MX sessions run the mx checks; submission listeners and AUTH the submission ones."""
        log: list = []
        p = Pipeline(
            [Recorder("inbound", log, submission=False), Recorder("outbound", log, mx=False), Recorder("both", log)],
            Clock(),
        )
        p.mail(mx_conn(), txn())
        self.assertEqual([n for n, _ in log], ["inbound", "both"])
        del log[:]
        p.mail(mx_conn(user="alice@example.org"), txn())
        self.assertEqual([n for n, _ in log], ["outbound", "both"])
        del log[:]
        p.connect(Connection("192.0.2.7", "submission", "mx.example.org"))
        self.assertEqual([n for n, _ in log], ["outbound", "both"])

    def test_unimplementedStagesAreSkipped(self):
        """A Check subclass is called only for the stages it overrides (the loop check: data)."""
        p = Pipeline([LoopCheck()], Clock())
        self.assertEqual(p.stages(mx_conn(), "mail"), ())
        self.assertEqual([c.name for c in p.stages(mx_conn(), "data")], ["loop"])


def runtime(**pipeline: Any) -> SimpleNamespace:
    return SimpleNamespace(
        config=configmod.from_mapping({"pipeline": pipeline}),
        reactor=Clock(),
        run_blocking=None,
        signer=None,
        metrics=NoMetrics(),
    )


class BuildTests(SynchronousTestCase):
    def test_builtinLoopIsAPlugin(self):
        """The loop and dkimsign checks are found through the plugin system and on by default."""
        self.assertIn("loop", factories())
        p = build(runtime())
        self.assertEqual([c.name for c in p.checks], ["loop", "dkimsign"])

    def test_options(self):
        """[pipeline.options.<name>] reaches the factory."""
        p = build(runtime(options={"loop": {"max_received": 7}}))
        self.assertEqual(p.checks[0].max_received, 7)

    def test_noChecks(self):
        """checks = [] turns every check off."""
        self.assertEqual(build(runtime(checks=[])).checks, ())

    def test_errorsNameTheKey(self):
        """Unknown checks, bad options and options of a check not enabled stop the start, naming the key."""
        cases = [
            ({"checks": ["nosuch"]}, "pipeline.checks: no check named 'nosuch'"),
            ({"options": {"loop": {"max_received": 0}}}, "pipeline.options.loop: max_received"),
            ({"options": {"loop": {"bogus": 1}}}, "pipeline.options.loop: unknown option"),
            ({"checks": [], "options": {"loop": {}}}, "pipeline.options.loop: 'loop' is not in pipeline.checks"),
        ]
        for values, message in cases:
            with self.assertRaises(PipelineError) as e:
                build(runtime(**values))
            self.assertIn(message, str(e.exception))

    def test_configValidation(self):
        """Check names are validated and may not repeat."""
        for bad in (["Loop!"], ["loop", "loop"], "loop"):
            self.assertRaises(configmod.ConfigError, configmod.from_mapping, {"pipeline": {"checks": bad}})
        self.assertRaises(configmod.ConfigError, configmod.from_mapping, {"pipeline": {"options": {"loop": 1}}})


class ServiceTests(SynchronousTestCase):
    def test_runtimeCarriesThePipeline(self):
        """make_service builds the configured pipeline into the runtime the listeners share:
        the checks [inbound] turns on (by default SPF, DKIM, DMARC, Authentication-Results), then [pipeline] checks."""
        from mailstack import service

        cfg = configmod.from_mapping(
            {"listen": {"pop3": [], "pop3s": [], "submissions": []}, "server": {"processes": 1}}, base=self.mktemp()
        )
        svc = service.make_service(cfg, Clock(), None, None, None)
        self.assertEqual(
            [c.name for c in svc.runtime.pipeline.checks], ["spf", "dkim", "dmarc", "authresults", "loop", "dkimsign"]
        )
        self.assertIs(svc.factories[0].pipeline, svc.runtime.pipeline)

    def test_badPipelineIsAStartupError(self):
        """A check that is not installed stops make_service with a one-line StartupError."""
        from mailstack import service

        cfg = configmod.from_mapping({"pipeline": {"checks": ["nosuch"]}}, base=self.mktemp())
        with self.assertRaises(service.StartupError) as e:
            service.make_service(cfg, Clock(), None, None, None)
        self.assertIn("pipeline.checks: no check named 'nosuch'", str(e.exception))

    def test_checkConfigNamesAMissingCheck(self):
        """mailstack check-config (run before the start by systemd) refuses a check that is not installed."""
        import io
        import os

        from mailstack.admin import cli

        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "mailstack.toml")
        with open(path, "w") as f:
            f.write('[pipeline]\nchecks = ["loop", "nosuch"]\n')
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(cli.main(["--config", path, "check-config"], stdout=out, stderr=err, environ={}), 1)
        self.assertIn(f"{path}: pipeline.checks: no check named 'nosuch'", err.getvalue())
        self.assertEqual(err.getvalue().count("\n"), 1)
