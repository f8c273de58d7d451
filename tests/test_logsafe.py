"""Tests for mailstack.logsafe: control characters escaped, length bounded."""

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailstack.logsafe import escape


class EscapeTests(SynchronousTestCase):
    def test_lineBreaksVisible(self) -> None:
        """CR, LF and TAB become \\r, \\n and \\t: a peer cannot forge a second log line."""
        self.assertEqual(escape("alice\r\nfake: root logged in\t!"), "alice\\r\\nfake: root logged in\\t!")

    def test_terminalEscapes(self) -> None:
        """ESC, NUL, DEL and the C1 CSI become \\xNN, so no terminal sequence survives."""
        self.assertEqual(escape("\x1b[2J\x00\x7f\x9b31m"), "\\x1b[2J\\x00\\x7f\\x9b31m")

    def test_unicodeFormatAndSeparators(self) -> None:
        """Bidi overrides and U+2028/U+2029 are shown as \\uNNNN; other non-ASCII text is kept."""
        self.assertEqual(
            escape("gr\u00fc\u00dfe \u202eevil\u2028x\u2029"), "gr\u00fc\u00dfe \\u202eevil\\u2028x\\u2029"
        )

    def test_bytesDecoded(self) -> None:
        """Bytes are read as UTF-8; invalid bytes and controls are both shown as \\xNN."""
        self.assertEqual(escape(b"ok \xc3\xa9 \xff\x1b"), "ok \u00e9 \\xff\\x1b")

    def test_plainTextUnchanged(self) -> None:
        """Printable ASCII, backslashes included, passes as it is."""
        text = "250 2.0.0 Ok: queued as 4F \\ <a@b>"
        self.assertEqual(escape(text), text)

    def test_everyAsciiCharacter(self) -> None:
        """Each ASCII character inside otherwise plain text: " " to "~" kept, every other
        one escaped (plain ASCII lines take a shortcut that must agree)."""
        named = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}
        for code in range(128):
            c = chr(code)
            shown = c if " " <= c <= "~" else named.get(c, f"\\x{code:02x}")
            self.assertEqual(escape(f"250 ok{c}x"), f"250 ok{shown}x", code)

    def test_bounded(self) -> None:
        """Input beyond the limit is cut and the cut is marked with how much was left out."""
        self.assertEqual(escape("a" * 10 + "\n" * 5, limit=12), "a" * 10 + "\\n\\n...(3 more)")
        self.assertLessEqual(len(escape("\x00" * 100_000)), 4 * 1000 + 20)


class EscapePropertyTests(SynchronousTestCase):
    @given(st.one_of(st.text(), st.binary()), st.integers(min_value=1, max_value=300))
    @settings(max_examples=300, deadline=None)
    def test_neverAControlCharacter(self, text, limit) -> None:
        """Whatever the input, the output has no C0/C1 control, DEL, line or paragraph separator."""
        out = escape(text, limit=limit)
        self.assertFalse([c for c in out if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cf", "Cs")], out)
        self.assertLessEqual(len(out), 10 * limit + 20)
