"""Hostile input against the pure parsers and generators: address.py, smtp/data.py,
queue/dsn.py and intake's Received: header.

Properties: parsers either accept or raise their own error (never another
exception); no address of any form yields a mailbox path outside
``data_dir/mail``; DATA decoding does not depend on how the bytes were split;
generated headers and DSNs are CRLF-only, within the RFC 5322 line limit and
free of client-supplied control characters, whatever went into them.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import unicodedata

from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import Address, AddressError, mailbox_components, parse_address, parse_path
from mailstack.envelope import Destination, Envelope
from mailstack.intake import received_header
from mailstack.queue import dsn
from mailstack.queue.entry import QueueEntry, RecipientState
from mailstack.smtp.data import DataDecoder
from mailstack.storage.maildir import MaildirStore
from tests.hostile.support import FAST
from tests.smtp.data_reference import decode_reference

ROOT = "/srv/mailstack-data/mail"

# Pieces that matter to path and address parsing.
PIECES = ["..", ".", "/", "\\", "\x00", "@", "%", "!", ":", ",", '"', "<", ">", "[", "]", "IPv6:", "::1", "127.0.0.1",
          "localhost", "LOCALHOST", "xn--", "bücher", "ß", "İ", "\u200b", "\u202e", "../../etc", "~", " ", "\t",
          "\r", "\n", "a", "Z", "9", "-", "postmaster",
          "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]
address_text = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=10)), max_size=12).map("".join)


def assert_inside(case: SynchronousTestCase, path: str) -> None:
    real = os.path.normpath(path)
    case.assertTrue(real.startswith(ROOT + os.sep), path)
    rel = os.path.relpath(real, ROOT).split(os.sep)
    case.assertEqual(len(rel), 2, path)  # exactly <domain>/<local>
    for part in rel:
        case.assertNotIn(part, ("", ".", ".."))
        # UTF-8 local parts (RFC 6531) name their own folder: printable, no format or space characters.
        case.assertTrue(part.isprintable() and not any(unicodedata.category(c)[0] in "CZ" for c in part), part)


class AddressTests(SynchronousTestCase):
    @FAST
    @given(text=address_text)
    def test_parsersOnlyRaiseAddressError(self, text: str) -> None:
        """parse_path / parse_address on any text: an Address (or None for <>) or AddressError, nothing else."""
        for f in (lambda t: parse_path(t, null_ok=True), parse_path, parse_address,
                  lambda t: parse_path("<" + t + ">"), lambda t: parse_path("<@" + t + ":" + t + ">")):
            try:
                result = f(text)
            except AddressError:
                continue
            self.assertTrue(result is None or isinstance(result, Address))

    @FAST
    @given(text=address_text)
    def test_noPathEscapesDataDir(self, text: str) -> None:
        """Whatever parse_path/parse_address accept, mailbox_components gives a path of exactly
        <domain>/<local> under data_dir/mail, or AddressError."""
        for candidate in (text, "<" + text + ">", text + "@localhost", "<" + text + "@localhost>",
                          "<x@" + text + ">", '<"' + text + '"@localhost>'):
            try:
                a = parse_path(candidate) if candidate.startswith("<") else parse_address(candidate)
            except AddressError:
                continue
            self.assert_safe(a)

    @FAST
    @given(local=address_text, domain=address_text)
    def test_rawAddressesNeverEscape(self, local: str, domain: str) -> None:
        """Even an Address built without the parser (a corrupt queue entry, a config typo) cannot escape."""
        self.assert_safe(Address(local, domain))

    def assert_safe(self, a: Address) -> None:
        try:
            domain, local = mailbox_components(a)
        except AddressError:
            return
        assert_inside(self, os.path.join(ROOT, domain, local))
        try:
            path = MaildirStore(ROOT, hostname="h").path_for(a)
        except AddressError:
            self.fail(f"path_for refused what mailbox_components accepted: {a!r}")
        assert_inside(self, path)

    def test_knownEscapes(self) -> None:
        """The classic traversal and confusion forms are all refused as mailbox names."""
        bad = ['"../../etc/passwd"@localhost', '"..\\/x"@localhost', '"a/b"@localhost', '".."@localhost',
               '"."@localhost', '"a\\\x00b"@localhost', "x@[127.0.0.1]", "x@[IPv6:::1]", '"\\.."@localhost',
               '" "@localhost']
        for text in bad:
            try:
                a = parse_address(text)
            except AddressError:
                continue
            with self.assertRaises(AddressError, msg=text):
                mailbox_components(a)

    @FAST
    @given(text=address_text)
    def test_roundTrip(self, text: str) -> None:
        """str(Address) re-parses to the same Address (what goes into queue JSON comes back unchanged)."""
        try:
            a = parse_address(text)
        except AddressError:
            return
        self.assertEqual(parse_address(str(a)), a)
        self.assertEqual(parse_path("<" + str(a) + ">"), a)


class DataDecoderTests(SynchronousTestCase):
    stream = st.lists(st.one_of(st.binary(max_size=50), st.sampled_from(
        [b"\r\n", b"\r", b"\n", b".", b"\r\n.", b"\r\n..", b"\x00", b"\r\n.\r\n", b"\r\r\n", b"\r\n.\r"])),
        max_size=40).map(b"".join)

    @FAST
    @given(raw=stream, cuts=st.lists(st.integers(0, 3000), max_size=15))
    def test_segmentationInvariant(self, raw: bytes, cuts: list[int]) -> None:
        """Size, end and the bare-newline verdict are the same for any split of the input; so is the
        content of every message that is not refused; it agrees with the line-by-line reference decoder."""
        def run(pieces: list[bytes]):
            out: list[bytes] = []
            d = DataDecoder(out.append, max_size=0)
            rest = None
            for p in pieces:
                rest = d.feed(p)
                if rest is not None:
                    break
            return b"".join(out), rest, d.size, d.bare_newline, d.done

        whole = run([raw])
        points = sorted(c % (len(raw) + 1) for c in cuts)
        pieces = [raw[a:b] for a, b in zip([0] + points, points + [len(raw)], strict=True)]
        split = run(pieces)
        # With a bare CR/LF the message is refused (550 5.6.0) and what reached the sink is
        # discarded, so only the verdict must agree; otherwise the content too.
        self.assertEqual(whole[2:], split[2:])
        if not whole[3]:
            self.assertEqual(whole[0], split[0])
        ref = decode_reference(raw)
        if whole[4]:
            self.assertIsNotNone(ref)
            if not whole[3]:
                self.assertEqual((whole[0], whole[1]), ref)
        else:
            self.assertFalse(whole[4])


def _entry(sender: str, rcpts: list[tuple[str, str, str, str]]) -> QueueEntry:
    return QueueEntry(
        id="Q1", sender=sender, arrival=1_700_000_000.0,
        recipients=[RecipientState(address=a, original=o, local=False, status="failed", last_reply=r, last_host=h,
                                   history=[{"time": 1_700_000_100.0, "host": h, "reply": r}])
                    for a, o, r, h in rcpts],
    )


hostile = st.text(max_size=300)


class GeneratedHeaderTests(SynchronousTestCase):
    def check_lines(self, data: bytes, ascii_only: bool = True) -> None:
        self.assertTrue(data.endswith(b"\r\n"))
        self.assertEqual(data.count(b"\r"), data.count(b"\r\n"), "bare CR")
        self.assertEqual(data.count(b"\n"), data.count(b"\r\n"), "bare LF")
        for line in data.split(b"\r\n"):
            self.assertLessEqual(len(line), 998, line[:80])
            if ascii_only:
                self.assertTrue(line.isascii(), line[:200])
                self.assertIsNone(re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", line), line[:200])

    @FAST
    @given(sender=hostile, address=hostile, original=hostile, reply=hostile, host=hostile,
           headers=st.binary(max_size=400), action=st.sampled_from([dsn.FAILED, dsn.DELAYED]))
    def test_dsnWellFormed(self, sender, address, original, reply, host, headers, action) -> None:
        """A DSN built from hostile replies, hosts, addresses and original headers: CRLF only, lines
        within 998 octets, generated parts ASCII without controls, and it parses as a 3-part report."""
        assume(sender)
        e = _entry(sender, [(address, original, reply, host)])
        out = dsn.build(hostname="mx.example.org", entry=e, recipients=e.recipients, action=action,
                        original_headers=headers, now=1_700_000_200.0,
                        message_id=dsn.make_message_id("mx.example.org", "Q1", 1_700_000_200.0))
        generated, sep, returned = out.partition(b"Content-Type: text/rfc822-headers\r\n")
        self.assertTrue(sep)
        self.check_lines(generated)
        self.check_lines(out, ascii_only=False)
        msg = email.message_from_bytes(out, policy=email.policy.compat32)
        self.assertEqual(msg.get_content_type(), "multipart/report")
        parts = msg.get_payload()
        self.assertEqual(len(parts), 3, out[:2000])
        self.assertEqual(parts[1].get_content_type(), "message/delivery-status")

    @FAST
    @given(helo=hostile, peer=hostile, protocol=hostile, tls=hostile, local=address_text)
    def test_receivedHeaderWellFormed(self, helo, peer, protocol, tls, local) -> None:
        """Received: from any HELO, peer, protocol and TLS text: one folded ASCII header, CRLF only,
        short lines, no controls, nothing that could start a new header or end the header section."""
        try:
            rcpt = parse_address(local + "@example.org")
        except AddressError:
            rcpt = Address("alice", "example.org")
        env = Envelope(sender=None, recipients=(Destination(rcpt, rcpt, True),), helo=helo, peer=peer,
                       protocol=protocol, tls=tls)
        out = received_header(env, "mx.example.org", "Q1", 1_700_000_000.0)
        self.check_lines(out)
        lines = out.split(b"\r\n")[:-1]
        self.assertTrue(lines[0].startswith(b"Received: "))
        for line in lines[1:]:
            self.assertTrue(line.startswith((b"\t", b" ")), line)  # continuation lines only
            self.assertTrue(line.strip(), "an empty line would end the header section")
