"""Tests for mailstack.hygiene: Date and Message-ID for submitted messages that lack them."""

import email.utils
import re

from twisted.trial.unittest import SynchronousTestCase

from mailstack import hygiene
from mailstack.dkim.canon import header_fields

NOW = 1796378400.25  # Fri, 04 Dec 2026 10:00:00 UTC


class HygieneTests(SynchronousTestCase):
    def test_bothMissing(self):
        """A message with neither gets a Date in UTC and a Message-ID at our hostname."""
        date, mid = hygiene.missing_fields(header_fields(b"From: a@example.org\r\n"), "mx.example.org", NOW)
        self.assertEqual(date, b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n")
        self.assertEqual(email.utils.parsedate_to_datetime(date[6:].decode()).timestamp(), int(NOW))
        self.assertRegex(mid.decode(), r"^Message-ID: <[0-9a-f]+\.[0-9a-f]{16}@mx\.example\.org>\r\n$")

    def test_presentUntouched(self):
        """Present fields (any case) are never replaced: nothing to add."""
        fields = header_fields(b"DATE: yesterday\r\nmessage-id: <x@y>\r\n")
        self.assertEqual(hygiene.missing_fields(fields, "mx.example.org", NOW), [])

    def test_onlyMissingOne(self):
        """Only the missing field is returned."""
        fields = header_fields(b"Date: Thu, 03 Dec 2026 09:00:00 +0100\r\n")
        [added] = hygiene.missing_fields(fields, "mx.example.org", NOW)
        self.assertTrue(added.startswith(b"Message-ID: <"))

    def test_unique(self):
        """Message-IDs made in the same millisecond differ."""
        ids = {hygiene.message_id("h.example", NOW) for _ in range(1000)}
        self.assertEqual(len(ids), 1000)
        self.assertTrue(all(re.fullmatch(r"<[^<>@\s]+@h\.example>", i) for i in ids))
