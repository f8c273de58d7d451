"""Tests for mailstack.smtp.syntax: MAIL FROM and RCPT TO arguments as tables."""

from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import Address
from mailstack.smtp import replies as R
from mailstack.smtp.syntax import (
    MailFrom,
    RcptTo,
    parse_mail_from,
    parse_rcpt,
    parse_rcpt_to,
)

ALICE = Address("alice", "example.org")


class MailFromTests(SynchronousTestCase):
    def test_accepted(self) -> None:
        """Paths with the known ESMTP parameters (RFC 1870, 6152, 4954 section 5) parse."""
        table = [
            ("FROM:<alice@example.org>", False, MailFrom(ALICE)),
            ("from:<alice@example.org>", False, MailFrom(ALICE)),
            ("FROM: <alice@example.org>", False, MailFrom(ALICE)),
            ("FROM:<>", False, MailFrom(None)),
            ("FROM:<alice@example.org> SIZE=1000", True, MailFrom(ALICE, size=1000, params={"SIZE": "1000"})),
            (
                "FROM:<alice@example.org> BODY=8bitmime",
                True,
                MailFrom(ALICE, body="8BITMIME", params={"BODY": "8bitmime"}),
            ),
            ("FROM:<alice@example.org> AUTH=<>", True, MailFrom(ALICE, params={"AUTH": "<>"})),
            ('FROM:<"a b"@example.org>', False, MailFrom(Address("a b", "example.org"))),
        ]
        for arg, esmtp, expected in table:
            self.assertEqual(parse_mail_from(arg, esmtp, 10000), expected, arg)

    def test_refused(self) -> None:
        """Each malformed argument gets the reply the server sends for it."""
        table = [
            ("TO:<alice@example.org>", True, R.SYNTAX),
            ("FROM:alice@example.org", True, R.BAD_SENDER),
            ("FROM:<alice@@example.org>", True, R.BAD_SENDER),
            ("FROM:<alice@example.org> SIZE=10", False, R.UNKNOWN_PARAMETER),  # HELO: no parameters
            ("FROM:<alice@example.org> SIZE=x", True, R.SYNTAX),
            ("FROM:<alice@example.org> SIZE=" + "9" * 21, True, R.SYNTAX),
            ("FROM:<alice@example.org> SIZE=10001", True, R.MESSAGE_TOO_BIG),
            ("FROM:<alice@example.org> BODY=BINARYMIME", True, R.SYNTAX),
            ("FROM:<alice@example.org> AUTH", True, R.UNKNOWN_PARAMETER),
            ("FROM:<alice@example.org> SMTPUTF8=x", True, R.UNKNOWN_PARAMETER),
            ("FROM:<alice@example.org> SIZE=1 SIZE=1", True, R.SYNTAX),
            ("FROM:<alice@example.org> RET=ALL", True, R.BAD_DSN_PARAMETER),
            ("FROM:<alice@example.org> ENVID=a+2", True, R.BAD_DSN_PARAMETER),
            ("FROM:<jörg@example.org>", True, R.NEED_SMTPUTF8),
            ("FROM:<j\ufffdrg@example.org> SMTPUTF8", True, R.BAD_UTF8),
            ("FROM:<alice@example.org> =x", True, R.SYNTAX),
        ]
        for arg, esmtp, expected in table:
            self.assertIs(parse_mail_from(arg, esmtp, 10000), expected, arg)

    def test_noSizeLimit(self) -> None:
        """max_size 0 accepts any SIZE."""
        self.assertEqual(
            parse_mail_from("FROM:<> SIZE=99999999999", True, 0),
            MailFrom(None, size=99999999999, params={"SIZE": "99999999999"}),
        )


class RcptToTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Forward-paths parse; bare <postmaster> is postmaster at the given domain (RFC 5321 4.1.1.3)."""
        table = [
            ("TO:<alice@example.org>", ALICE),
            ("to: <alice@example.org>", ALICE),
            ("TO:<Postmaster>", Address("postmaster", "mx.test")),
            ("TO:<@relay.test:alice@example.org>", ALICE),
            ("FROM:<alice@example.org>", R.SYNTAX),
            ("TO:alice@example.org", R.BAD_RECIPIENT),
            ("TO:<>", R.BAD_RECIPIENT),
            ("TO:<alice>", R.BAD_RECIPIENT),
            ("TO:<alice@example.org> NOTIFY=NEVER", ALICE),
            ("TO:<alice@example.org> XFOO=1", R.UNKNOWN_PARAMETER),
            ("TO:<alice@example.org> NOTIFY=NEVER,DELAY", R.BAD_DSN_PARAMETER),
            ("TO:<alice@example.org> ORCPT=rfc822;a+ZZ", R.BAD_DSN_PARAMETER),
            ("TO:<alice@example.org> NOTIFY=DELAY NOTIFY=DELAY", R.SYNTAX),
            ("TO:<álice@example.org>", R.NEED_SMTPUTF8),
        ]
        for arg, expected in table:
            self.assertEqual(parse_rcpt_to(arg, "mx.test"), expected, arg)


class ExtensionParameterTests(SynchronousTestCase):
    def test_dsnMail(self) -> None:
        """RET and ENVID are parsed (ENVID xtext-decoded)."""
        parsed = parse_mail_from("FROM:<a@b.test> RET=hdrs ENVID=QQ+2B1", True, 0)
        assert isinstance(parsed, MailFrom)
        self.assertEqual((parsed.ret, parsed.envid, parsed.smtputf8), ("HDRS", "QQ+1", False))

    def test_dsnRcpt(self) -> None:
        """NOTIFY and ORCPT are parsed into RcptTo."""
        self.assertEqual(
            parse_rcpt("TO:<alice@example.org> NOTIFY=success,FAILURE ORCPT=rfc822;Alice+40example.org"),
            RcptTo("<alice@example.org>", ("SUCCESS", "FAILURE"), "rfc822;Alice@example.org"),
        )

    def test_utf8(self) -> None:
        """With SMTPUTF8, UTF-8 local parts and U-label domains parse (the domain as A-label)."""
        parsed = parse_mail_from("FROM:<jörg@exämple.test> SMTPUTF8", True, 0)
        assert isinstance(parsed, MailFrom)
        self.assertEqual(parsed.sender, Address("jörg", "xn--exmple-cua.test"))
        self.assertTrue(parsed.smtputf8)
        self.assertEqual(
            parse_rcpt_to("TO:<josé@example.org>", "mx.test", smtputf8=True), Address("josé", "example.org")
        )
