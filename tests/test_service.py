"""Tests for mailstack.service and mailstack.tap (service tree, options, stop order)."""

import os
import shutil
import socket
import tempfile

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailstack import config, service, tap
from mailstack.interfaces import IDrainable, IRuntime
from mailstack.metrics import Metrics, MetricsSite
from mailstack.sendlimits import SendLimits
from tests.support.fakes import FakeChecker, FakeThrottle, FakeTLS


class HelperTests(SynchronousTestCase):
    def test_listenDescription(self):
        """ssl: without its own certificate becomes tcp: plus our TLS; others stay."""
        self.assertEqual(service.listen_description("ssl:465"), ("tcp:465", True))
        self.assertEqual(service.listen_description("ssl:465:interface=::1"), ("tcp:465:interface=::1", True))
        self.assertEqual(service.listen_description("ssl:465:privateKey=k.pem"), ("ssl:465:privateKey=k.pem", False))
        self.assertEqual(service.listen_description("tcp:25"), ("tcp:25", False))


@implementer(IDrainable)
class DrainingFactory(ServerFactory):
    def __init__(self, log):
        self.log = log
        self.pending = Deferred()

    def drain(self, timeout):
        self.log.append(("drain", timeout))
        return self.pending


class FakeManager(Service):
    def __init__(self, log):
        self.log = log

    def stopService(self):
        Service.stopService(self)
        self.log.append("manager stopped")


class MailServiceTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.config = config.from_mapping({"smtp": {"shutdown_grace": "7s"}}, base=self.mktemp())
        self.log = []
        runtime = service.Runtime(
            config=self.config,
            reactor=self.reactor,
            run_blocking=None,
            users=None,
            aliases=None,
            checker=FakeChecker(),
            throttle=FakeThrottle(),
            tls=FakeTLS(),
            manager=FakeManager(self.log),
            send_limits=SendLimits(self.reactor, None, self.config.data_dir, 0, 0),
        )
        self.pool = service.ThreadPoolService(self.reactor, threads=2)
        self.svc = service.MailService(runtime, self.pool)
        self.svc.add_helper(runtime.manager)
        self.factory = DrainingFactory(self.log)
        self.svc.add_listener("smtp", "tcp:2525:interface=127.0.0.1", self.factory)
        self.svc.add_listener("submissions", "ssl:4650:interface=127.0.0.1", self.factory)

    def test_listeners(self):
        """Each listener string is a StreamServerEndpointService; ssl: is wrapped in our TLS."""
        self.svc.privilegedStartService()
        self.svc.startService()
        self.addCleanup(self.pool.pool.stop)
        ports = [(port, type(factory)) for port, factory, _, _ in self.reactor.tcpServers]
        self.assertEqual(ports, [(2525, DrainingFactory), (4650, TLSMemoryBIOFactory)])
        self.assertTrue(all(isinstance(s, StreamServerEndpointService) for s in self.svc.listeners))
        self.assertTrue(self.pool.pool.started)

    def test_stopOrder(self):
        """Stop: listeners first, then drain (once per factory, with shutdown_grace),
        then the queue manager, and the thread pool last."""
        self.svc.privilegedStartService()
        self.svc.startService()
        d = self.svc.stopService()
        self.assertEqual(self.log, [("drain", 7.0)])  # the manager waits for the drain
        self.assertTrue(all(not s.running for s in self.svc.listeners))
        self.assertTrue(self.pool.pool.started)
        self.assertNoResult(d)
        self.factory.pending.callback(None)
        self.successResultOf(d)
        self.assertEqual(self.log, [("drain", 7.0), "manager stopped"])
        self.assertFalse(self.pool.pool.started)

    def notify_socket(self) -> socket.socket:
        """A datagram socket standing in for systemd's, named in $NOTIFY_SOCKET."""
        folder = tempfile.mkdtemp(prefix="ms")  # AF_UNIX paths are short (108 bytes)
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        self.addCleanup(sock.close)
        old = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = path
        self.addCleanup(
            lambda: os.environ.pop("NOTIFY_SOCKET") if old is None else os.environ.update(NOTIFY_SOCKET=old)
        )
        return sock

    def test_readyAfterListenersStoppingAtStop(self):
        """READY=1 goes to $NOTIFY_SOCKET when the service tree has started (listeners
        bound), STOPPING=1 when the stop begins."""
        sock = self.notify_socket()
        self.svc.privilegedStartService()
        self.assertRaises(BlockingIOError, sock.recv, 1024)  # bound, but not started yet
        self.svc.startService()
        self.addCleanup(self.pool.pool.stop)
        self.assertIn(b"READY=1", sock.recv(1024).split(b"\n"))
        self.svc.stopService()
        self.assertEqual(sock.recv(1024), b"STOPPING=1")
        self.factory.pending.callback(None)


