"""Tests for mailstack.jsonlog: the line format, and twistd picking it up."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap

from twisted.application.service import Application, IService, Service
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    globalLogPublisher,
)
from twisted.python import log as legacylog
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack import jsonlog
from tests.e2e.harness import twistd_command


def lines_of(emit):
    """Run ``emit(logger)`` into a JSON observer; the written lines, parsed."""
    out = io.StringIO()
    publisher = LogPublisher(FileLogObserver(out, jsonlog.line_format("json")))
    emit(Logger(namespace="mailstack.test", observer=publisher))
    text = out.getvalue()
    assert text.endswith("\n") and "\x1e" not in text, repr(text)
    return [json.loads(line) for line in text.splitlines()]


class FormatTests(SynchronousTestCase):
    def test_fixedKeysAndOwnKeys(self):
        """time (ISO 8601 UTC), level, namespace, text and the event's own keys."""
        (line,) = lines_of(lambda log: log.info("queued {queue_id} for {user}", queue_id="abc", user="a@x", size=12))
        self.assertRegex(line["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(line["level"], "info")
        self.assertEqual(line["namespace"], "mailstack.test")
        self.assertEqual(line["text"], "queued abc for a@x")
        self.assertEqual((line["queue_id"], line["user"], line["size"]), ("abc", "a@x", 12))
        self.assertFalse([k for k in line if k.startswith("log_")])

    def test_controlCharactersEscaped(self):
        """Peer text with newlines and escapes stays on one line and reads back intact."""
        nasty = "evil\r\nlevel: critical\x1b[31m\x00\u2028"
        out = io.StringIO()
        FileLogObserver(out, jsonlog.line_format("json"))(
            {"log_format": "HELO {helo}", "helo": nasty, "log_level": LogLevel.warn, "log_time": 0.0}
        )
        text = out.getvalue()
        self.assertEqual(text.count("\n"), 1)
        self.assertTrue(all(" " <= c <= "~" for c in text[:-1]), repr(text))
        line = json.loads(text)
        self.assertEqual(line["helo"], nasty)
        self.assertEqual(line["text"], "HELO " + nasty)
        self.assertEqual(line["time"], "1970-01-01T00:00:00.000Z")

    def test_valuesMadeJSONSafe(self):
        """bytes, tuples, sets, non-finite floats and arbitrary objects become JSON values."""

        class Peer:
            def __str__(self):
                return "IPv4Address(TCP, '127.0.0.1', 25)"

        (line,) = lines_of(
            lambda log: log.info(
                "x", raw=b"ok\xff", pair=("a", 1), many={3}, ratio=float("nan"), peer=Peer(), nested={"k": [b"v"]}
            )
        )
        self.assertEqual(line["raw"], "ok\\xff")
        self.assertEqual(line["pair"], ["a", 1])
        self.assertEqual(line["many"], [3])
        self.assertEqual(line["ratio"], "nan")
        self.assertEqual(line["peer"], "IPv4Address(TCP, '127.0.0.1', 25)")
        self.assertEqual(line["nested"], {"k": ["v"]})

    def test_failureAsText(self):
        """A logged failure becomes its traceback text under ``failure``."""

        def emit(log):
            try:
                raise ZeroDivisionError("division by zero")
            except ZeroDivisionError:
                log.failure("delivery of {queue_id} crashed", queue_id="q1")

        (line,) = lines_of(emit)
        self.assertEqual(line["level"], "critical")
        self.assertEqual(line["text"], "delivery of q1 crashed")
        self.assertIn("ZeroDivisionError", line["failure"])
        self.assertEqual(line["queue_id"], "q1")

    def test_collidingKeyKept(self):
        """An own key named like a fixed key keeps its value under a suffixed name."""
        (line,) = lines_of(lambda log: log.info("t", text="mine", time=5))
        self.assertEqual((line["text"], line["text_"], line["time_"]), ("t", "mine", 5))

    def test_legacyEventsWithoutDuplicates(self):
        """twisted.python.log events (twistd's own lines) lose their legacy twins."""
        out = io.StringIO()
        observer = FileLogObserver(out, jsonlog.line_format("json"))
        globalLogPublisher.addObserver(observer)
        try:
            legacylog.msg("set uid/gid 1/1")
            legacylog.err(Failure(ValueError("boom")), "bad thing")
        finally:
            globalLogPublisher.removeObserver(observer)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(lines[0]["text"], "set uid/gid 1/1")
        self.assertEqual(set(lines[0]), {"time", "level", "namespace", "text"})
        self.assertIn("ValueError", lines[1]["text"])
        self.assertEqual(lines[1]["level"], "critical")
        self.flushLoggedErrors(ValueError)


class TwistdTests(SynchronousTestCase):
    def test_outputChoiceMirrorsTwistd(self):
        """stdout for -n without --logfile or with -; nothing when --logger/--syslog chose."""
        self.assertIs(jsonlog.twistd_output({"nodaemon": True, "logfile": None}), sys.stdout)
        self.assertIs(jsonlog.twistd_output({"nodaemon": False, "logfile": "-"}), sys.stdout)
        self.assertIsNone(jsonlog.twistd_output({"nodaemon": True, "syslog": True}))
        self.assertIsNone(jsonlog.twistd_output({"nodaemon": True, "logger": print}))
        path = os.path.abspath(self.mktemp())
        out = jsonlog.twistd_output({"nodaemon": True, "logfile": path})
        self.addCleanup(out.close)
        self.assertEqual(out.path, path)

    def test_applicationComponent(self):
        """Attached to twistd's Application, the wrapper sets its ILogObserver."""
        inner = Service()
        options = ServerOptions()
        options["nodaemon"] = True
        outer = jsonlog.for_twistd(inner, options)
        application = Application("mailstack")
        IService(outer).setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        verifyObject(ILogObserver, observer)
        self.assertIs(inner.parent, outer)

    def test_linesToLearnsHowToAddLines(self):
        """``lines_to`` is given the log's format and the way to add whole lines to the
        very log the application's observer writes (a worker's lines and the master's
        own events end up in one file, the lines as they came)."""
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        path = os.path.abspath(self.mktemp())
        told = []
        options = ServerOptions()
        options.update(nodaemon=True, logfile=path)
        outer = jsonlog.for_twistd(Service(), options, "text", lines_to=lambda write, fmt: told.append((write, fmt)))
        [(write, fmt)] = told
        self.assertEqual(fmt, "text")
        verifyObject(ILogObserver, outer.observer)
        write("2026-12-04T00:00:00+0000 [worker0] added whole\n")
        outer.observer({"log_format": "own event", "log_level": LogLevel.info, "log_time": 0.0,
                        "log_namespace": "test", "log_system": "master"})
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertEqual(lines[0], "2026-12-04T00:00:00+0000 [worker0] added whole")
        self.assertTrue(lines[1].endswith("[master] own event"), lines[1])

    def test_notTwistd(self):
        """Under another runner (``twist``, with its own --log-format) nothing changes."""
        inner = Service()
        self.assertIs(jsonlog.for_twistd(inner, usage.Options()), inner)
        self.assertIs(jsonlog.for_twistd(inner, {"nodaemon": True}), inner)
        options = ServerOptions()
        options["syslog"] = True
        self.assertIs(jsonlog.for_twistd(inner, options), inner)

    def test_realTwistdLogfile(self):
        """Under a real ``twistd -n --logfile``, every line of the file is JSON, twistd's own included."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        logfile = os.path.join(root, "twistd.log")
        tac = os.path.join(root, "app.tac")
        with open(tac, "w") as f:
            f.write(
                textwrap.dedent(f"""\
                from twisted.application.service import Application, IService, Service
                from twisted.internet import reactor
                from twisted.logger import Logger
                from twisted.scripts.twistd import ServerOptions
                from mailstack import jsonlog

                class Once(Service):
                    log = Logger()
                    def startService(self):
                        self.log.info("EHLO from {{peer}}", peer="1.2.3.4\\r\\nforged", queue_id="q9")
                        reactor.callLater(0, reactor.stop)

                options = ServerOptions()
                options.update(nodaemon=True, logfile={logfile!r})
                application = Application("test")
                IService(jsonlog.for_twistd(Once(), options)).setServiceParent(application)
                """)
            )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        subprocess.run(
            twistd_command() + ["-n", "--pidfile=", f"--logfile={logfile}", "-y", tac],
            cwd=root,
            env=env,
            check=True,
            timeout=60,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with open(logfile) as f:
            lines = [json.loads(line) for line in f.read().splitlines()]
        texts = [line["text"] for line in lines]
        self.assertTrue(any(t.startswith("twistd ") and "starting up" in t for t in texts), texts)
        (ours,) = [line for line in lines if "queue_id" in line]
        self.assertEqual((ours["peer"], ours["queue_id"]), ("1.2.3.4\r\nforged", "q9"))
