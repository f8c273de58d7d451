"""RFC 3461 parameter values: xtext, NOTIFY, ORCPT, RET, ENVID."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailstack import dsnparams as P


class XtextTests(SynchronousTestCase):
    def test_decode(self) -> None:
        """hexchar is '+' and two upper-case hex digits (RFC 3461 section 4)."""
        self.assertEqual(P.xtext_decode("a+2Bb+3Dc"), "a+b=c")
        self.assertEqual(P.xtext_decode(""), "")

    def test_malformed(self) -> None:
        """A lone '+', lower-case hex, '=', a space, non-ASCII or a decoded control character are refused."""
        for bad in ("+", "+2", "+2b", "a=b", "a b", "é", "+0A", "+7F", "+ZZ"):
            self.assertRaises(P.DSNParamError, P.xtext_decode, bad)

    @given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
    def test_roundTrip(self, text: str) -> None:
        """Encoding then decoding gives the text back."""
        self.assertEqual(P.xtext_decode(P.xtext_encode(text)), text)


class ValueTests(SynchronousTestCase):
    def test_notify(self) -> None:
        """NEVER alone, or distinct SUCCESS/FAILURE/DELAY in any case."""
        self.assertEqual(P.parse_notify("never"), ("NEVER",))
        self.assertEqual(P.parse_notify("Delay,SUCCESS"), ("DELAY", "SUCCESS"))
        for bad in ("", "NEVER,SUCCESS", "SUCCESS,SUCCESS", "ALWAYS", "SUCCESS,"):
            self.assertRaises(P.DSNParamError, P.parse_notify, bad)

    def test_orcpt(self) -> None:
        """addr-type ';' xtext, decoded; the type lower-cased."""
        self.assertEqual(P.parse_orcpt("RFC822;a+2Bb@x.test"), "rfc822;a+b@x.test")
        for bad in ("rfc822", ";a@b", "rfc822;", "rf c;a", "rfc822;a+G1", "rfc822;" + "a" * 600):
            self.assertRaises(P.DSNParamError, P.parse_orcpt, bad)
        self.assertEqual(P.orcpt_param("rfc822;a+b@x.test"), "rfc822;a+2Bb@x.test")

    def test_retEnvid(self) -> None:
        """RET is FULL or HDRS; ENVID is xtext of at most 100 characters."""
        self.assertEqual(P.parse_ret("hdrs"), "HDRS")
        self.assertRaises(P.DSNParamError, P.parse_ret, "BODY")
        self.assertEqual(P.parse_envid("Q+2B1"), "Q+1")
        self.assertRaises(P.DSNParamError, P.parse_envid, "x" * 101)
        self.assertRaises(P.DSNParamError, P.parse_envid, "")
