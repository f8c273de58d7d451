"""Tests for mailstack.address: RFC 5321 paths, open-relay tricks, path safety."""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import Address, AddressError, mailbox_components, normalize_domain, parse_address, parse_path


class ParseTests(SynchronousTestCase):
    def test_simple(self):
        """<local@domain> parses; the domain is lowercased, the local part kept."""
        a = parse_path("<Alice@Example.ORG>")
        self.assertEqual(a, Address("Alice", "example.org"))
        self.assertEqual(a.key, "alice@example.org")
        self.assertEqual(str(a), "Alice@example.org")

    def test_nullPath(self):
        """<> is the null reverse-path only where allowed (MAIL FROM)."""
        self.assertIsNone(parse_path("<>", null_ok=True))
        self.assertRaises(AddressError, parse_path, "<>")

    def test_brackets(self):
        """Paths need angle brackets (RFC 5321 4.1.2)."""
        self.assertRaises(AddressError, parse_path, "alice@example.org")

    def test_postmasterWithoutDomain(self):
        """<postmaster> is refused here; RCPT handles it before (4.1.1.3)."""
        self.assertRaises(AddressError, parse_path, "<postmaster>")
        self.assertTrue(parse_address("PostMaster@localhost").is_postmaster)

    def test_quotedLocal(self):
        """A quoted local part is unquoted; str() quotes it again."""
        a = parse_path('<"john doe"@example.org>')
        self.assertEqual(a.local, "john doe")
        self.assertEqual(str(a), '"john doe"@example.org')
        self.assertEqual(parse_path(r'<"a\"b"@example.org>').local, 'a"b')

    def test_idna(self):
        """IDNA domains are compared as lowercase A-labels."""
        self.assertEqual(parse_address("u@Bücher.Example").domain, "xn--bcher-kva.example")
        self.assertEqual(parse_address("u@XN--BCHER-KVA.example").domain, "xn--bcher-kva.example")
        self.assertRaises(AddressError, parse_address, "u@-bad-.example")

    def test_limits(self):
        """Local part over 64 octets and paths over 256 are refused (4.5.3.1)."""
        self.assertRaises(AddressError, parse_address, "a" * 65 + "@example.org")
        parse_address("a" * 64 + "@example.org")
        too_long = "<" + "a" * 60 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + ".eeee.org>"
        self.assertRaises(AddressError, parse_path, too_long)

    def test_controlCharacters(self):
        """NUL, CR, LF and other controls are refused anywhere."""
        for text in ["a\x00b@example.org", "a@exa\rmple.org", '"a\nb"@example.org', "a\x7f@example.org"]:
            self.assertRaises(AddressError, parse_address, text)


class RelayTrickTests(SynchronousTestCase):
    """Tricks that once made servers relay: each parses to a *local* address or fails."""

    def test_percentHack(self):
        """user%remote@local is the local part "user%remote" of the local domain."""
        a = parse_path("<user%remote.example@localhost>")
        self.assertEqual((a.local, a.domain), ("user%remote.example", "localhost"))

    def test_sourceRoute(self):
        """A source route is accepted and ignored (RFC 5321 4.1.2, appendix C)."""
        self.assertEqual(parse_path("<@relay.example,@other.example:user@localhost>"), Address("user", "localhost"))
        self.assertRaises(AddressError, parse_path, "<@relay.example:>")
        self.assertRaises(AddressError, parse_path, "<@relay.example user@localhost>")
        self.assertRaises(AddressError, parse_path, "<@bad..example:user@localhost>")

    def test_quotedAt(self):
        """A quoted '@' stays in the local part; the domain is the last one."""
        a = parse_path('<"user@remote.example"@localhost>')
        self.assertEqual((a.local, a.domain), ("user@remote.example", "localhost"))
        self.assertRaises(AddressError, mailbox_components, a)

    def test_unquotedDoubleAt(self):
        """Two unquoted '@' are no address."""
        self.assertRaises(AddressError, parse_path, "<user@remote.example@localhost>")

    def test_bangPath(self):
        """remote!user@local is the local part "remote!user" of the local domain."""
        a = parse_path("<remote.example!user@localhost>")
        self.assertEqual((a.local, a.domain), ("remote.example!user", "localhost"))

    def test_trailingDots(self):
        """A trailing dot in the domain or local part is refused."""
        for text in ["<user@localhost.>", "<user.@localhost>", "<.user@localhost>", "<us..er@localhost>"]:
            self.assertRaises(AddressError, parse_path, text)

    def test_ipLiterals(self):
        """Address literals parse as such (never equal to a local domain name)."""
        self.assertEqual(parse_path("<u@[192.0.2.1]>").domain, "[192.0.2.1]")
        self.assertEqual(parse_path("<u@[IPv6:2001:db8::1]>").domain, "[IPv6:2001:db8::1]")
        self.assertRaises(AddressError, parse_path, "<u@[300.0.0.1]>")
        self.assertRaises(AddressError, parse_path, "<u@192.0.2.1.>")


class MailboxComponentTests(SynchronousTestCase):
    """Only safe single path components come out of mailbox_components."""

    def test_safe(self):
        """A normal address gives (domain, lowercased local part)."""
        self.assertEqual(mailbox_components(parse_address("Alice.B+tag@Example.org")), ("example.org", "alice.b+tag"))

    def test_unsafe(self):
        """Slashes, dot-dot, spaces, literals and quoted oddities cannot name a mailbox."""
        for address in [
            Address("../x", "localhost"),
            Address("a/b", "localhost"),
            Address("..", "localhost"),
            Address(".", "localhost"),
            Address("a b", "localhost"),
            Address("a\x00b", "localhost"),
            Address("a", "[127.0.0.1]"),
            Address("a", "../etc"),
            Address("", "localhost"),
        ]:
            self.assertRaises(AddressError, mailbox_components, address)

    def test_quotedPathsRefusedAtParseOrComponents(self):
        """Quoted '../x' and 'a/b' parse, but never become path components."""
        for text in ['"../x"@localhost', '"a/b"@localhost', '".."@localhost']:
            self.assertRaises(AddressError, mailbox_components, parse_address(text))
        for text in ["../x@localhost", "a/b@localhost"]:
            self.assertRaises(AddressError, lambda t=text: mailbox_components(parse_address(t)))

    @given(st.text(max_size=80))
    def test_componentsNeverEscape(self, local):
        """Whatever the local part, an accepted component has no '/', NUL, and is not '.' or '..'."""
        try:
            domain, part = mailbox_components(Address(local, "localhost"))
        except AddressError:
            return
        self.assertNotIn("/", part)
        self.assertNotIn("\x00", part)
        self.assertNotIn(part, (".", ".."))
        self.assertFalse(part.startswith("."))


class DomainTests(SynchronousTestCase):
    def test_normalize(self):
        """Domains lowercase; empty, '..' and over-long ones are refused."""
        self.assertEqual(normalize_domain("Example.ORG"), "example.org")
        for bad in ["", "a..b", "a." * 130, "exa mple.org", "exa_mple.org"]:
            self.assertRaises(AddressError, normalize_domain, bad)