class MakeServiceTests(SynchronousTestCase):
    def test_runtimeAndListeners(self):
        """make_service builds a Runtime providing IRuntime and one listener per string;
        an empty list builds none."""
        base = os.path.abspath(self.mktemp())
        listen = {"pop3": [], "smtp": ["tcp:2525", "tcp:2526"]}
        cfg = config.from_mapping({"data_dir": "data", "listen": listen}, base=base)
        tls, users, aliases = service.load_parts(cfg)
        svc = service.make_service(cfg, MemoryReactorClock(), tls, users, aliases)
        verifyObject(IRuntime, svc.runtime)
        kinds = [kind for kind, _ in svc.described]
        self.assertEqual(kinds, ["smtp", "smtp", "submission", "submissions", "pop3s"])

    def test_ownCertificateListenerNeedsOneProcess(self):
        """With session workers, an ssl: listener naming its own key is a start-up error
        (the workers serve TLS with [tls]'s certificate only), never a plaintext listener."""
        base = os.path.abspath(self.mktemp())
        service.load_parts(config.from_mapping({"data_dir": "data"}, base=base))  # makes data/tls/selfsigned.*
        tls = os.path.join(base, "data", "tls")
        own = f"ssl:4650:privateKey={tls}/selfsigned.key:certKey={tls}/selfsigned.pem"
        cfg = config.from_mapping(
            {"data_dir": "data", "listen": {"submissions": [own]}, "server": {"processes": 2}}, base=base
        )
        with self.assertRaises(service.StartupError) as e:
            service.make_service(cfg, MemoryReactorClock(), *service.load_parts(cfg))
        self.assertIn("server.processes = 1", str(e.exception))

    def test_metricsListener(self):
        """listen.metrics serves a MetricsSite on each endpoint and the runtime gets
        Metrics; without it, no metrics listener and NoMetrics."""
        base = os.path.abspath(self.mktemp())
        cfg = config.from_mapping(
            {"data_dir": "data", "listen": {"metrics": ["tcp:9125:interface=127.0.0.1"]}, "server": {"processes": 1}},
            base=base,
        )
        reactor = MemoryReactorClock()
        svc = service.make_service(cfg, reactor, *service.load_parts(cfg))
        self.assertIsInstance(svc.runtime.metrics, Metrics)
        self.assertIn(("metrics", "tcp:9125:interface=127.0.0.1"), svc.described)
        svc.privilegedStartService()
        sites = [f for port, f, _, _ in reactor.tcpServers if port == 9125]
        self.assertEqual([type(f) for f in sites], [MetricsSite])


class OptionsTests(SynchronousTestCase):
    def test_badConfigOneLine(self):
        """A bad config file ends option parsing with one line naming key and file."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('[relay]\nmax_queue_lifetime = "5 parsecs"\n')
        e = self.assertRaises(SystemExit, tap.Options().parseOptions, ["--config", path])
        self.assertIsInstance(e.code, str)
        self.assertNotIn("\n", e.code)
        self.assertIn("relay.max_queue_lifetime", e.code)
        self.assertIn(path, e.code)

    def test_goodConfig(self):
        """A good config is loaded and the start-up parts prepared (certificate made)."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "m.toml")
        with open(path, "w") as f:
            f.write('data_dir = "d"\n')
        options = tap.Options()
        options.parseOptions(["--config", path])
        self.assertEqual(options.config.data_dir, os.path.join(folder, "d"))
        self.assertTrue(os.path.exists(os.path.join(folder, "d", "tls", "selfsigned.pem")))


class SigtermTests(SynchronousTestCase):
    def test_sigtermIsGracefulBeforeAndAfterTheReactorStarts(self) -> None:
        """The handler is installed at once and is the one the reactor installs when it
        starts; it stops the reactor without recording the signal (twistd exits 0)."""
        import signal

        from twisted.internet.selectreactor import SelectReactor

        previous = signal.getsignal(signal.SIGTERM)
        self.addCleanup(signal.signal, signal.SIGTERM, previous)
        reactor = SelectReactor()
        tap.install_sigterm(reactor)
        handler = signal.getsignal(signal.SIGTERM)
        self.assertIs(reactor.sigTerm, handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        starting = reactor._signalsFactory()  # what startRunning installs
        starting.install()
        self.addCleanup(starting.uninstall)
        self.assertIs(signal.getsignal(signal.SIGTERM), handler)
        stops = []
        reactor.callFromThread = lambda f, *a: stops.append(f)
        handler(signal.SIGTERM, None)
        self.assertEqual(stops, [reactor.stop])
        self.assertIsNone(reactor._exitSignal)
