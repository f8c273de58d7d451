"""The shared fakes provide the interfaces of the parts they stand for, so tests over them mean something."""

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack import config as configmod
from mailstack.interfaces import (
    IAliasDB,
    IIncoming,
    IIntake,
    ILoginThrottle,
    IRouter,
    IRuntime,
    ITLSSettings,
    IUserDB,
)
from tests.support.fakes import (
    FakeAliases,
    FakeChecker,
    FakeIncoming,
    FakeIntake,
    FakeRouter,
    FakeThrottle,
    FakeTLS,
    FakeUsers,
)
from tests.support.runtime import fake_runtime
from tests.support.transports import ImplicitTLSTransport, TLSStringTransport


class FakesProvideInterfacesTests(SynchronousTestCase):
    def test_fakes(self) -> None:
        """Every fake verifies against the interface of the real part."""
        intake = FakeIntake()
        for iface, fake in [
            (IIntake, intake),
            (IIncoming, FakeIncoming(intake, None)),
            (IRouter, FakeRouter()),
            (IAliasDB, FakeAliases()),
            (ILoginThrottle, FakeThrottle()),
            (ICredentialsChecker, FakeChecker()),
            (ITLSSettings, FakeTLS()),
            (IUserDB, FakeUsers({})),
        ]:
            self.assertTrue(verifyObject(iface, fake), fake)

    def test_runtime(self) -> None:
        """The fake runtime is the real Runtime class over fakes: IRuntime holds."""
        self.assertTrue(verifyObject(IRuntime, fake_runtime(configmod.from_mapping({}))))

    def test_transports(self) -> None:
        """TLSStringTransport can start TLS and then is an ISSLTransport; the implicit one is from the start."""
        t = TLSStringTransport()
        self.assertTrue(ITLSTransport.providedBy(t))
        self.assertFalse(ISSLTransport.providedBy(t))
        t.startTLS(FakeTLS().context_factory())
        self.assertTrue(ISSLTransport.providedBy(t))
        self.assertTrue(ISSLTransport.providedBy(ImplicitTLSTransport()))

    def test_checker(self) -> None:
        """FakeChecker accepts the known passwords only; manual checks wait; error fails all."""
        from twisted.cred.credentials import UsernamePassword
        from twisted.cred.error import UnauthorizedLogin

        checker = FakeChecker()
        self.assertEqual(
            self.successResultOf(checker.requestAvatarId(UsernamePassword(b"Alice@localhost", b"secret"))),
            "alice@localhost",
        )
        self.failureResultOf(checker.requestAvatarId(UsernamePassword(b"alice@localhost", b"x")), UnauthorizedLogin)
        checker.manual = True
        self.assertNoResult(checker.requestAvatarId(UsernamePassword(b"alice@localhost", b"secret")))
        self.assertEqual(len(checker.pending), 1)
