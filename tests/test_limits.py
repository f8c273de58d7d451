"""Tests for mailstack.limits: the RFC 5321 floors of the SMTP limits."""

from twisted.trial.unittest import SynchronousTestCase

from mailstack import config
from mailstack.limits import check_minimums


def smtp(**values):
    return config.from_mapping({"smtp": values})


class MinimumTests(SynchronousTestCase):
    def test_defaultsPass(self) -> None:
        """The embedded defaults are above every floor."""
        self.assertEqual(check_minimums(config.from_mapping({})), [])

    def test_zeroNoLongerMeansUnlimited(self) -> None:
        """max_line_length = 0 and max_message_size = 0 are each reported, naming the key and RFC section."""
        errors = check_minimums(smtp(max_line_length=0, max_message_size=0))
        self.assertEqual(len(errors), 2)
        self.assertTrue(errors[0].startswith("smtp.max_line_length = 0: must be at least 1000"), errors)
        self.assertIn("4.5.3.1.6", errors[0])
        self.assertTrue(errors[1].startswith("smtp.max_message_size = 0: must be at least 65536"), errors)
        self.assertIn("4.5.3.1.7", errors[1])

    def test_boundaries(self) -> None:
        """The floor itself is accepted, one below it is not."""
        self.assertEqual(check_minimums(smtp(max_line_length=1000, max_message_size=65536)), [])
        self.assertEqual(len(check_minimums(smtp(max_line_length=999, max_message_size=65535))), 2)
