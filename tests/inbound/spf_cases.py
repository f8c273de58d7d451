"""SPF evaluation cases, written from the text of RFC 7208.

Each ``Case`` is one check_host() run: the zone the in-memory resolver
serves (``BASE`` below, plus the case's own names), the client address, the
MAIL FROM and HELO, the result(s) the RFC allows and, where the RFC says what
it is, the explanation.  Where the RFC leaves a choice, ``expect`` lists every
result it allows and the description says why.

Conventions: the client is 192.0.2.10 (or 2001:db8::10); the sender is
``first-last@mail.example.org``, whose record ``rec()`` puts at
``mail.example.org``; the checking host is ``receiver.example`` and the clock
reads 1700000000; a fail without a usable ``exp=`` explains "DEFAULT".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CLIENT4 = "192.0.2.10"
CLIENT6 = "2001:db8::10"
DOMAIN = "mail.example.org"
SENDER = f"first-last@{DOMAIN}"
HELO = "mta.example.org"
# %{i} of CLIENT6 (section 7.3): 32 nibbles, dot-separated.
NIBBLES6 = "2.0.0.1.0.d.b.8.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0"
PTR4 = "10.2.0.192.in-addr.arpa"
PTR6 = ".".join(reversed(NIBBLES6.split("."))) + ".ip6.arpa"

Zone = dict[str, list[Any]]

# Names every case can use.
BASE: Zone = {
    "yes.example.net": [("A", CLIENT4), ("AAAA", CLIENT6)],  # the client's addresses
    "no.example.net": [("A", "198.51.100.1"), ("AAAA", "2001:db8:ffff::1")],
    "near.example.net": [("A", "192.0.2.200"), ("AAAA", "2001:db8::ff00")],  # same /24 and /64
    "v4only.example.net": [("A", CLIENT4)],
    "v6only.example.net": [("AAAA", CLIENT6)],
    "txtonly.example.net": [("TXT", "hello")],  # exists, but has no address (void for A)
    "mx-yes.example.net": [("MX", (10, "no.example.net")), ("MX", (20, "yes.example.net"))],
    "mx-no.example.net": [("MX", (10, "no.example.net"))],
    "mx-near.example.net": [("MX", (10, "near.example.net"))],
    "pass.example.net": [("TXT", "v=spf1 +all")],
    "fail.example.net": [("TXT", "v=spf1 -all")],
    "softfail.example.net": [("TXT", "v=spf1 ~all")],
    "neutral.example.net": [("TXT", "v=spf1 ?all")],
    "none.example.net": [("TXT", "not an spf record"), ("A", "198.51.100.1")],
    "perm.example.net": [("TXT", "v=spf1 nonsense")],
    "temp.example.net": ["SERVFAIL"],
    "slow.example.net": ["TIMEOUT"],
    "broken-a.example.net": [("TXT", "v=spf1 a -all"), "TIMEOUT"],  # its A lookup times out
}


@dataclass(frozen=True)
class Case:
    """One check_host() run and what RFC 7208 says it gives."""

    name: str
    section: str
    description: str
    zone: Zone
    expect: tuple[str, ...]
    ip: str = CLIENT4
    mail_from: str = SENDER
    helo: str = HELO
    explanation: str | None = None


CASES: list[Case] = []


def rec(record: str | list[str], extra: Zone | None = None) -> Zone:
    """A zone with ``record`` as the TXT record of the sender's domain."""
    return {DOMAIN: [("TXT", record)], **(extra or {})}


def case(name: str, section: str, description: str, zone: Zone, expect: str | tuple[str, ...], **kw: Any) -> None:
    CASES.append(Case(name, section, description, zone, (expect,) if isinstance(expect, str) else expect, **kw))


def macro(name: str, section: str, description: str, text: str, expanded: str, **kw: Any) -> None:
    """A macro case seen through the explanation: ``text`` is the exp TXT record."""
    zone = rec("v=spf1 -all exp=why.example.org", {"why.example.org": [("TXT", text)], **kw.pop("zone", {})})
    case(name, section, description, zone, "fail", explanation=expanded, **kw)


def spec(name: str, section: str, description: str, domain_spec: str, queried: str, **kw: Any) -> None:
    """A macro case seen through a query: ``exists:<domain_spec>`` passes only
    if it expands to ``queried``."""
    zone = rec(f"v=spf1 exists:{domain_spec} -all", {queried: [("A", "127.0.0.2")], **kw.pop("zone", {})})
    case(name, section, description, zone, "pass", **kw)


# --- Record selection (sections 3, 4.4, 4.5) ----------------------------------

case("no-txt-at-all", "4.5", "A domain with no TXT records has no SPF record: none.", {DOMAIN: [("A", "198.51.100.1")]}, "none")
case("nxdomain", "4.3", "A sender domain that does not exist gives none.", {}, "none")
case("only-other-txt", "4.5", "TXT records not starting with v=spf1 are discarded: none.", rec("some verification token"), "none")
case("spf10-not-spf1", "4.5", "v=spf10 is not the version v=spf1: discarded, none.", rec("v=spf10 +all"), "none")
case("spf2-not-spf1", "4.5", "A Sender ID record (spf2.0/...) is not an SPF record.", rec("spf2.0/pra +all"), "none")
case("version-needs-space", "4.5", "v=spf1 must be followed by a space or the end: 'v=spf1-all' is not a record.", rec("v=spf1-all"), "none")
case("bare-version", "4.7", "'v=spf1' alone is a record with no terms: neutral.", rec("v=spf1"), "neutral")
case("spf-among-others", "4.5", "The SPF record is picked out of other TXT records.",
     {DOMAIN: [("TXT", "token=abc"), ("TXT", "v=spf1 ip4:192.0.2.10 -all"), ("TXT", "other")]}, "pass")
case("leading-space", "4.5", "A record must begin with v=spf1: one starting with a space is not an SPF record.",
     rec(" v=spf1 -all"), "none")
case("two-records", "4.5", "Two v=spf1 records at one name: permerror.",
     {DOMAIN: [("TXT", "v=spf1 +all"), ("TXT", "v=spf1 -all")]}, "permerror")
case("two-identical-records", "4.5", "Even two identical records are permerror.",
     {DOMAIN: [("TXT", "v=spf1 -all"), ("TXT", "v=spf1 -all")]}, "permerror")
case("strings-joined", "3.3", "A TXT record of several strings is their concatenation without added spaces.",
     rec(["v=spf1 ip4:192.0.2.1", "0 -all"]), "pass")
case("strings-joined-space", "3.3", "Strings split at a space join back into separate terms.",
     rec(["v=spf1 ip4:198.51.100.1 ", "-all"]), "fail")
case("trailing-junk-term", "4.6", "A term that is neither mechanism nor modifier after -all still makes the record permerror.",
     rec("v=spf1 -all junk"), "permerror")
case("trailing-bad-ip4", "4.6", "A syntax error after a matching term is still permerror: the whole record is parsed first.",
     rec("v=spf1 +all ip4:192.0.2"), "permerror")
case("trailing-spaces", "4.6.1", "Spaces after the last term are allowed.", rec("v=spf1 -all   "), "fail")
case("several-spaces", "4.6.1", "Terms may be separated by more than one space.", rec("v=spf1   ip4:192.0.2.10    -all"), "pass")
case("mechanism-case", "4.6.1", "Mechanism names are case-insensitive (ABNF).", rec("v=spf1 IP4:192.0.2.10 -ALL"), "pass")
case("version-case", "4.5", "An upper-case version: the ABNF is case-insensitive but 4.5 says 'exactly v=spf1'; either reading is allowed.",
     rec("V=SPF1 ip4:192.0.2.10 -all"), ("pass", "none"))
case("non-ascii-record", "3.1", "A record with non-ASCII bytes is not a valid record: permerror.",
     rec("v=spf1 ip4:192.0.2.10 exp=caf\u00e9.example.org -all"), "permerror")
case("spf-record-via-cname", "4.4", "The TXT lookup follows a CNAME as any resolver answer does.",
     {DOMAIN: [("CNAME", "real.example.net")], "real.example.net": [("TXT", "v=spf1 ip4:192.0.2.10 -all")]}, "pass")

# --- Initial processing (section 4.3) ---------------------------------------

case("single-label-domain", "4.3", "A domain that is not multi-label gives none.", {"localhost": [("TXT", "v=spf1 -all")]}, "none",
     mail_from="first-last@localhost")
case("empty-label-domain", "4.3", "A zero-length label in the domain gives none.", rec("v=spf1 -all"), "none",
     mail_from="first-last@mail..example.org")
case("leading-dot-domain", "4.3", "A domain starting with a dot is malformed: none.", rec("v=spf1 -all"), "none",
     mail_from="first-last@.mail.example.org")
case("long-label-domain", "4.3", "A label over 63 octets makes the domain malformed: none.",
     {("x" * 64) + ".example.org": [("TXT", "v=spf1 -all")]}, "none", mail_from="first-last@" + ("x" * 64) + ".example.org")
case("label-63-ok", "4.3", "A label of exactly 63 octets is fine.",
     {("x" * 63) + ".example.org": [("TXT", "v=spf1 -all")]}, "fail", mail_from="first-last@" + ("x" * 63) + ".example.org")
case("long-domain", "4.3", "A domain over 253 octets is malformed: none.",
     {}, "none", mail_from="first-last@" + ".".join(["a" * 60] * 4) + ".example.org")
case("address-literal-helo", "2.3", "A HELO address literal is no domain to check: none.", {}, "none", mail_from="", helo="[192.0.2.10]")
case("trailing-dot-domain", "4.3", "A fully qualified domain with its trailing dot is the same domain.",
     rec("v=spf1 -all"), "fail", mail_from="first-last@mail.example.org.")
case("empty-local-part", "4.3", "A sender without local part is checked as postmaster@domain.",
     rec("v=spf1 exists:%{l}.%{o}.chk.example.net -all", {"postmaster.mail.example.org.chk.example.net": [("A", "127.0.0.2")]}),
     "pass", mail_from="@mail.example.org")
case("null-sender-helo", "2.4", "MAIL FROM <> checks postmaster@<HELO> against the HELO domain's record.",
     {HELO: [("TXT", "v=spf1 exists:%{s}.chk.example.net -all")], "postmaster@mta.example.org.chk.example.net": [("A", "127.0.0.2")]},
     "pass", mail_from="")
case("null-sender-helo-fail", "2.4", "With MAIL FROM <> the HELO domain's -all applies.", {HELO: [("TXT", "v=spf1 -all")]}, "fail", mail_from="")
case("null-sender-bad-helo", "4.3", "With MAIL FROM <> a malformed HELO domain gives none.", {}, "none", mail_from="", helo="bad..helo.example")
case("null-sender-single-label-helo", "4.3", "With MAIL FROM <> a single-label HELO gives none.",
     {"localhost": [("TXT", "v=spf1 -all")]}, "none", mail_from="", helo="localhost")
case("domain-case", "4.3", "Domain names are case-insensitive: an upper-case sender domain finds the record.",
     rec("v=spf1 ip4:192.0.2.10 -all"), "pass", mail_from="First-Last@MAIL.Example.ORG")
case("null-sender-helo-o", "7.3", "With MAIL FROM <> %{o} is the HELO domain and %{l} is postmaster.",
     {HELO: [("TXT", "v=spf1 -all exp=why.example.org")], "why.example.org": [("TXT", "%{l} at %{o}")]},
     "fail", mail_from="", explanation="postmaster at mta.example.org")

# --- all, qualifiers (sections 4.6.2, 4.7, 5.1) -----------------------------

case("all-pass", "5.1", "'all' always matches; no qualifier means '+': pass.", rec("v=spf1 all"), "pass")
case("plus-all", "4.6.2", "'+all' gives pass.", rec("v=spf1 +all"), "pass")
case("minus-all", "4.6.2", "'-all' gives fail.", rec("v=spf1 -all"), "fail", explanation="DEFAULT")
case("tilde-all", "4.6.2", "'~all' gives softfail.", rec("v=spf1 ~all"), "softfail", explanation="")
case("question-all", "4.6.2", "'?all' gives neutral.", rec("v=spf1 ?all"), "neutral")
case("no-match-neutral", "4.7", "No mechanism matches and no redirect: neutral.", rec("v=spf1 ip4:198.51.100.1"), "neutral")
case("first-match-wins", "4.6.2", "Mechanisms are tried left to right; the first match decides.", rec("v=spf1 ?ip4:192.0.2.10 -all"), "neutral")
case("mechanisms-after-all", "5.1", "Mechanisms after 'all' are never tried.", rec("v=spf1 -all ip4:192.0.2.10"), "fail")
case("minus-ip4", "4.6.2", "A '-' qualifier on a matching ip4 gives fail.", rec("v=spf1 -ip4:192.0.2.10 +all"), "fail")
case("tilde-a", "4.6.2", "A '~' qualifier on a matching a gives softfail.", rec("v=spf1 ~a:yes.example.net +all"), "softfail")
case("all-with-arg", "5.1", "'all' takes no argument: 'all:x' is permerror.", rec("v=spf1 all:example.net"), "permerror")
case("all-with-cidr", "5.1", "'all/24' is permerror.", rec("v=spf1 -all/24"), "permerror")
case("double-qualifier", "4.6.2", "Two qualifiers is a syntax error.", rec("v=spf1 +-all"), "permerror")
case("unknown-mechanism", "4.6.1", "An unknown mechanism is permerror.", rec("v=spf1 ip4:192.0.2.10 frobnicate -all"), "permerror")
case("unknown-mechanism-arg", "4.6.1", "An unknown mechanism with an argument is permerror.", rec("v=spf1 foo:example.net -all"), "permerror")

# --- include (section 5.2) -----------------------------------------------------

case("include-pass", "5.2", "An included pass is a match.", rec("v=spf1 include:pass.example.net -all"), "pass")
case("include-fail", "5.2", "An included fail is no match: evaluation goes on.", rec("v=spf1 include:fail.example.net ?all"), "neutral")
case("include-softfail", "5.2", "An included softfail is no match.", rec("v=spf1 include:softfail.example.net -all"), "fail")
case("include-neutral", "5.2", "An included neutral is no match.", rec("v=spf1 include:neutral.example.net ~all"), "softfail")
case("include-none", "5.2", "Including a domain without SPF record is permerror.", rec("v=spf1 include:none.example.net +all"), "permerror")
case("include-nxdomain", "5.2", "Including a domain that does not exist is permerror.", rec("v=spf1 include:nowhere.example.net +all"), "permerror")
case("include-permerror", "5.2", "An included permerror is permerror.", rec("v=spf1 include:perm.example.net +all"), "permerror")
case("include-temperror", "5.2", "An included temperror (SERVFAIL) is temperror.", rec("v=spf1 include:temp.example.net +all"), "temperror")
case("include-timeout", "5.2", "A timeout on the included record is temperror.", rec("v=spf1 include:slow.example.net +all"), "temperror")
case("include-minus", "5.2", "'-include' that matches gives fail.", rec("v=spf1 -include:pass.example.net +all"), "fail")
case("include-nested", "5.2", "Includes nest: a pass two levels down is a match.",
     rec("v=spf1 include:one.example.net -all", {"one.example.net": [("TXT", "v=spf1 include:two.example.net -all")],
                                                 "two.example.net": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")]}), "pass")
case("include-nested-fail", "5.2", "A nested include's fail stays a no-match at each level.",
     rec("v=spf1 include:one.example.net ?all", {"one.example.net": [("TXT", "v=spf1 include:fail.example.net +all")]}), "pass")
case("include-nested-none", "5.2", "A nested include of a domain without record is permerror all the way up.",
     rec("v=spf1 include:one.example.net +all", {"one.example.net": [("TXT", "v=spf1 include:none.example.net +all")]}), "permerror")
case("include-d-is-target", "5.2", "Inside an include, %{d} is the included domain.",
     rec("v=spf1 include:inc.example.net -all", {"inc.example.net": [("TXT", "v=spf1 exists:%{d}.chk.example.net -all")],
                                                 "inc.example.net.chk.example.net": [("A", "127.0.0.2")]}), "pass")
case("include-no-domain", "5.2", "'include' without a domain is permerror.", rec("v=spf1 include -all"), "permerror")
case("include-empty-domain", "5.2", "'include:' with an empty domain-spec is permerror.", rec("v=spf1 include: -all"), "permerror")
case("include-loop", "4.6.4", "A record including itself runs into the 10-term limit: permerror.",
     rec("v=spf1 include:mail.example.org -all"), "permerror")
case("include-exp-not-used", "6.2", "The included record's exp= is not used; the outer one is.",
     rec("v=spf1 include:inc.example.net -all exp=why.example.org",
         {"inc.example.net": [("TXT", "v=spf1 -all exp=incwhy.example.net")], "incwhy.example.net": [("TXT", "inner")],
          "why.example.org": [("TXT", "outer")]}), "fail", explanation="outer")

# --- a (section 5.3) ---------------------------------------------------------

case("a-own-domain", "5.3", "'a' alone looks up the current domain.",
     {DOMAIN: [("TXT", "v=spf1 a -all"), ("A", CLIENT4)]}, "pass")
case("a-own-domain-no", "5.3", "'a' on a domain whose address is elsewhere does not match.",
     {DOMAIN: [("TXT", "v=spf1 a -all"), ("A", "198.51.100.1")]}, "fail")
case("a-domain", "5.3", "'a:<domain>' looks up that domain.", rec("v=spf1 a:yes.example.net -all"), "pass")
case("a-domain-no", "5.3", "An address that is not the client's does not match.", rec("v=spf1 a:no.example.net -all"), "fail")
case("a-nxdomain", "5.3", "A target that does not exist matches nothing (no error).", rec("v=spf1 a:nowhere.example.net -all"), "fail")
case("a-v4-uses-a", "5.3", "An IPv4 client is compared with A records only.", rec("v=spf1 a:v6only.example.net -all"), "fail")
case("a-v6-uses-aaaa", "5.3", "An IPv6 client is compared with AAAA records.", rec("v=spf1 a:v6only.example.net -all"), "pass", ip=CLIENT6)
case("a-v6-ignores-a", "5.3", "An IPv6 client never matches an A record.", rec("v=spf1 a:v4only.example.net -all"), "fail", ip=CLIENT6)
case("a-cidr4", "5.3", "'a/24' matches the /24 around the domain's address.", rec("v=spf1 a:near.example.net/24 -all"), "pass")
case("a-cidr4-narrow", "5.3", "'a/25' does not reach from .200 down to .10.", rec("v=spf1 a:near.example.net/25 -all"), "fail")
case("a-own-cidr4", "5.3", "'a/24' without domain applies the length to the current domain.",
     {DOMAIN: [("TXT", "v=spf1 a/24 -all"), ("A", "192.0.2.99")]}, "pass")
case("a-dual-cidr-v6", "5.3", "'a/24//64': an IPv6 client uses the /64.", rec("v=spf1 a:near.example.net/24//64 -all"), "pass", ip=CLIENT6)
case("a-dual-cidr-v6-narrow", "5.3", "'a/24//120': the IPv6 length applies, the /24 does not.",
     rec("v=spf1 a:near.example.net/24//120 -all"), "fail", ip=CLIENT6)
case("a-only-cidr6", "5.3", "'a//64' with an IPv4 client keeps the default /32.", rec("v=spf1 a:near.example.net//64 -all"), "fail")
case("a-cidr6-only-v6", "5.3", "'a//64' with an IPv6 client matches within the /64.", rec("v=spf1 a:near.example.net//64 -all"), "pass", ip=CLIENT6)
case("a-cidr0", "5.3", "'a/0' matches any IPv4 client when the domain has an A record.", rec("v=spf1 a:no.example.net/0 -all"), "pass")
case("a-cidr0-no-record", "5.3", "'a/0' still needs an A record to compare with.", rec("v=spf1 a:v6only.example.net/0 -all"), "fail")
case("a-cidr32", "5.3", "'a/32' is an exact comparison.", rec("v=spf1 a:yes.example.net/32 -all"), "pass")
case("a-cidr33", "5.6", "'a/33' is beyond the IPv4 length: permerror.", rec("v=spf1 a:yes.example.net/33 -all"), "permerror")
case("a-cidr129", "5.6", "'a//129' is beyond the IPv6 length: permerror.", rec("v=spf1 a:yes.example.net//129 -all"), "permerror")
case("a-cidr-leading-zero", "5.6", "A CIDR length with a leading zero is not in the ABNF: permerror.",
     rec("v=spf1 a:yes.example.net/024 -all"), "permerror")
case("a-cidr-empty", "5.6", "A slash without length is permerror.", rec("v=spf1 a/ -all"), "permerror")
case("a-cidr-order", "5.6", "The IPv6 length cannot come before the IPv4 one.", rec("v=spf1 a//64/24 -all"), "permerror")
case("a-empty-domain", "5.3", "'a:' with an empty domain-spec is permerror.", rec("v=spf1 a: -all"), "permerror")
case("a-numeric-toplabel", "7.1", "A domain-spec whose last label is all digits is not a domain-end: permerror.",
     rec("v=spf1 a:host.example.123 -all"), "permerror")
case("a-single-label", "7.1", "A domain-spec must end in '.' toplabel or a macro: 'a:localhost' is permerror.",
     rec("v=spf1 a:localhost -all"), "permerror")
case("include-single-label", "7.1", "'include:' of a single-label name is permerror.", rec("v=spf1 include:example +all"), "permerror")
case("a-domain-trailing-dot", "7.1", "A domain-spec may end in a dot.", rec("v=spf1 a:yes.example.net. -all"), "pass")
case("a-servfail", "5", "A server failure on the address lookup is temperror.", rec("v=spf1 a:temp.example.net -all"), "temperror")
case("a-timeout", "5", "A timeout on the address lookup is temperror.", rec("v=spf1 a:slow.example.net -all"), "temperror")
case("a-cname", "5.3", "An address reached through a CNAME counts.",
     rec("v=spf1 a:alias.example.net -all", {"alias.example.net": [("CNAME", "yes.example.net")]}), "pass")
case("a-long-label-literal", "4.8",
     "A literal label over 63 octets names nothing that can be asked: no match or permerror, the RFC does not say which.",
     rec("v=spf1 a:" + "x" * 64 + ".example.net -all"), ("fail", "permerror"))

# --- mx (section 5.4) --------------------------------------------------------

case("mx-own-domain", "5.4", "'mx' alone uses the current domain's MX hosts.",
     {DOMAIN: [("TXT", "v=spf1 mx -all"), ("MX", (10, "yes.example.net"))]}, "pass")
case("mx-second-host", "5.4", "Any MX host's address matches, not only the first.", rec("v=spf1 mx:mx-yes.example.net -all"), "pass")
case("mx-no", "5.4", "MX hosts elsewhere: no match.", rec("v=spf1 mx:mx-no.example.net -all"), "fail")
case("mx-no-implicit", "5.4", "No MX records: no implicit MX from the domain's own A record.",
     rec("v=spf1 mx:v4only.example.net -all"), "fail")
case("mx-cidr4", "5.4", "'mx/24' widens each MX host's address.", rec("v=spf1 mx:mx-near.example.net/24 -all"), "pass")
case("mx-dual-cidr-v6", "5.4", "'mx/24//64' with an IPv6 client uses the /64.", rec("v=spf1 mx:mx-near.example.net/24//64 -all"), "pass", ip=CLIENT6)
case("mx-v6", "5.4", "An IPv6 client is compared with the MX hosts' AAAA records.", rec("v=spf1 mx:mx-yes.example.net -all"), "pass", ip=CLIENT6)
case("mx-own-cidr", "5.4", "'mx/24' without domain: current domain, /24.",
     {DOMAIN: [("TXT", "v=spf1 mx/24 -all"), ("MX", (10, "near.example.net"))]}, "pass")
case("mx-servfail", "5", "A server failure on the MX lookup is temperror.", rec("v=spf1 mx:temp.example.net -all"), "temperror")
case("mx-host-servfail", "5", "A server failure on an MX host's address lookup is temperror.",
     rec("v=spf1 mx:bad-mx.example.net -all", {"bad-mx.example.net": [("MX", (10, "temp.example.net"))]}), "temperror")
case("mx-cidr-bad", "5.6", "'mx/40' is permerror.", rec("v=spf1 mx/40 -all"), "permerror")
case("mx-ten-names", "4.6.4", "Ten MX hosts is within the limit.",
     rec("v=spf1 mx:ten.example.net -all", {"ten.example.net": [("MX", (i, "no.example.net")) for i in range(10)]}), "fail")
case("mx-ten-names-last", "4.6.4", "The tenth MX host may match.",
     rec("v=spf1 mx:ten.example.net -all",
         {"ten.example.net": [("MX", (i, "no.example.net")) for i in range(9)] + [("MX", (99, "yes.example.net"))]}), "pass")
case("mx-eleven-names", "4.6.4", "More than ten MX hosts to look at: permerror.",
     rec("v=spf1 mx:eleven.example.net -all", {"eleven.example.net": [("MX", (i, "no.example.net")) for i in range(11)]}), "permerror")

# --- ptr (section 5.5) -------------------------------------------------------

def ptr_zone(record: str, *names: str, extra: Zone | None = None, reverse: str = PTR4) -> Zone:
    return rec(record, {reverse: [("PTR", n) for n in names], **(extra or {})})


case("ptr-validated", "5.5", "'ptr' matches a PTR name in the domain whose forward lookup gives the client back.",
     ptr_zone("v=spf1 ptr -all", "host.mail.example.org", extra={"host.mail.example.org": [("A", CLIENT4)]}), "pass")
case("ptr-equal-domain", "5.5", "A validated name equal to the target domain matches.",
     ptr_zone("v=spf1 ptr -all", DOMAIN, extra={DOMAIN: [("TXT", "v=spf1 ptr -all"), ("A", CLIENT4)]}), "pass")
case("ptr-not-validated", "5.5", "A PTR name whose forward lookup gives another address does not match.",
     ptr_zone("v=spf1 ptr -all", "host.mail.example.org", extra={"host.mail.example.org": [("A", "198.51.100.1")]}), "fail")
case("ptr-other-domain", "5.5", "A validated name outside the target domain does not match.",
     ptr_zone("v=spf1 ptr -all", "yes.example.net"), "fail")
case("ptr-with-domain", "5.5", "'ptr:<domain>' checks against that domain.",
     ptr_zone("v=spf1 ptr:example.net -all", "yes.example.net"), "pass")
case("ptr-suffix-not-label", "5.5", "A name ending in the domain's text but not at a label boundary does not match.",
     ptr_zone("v=spf1 ptr:example.net -all", "yesexample.net", extra={"yesexample.net": [("A", CLIENT4)]}), "fail")
case("ptr-case", "5.5", "Domain names compare case-insensitively.",
     ptr_zone("v=spf1 ptr:Example.NET -all", "YES.example.net"), "pass")
case("ptr-no-ptr", "5.5", "No PTR record: no match.", rec("v=spf1 ptr -all"), "fail")
case("ptr-servfail", "5.5", "A DNS error on the PTR lookup makes ptr not match (not temperror).",
     rec("v=spf1 ptr -all", {PTR4: ["SERVFAIL"]}), "fail")
case("ptr-forward-servfail", "5.5", "A DNS error on one name's forward lookup skips that name; the next may match.",
     ptr_zone("v=spf1 ptr:example.net -all", "temp.example.net", "yes.example.net"), "pass")
case("ptr-second-name", "5.5", "Any of several PTR names may validate.",
     ptr_zone("v=spf1 ptr:example.net -all", "no.example.net", "yes.example.net"), "pass")
case("ptr-v6", "5.5", "An IPv6 client's PTR is under ip6.arpa in nibbles, validated with AAAA.",
     ptr_zone("v=spf1 ptr:example.net -all", "v6only.example.net", reverse=PTR6), "pass", ip=CLIENT6)
case("ptr-ten-names", "4.6.4", "The tenth PTR name is still looked at.",
     ptr_zone("v=spf1 ptr:example.net -all", *["no.example.net"] * 9, "yes.example.net"), "pass")
case("ptr-eleventh-ignored", "4.6.4", "Only the first ten PTR names are looked at: an eleventh that would validate is ignored.",
     ptr_zone("v=spf1 ptr:example.net -all", *["no.example.net"] * 10, "yes.example.net"), "fail")
case("ptr-cidr", "5.5", "'ptr' takes no CIDR length: permerror.", rec("v=spf1 ptr/24 -all"), "permerror")

# --- ip4, ip6 (section 5.6) --------------------------------------------------

case("ip4-exact", "5.6", "ip4 without length is /32.", rec("v=spf1 ip4:192.0.2.10 -all"), "pass")
case("ip4-exact-other", "5.6", "ip4 without length does not match a neighbour.", rec("v=spf1 ip4:192.0.2.11 -all"), "fail")
case("ip4-cidr24", "5.6", "ip4 /24 matches inside the network.", rec("v=spf1 ip4:192.0.2.0/24 -all"), "pass")
case("ip4-cidr-host-bits", "5.6", "Host bits set in the network address are ignored.", rec("v=spf1 ip4:192.0.2.77/24 -all"), "pass")
case("ip4-cidr32", "5.6", "ip4 /32 is one address.", rec("v=spf1 ip4:192.0.2.10/32 -all"), "pass")
case("ip4-cidr0", "5.6", "ip4 /0 matches every IPv4 client.", rec("v=spf1 ip4:0.0.0.0/0 -all"), "pass")
case("ip4-cidr0-v6-client", "5.6", "ip4 /0 never matches an IPv6 client.", rec("v=spf1 ip4:0.0.0.0/0 -all"), "fail", ip=CLIENT6)
case("ip4-cidr33", "5.6", "ip4 /33 is permerror.", rec("v=spf1 ip4:192.0.2.0/33 -all"), "permerror")
case("ip4-cidr-leading-zero", "5.6", "ip4 /024 is permerror.", rec("v=spf1 ip4:192.0.2.0/024 -all"), "permerror")
case("ip4-cidr-empty", "5.6", "ip4 with a bare slash is permerror.", rec("v=spf1 ip4:192.0.2.0/ -all"), "permerror")
case("ip4-dual-cidr", "5.6", "ip4 takes a single length, not the a/mx dual form.", rec("v=spf1 ip4:192.0.2.0/24//64 -all"), "permerror")
case("ip4-short", "5.6", "A three-octet address is permerror.", rec("v=spf1 ip4:192.0.2 -all"), "permerror")
case("ip4-octet-range", "5.6", "An octet over 255 is permerror.", rec("v=spf1 ip4:192.0.2.300 -all"), "permerror")
case("ip4-leading-zero-octet", "5.6", "An octet with a leading zero is not a dec-octet: permerror.", rec("v=spf1 ip4:192.0.02.10 -all"), "permerror")
case("ip4-no-address", "5.6", "'ip4' without address is permerror.", rec("v=spf1 ip4 -all"), "permerror")
case("ip4-empty-address", "5.6", "'ip4:' with nothing after is permerror.", rec("v=spf1 ip4: -all"), "permerror")
case("ip4-given-v6", "5.6", "An IPv6 address after ip4 is permerror.", rec("v=spf1 ip4:2001:db8::10 -all"), "permerror")
case("ip4-mapped-client", "5", "An IPv4-mapped IPv6 client is evaluated as its IPv4 address.",
     rec("v=spf1 ip4:192.0.2.0/24 -all"), "pass", ip="::ffff:192.0.2.10")
case("ip4-mapped-client-a", "5", "An IPv4-mapped client is compared with A records.", rec("v=spf1 a:v4only.example.net -all"), "pass",
     ip="::ffff:192.0.2.10")
case("ip4-mapped-client-ip6", "5", "An IPv4-mapped client is not matched by an IPv6 network.", rec("v=spf1 ip6:::/0 -all"), "fail",
     ip="::ffff:192.0.2.10")
case("ip6-exact", "5.6", "ip6 without length is /128.", rec("v=spf1 ip6:2001:db8::10 -all"), "pass", ip=CLIENT6)
case("ip6-exact-other", "5.6", "ip6 /128 does not match the next address.", rec("v=spf1 ip6:2001:db8::11/128 -all"), "fail", ip=CLIENT6)
case("ip6-cidr128", "5.6", "ip6 /128 is one address.", rec("v=spf1 ip6:2001:db8::10/128 -all"), "pass", ip=CLIENT6)
case("ip6-cidr32", "5.6", "ip6 /32 matches the documentation prefix.", rec("v=spf1 ip6:2001:db8::/32 -all"), "pass", ip=CLIENT6)
case("ip6-cidr0", "5.6", "ip6 /0 matches every IPv6 client.", rec("v=spf1 ip6:::/0 -all"), "pass", ip=CLIENT6)
case("ip6-cidr0-v4-client", "5.6", "ip6 /0 never matches an IPv4 client.", rec("v=spf1 ip6:::/0 -all"), "fail")
case("ip6-cidr129", "5.6", "ip6 /129 is permerror.", rec("v=spf1 ip6:2001:db8::/129 -all"), "permerror", ip=CLIENT6)
case("ip6-double-slash", "5.6", "ip6 takes '/len', not '//len'.", rec("v=spf1 ip6:2001:db8::10//64 -all"), "permerror", ip=CLIENT6)
case("ip6-given-v4", "5.6", "An IPv4 address after ip6 is permerror.", rec("v=spf1 ip6:192.0.2.10 -all"), "permerror")
case("ip6-garbage", "5.6", "A malformed IPv6 address is permerror.", rec("v=spf1 ip6:2001:db8:::1::2 -all"), "permerror", ip=CLIENT6)
case("ip6-upper-hex", "5.6", "Hex digits in an ip6 network may be upper case.", rec("v=spf1 ip6:2001:DB8::10 -all"), "pass", ip=CLIENT6)
case("ip6-client-ip4-mech", "5.6", "An IPv6 client skips ip4 and goes on.", rec("v=spf1 ip4:192.0.2.10 ip6:2001:db8::/64 -all"), "pass", ip=CLIENT6)

# --- exists (section 5.7) ----------------------------------------------------

case("exists-match", "5.7", "'exists' matches when the name has an A record.", rec("v=spf1 exists:no.example.net -all"), "pass")
case("exists-nxdomain", "5.7", "'exists' on a missing name does not match.", rec("v=spf1 exists:nowhere.example.net -all"), "fail")
case("exists-no-a", "5.7", "'exists' on a name with no A record does not match.", rec("v=spf1 exists:txtonly.example.net -all"), "fail")
case("exists-a-only-for-v6", "5.7", "'exists' always asks A, also for an IPv6 client: AAAA alone does not match.",
     rec("v=spf1 exists:v6only.example.net -all"), "fail", ip=CLIENT6)
case("exists-a-for-v6", "5.7", "An A record makes 'exists' match for an IPv6 client too.", rec("v=spf1 exists:v4only.example.net -all"), "pass", ip=CLIENT6)
case("exists-no-domain", "5.7", "'exists' without a domain is permerror.", rec("v=spf1 exists -all"), "permerror")
case("exists-empty-domain", "5.7", "'exists:' with an empty domain-spec is permerror.", rec("v=spf1 exists: -all"), "permerror")
case("exists-cidr", "5.7", "'exists' takes no CIDR length: permerror.", rec("v=spf1 exists:no.example.net/24 -all"), "permerror")
case("exists-timeout", "5", "A timeout on the exists lookup is temperror.", rec("v=spf1 exists:slow.example.net -all"), "temperror")

# --- redirect (section 6.1) --------------------------------------------------

case("redirect-pass", "6.1", "With no mechanism matching, the redirect target's result is the result.",
     rec("v=spf1 ip4:198.51.100.1 redirect=pass.example.net"), "pass")
case("redirect-fail", "6.1", "A redirect target's fail is fail.", rec("v=spf1 redirect=fail.example.net"), "fail")
case("redirect-first", "6.1", "redirect= may stand before the mechanisms; it is still used only if none matches.",
     rec("v=spf1 redirect=fail.example.net ip4:192.0.2.10"), "pass")
case("redirect-all-wins", "6.1", "A record with 'all' never reaches its redirect.", rec("v=spf1 ?all redirect=fail.example.net"), "neutral")
case("redirect-none", "6.1", "Redirect to a domain without SPF record is permerror.", rec("v=spf1 redirect=none.example.net"), "permerror")
case("redirect-nxdomain", "6.1", "Redirect to a domain that does not exist is permerror.", rec("v=spf1 redirect=nowhere.example.net"), "permerror")
case("redirect-temperror", "6.1", "A redirect target's temperror is temperror.", rec("v=spf1 redirect=temp.example.net"), "temperror")
case("redirect-permerror", "6.1", "A redirect target's permerror is permerror.", rec("v=spf1 redirect=perm.example.net"), "permerror")
case("redirect-malformed-target", "6.1", "A redirect that expands to a malformed name is permerror.",
     rec("v=spf1 redirect=%{l}..example.net"), "permerror")
case("redirect-twice", "6", "redirect= twice is permerror.", rec("v=spf1 redirect=pass.example.net redirect=fail.example.net"), "permerror")
case("redirect-empty", "6.1", "redirect= with an empty domain-spec is permerror.", rec("v=spf1 redirect="), "permerror")
case("redirect-case", "6", "Modifier names are case-insensitive.", rec("v=spf1 Redirect=pass.example.net"), "pass")
case("redirect-d-is-target", "6.1", "In the target record %{d} is the target domain.",
     rec("v=spf1 redirect=tgt.example.net", {"tgt.example.net": [("TXT", "v=spf1 exists:%{d}.chk.example.net -all")],
                                              "tgt.example.net.chk.example.net": [("A", "127.0.0.2")]}), "pass")
case("redirect-a-uses-target", "6.1", "'a' in the target record looks up the target domain.",
     rec("v=spf1 redirect=tgt.example.net", {"tgt.example.net": [("TXT", "v=spf1 a -all"), ("A", CLIENT4)]}), "pass")
case("redirect-exp-of-target", "6.2", "After a redirect the target's exp= explains, not the original's.",
     rec("v=spf1 redirect=tgt.example.net exp=why.example.org",
         {"tgt.example.net": [("TXT", "v=spf1 -all exp=tgtwhy.example.net")], "tgtwhy.example.net": [("TXT", "from %{d}")],
          "why.example.org": [("TXT", "original")]}), "fail", explanation="from tgt.example.net")
case("redirect-target-without-exp", "6.2", "A redirect target without exp= gets the default, not the original's exp.",
     rec("v=spf1 redirect=fail.example.net exp=why.example.org", {"why.example.org": [("TXT", "original")]}),
     "fail", explanation="DEFAULT")
case("redirect-as-mechanism", "6.1", "'redirect:x' is not a modifier but an unknown mechanism: permerror.",
     rec("v=spf1 redirect:pass.example.net"), "permerror")

# --- exp (section 6.2) -------------------------------------------------------

case("exp-plain", "6.2", "On fail the exp= TXT record is the explanation.",
     rec("v=spf1 -all exp=why.example.org", {"why.example.org": [("TXT", "Not from here.")]}), "fail", explanation="Not from here.")
case("exp-strings-joined", "6.2", "An explanation TXT of several strings is joined without spaces.",
     rec("v=spf1 -all exp=why.example.org", {"why.example.org": [("TXT", ["Not from ", "here", "."])]}), "fail",
     explanation="Not from here.")
case("exp-domain-macro", "6.2", "The exp= domain-spec is macro-expanded.",
     rec("v=spf1 -all exp=why.%{d}", {"why.mail.example.org": [("TXT", "macro domain")]}), "fail", explanation="macro domain")
case("exp-nxdomain", "6.2", "An exp= name that does not exist: the default explanation.", rec("v=spf1 -all exp=nowhere.example.org"),
     "fail", explanation="DEFAULT")
case("exp-no-txt", "6.2", "An exp= name without TXT records: the default explanation.", rec("v=spf1 -all exp=no.example.net"),
     "fail", explanation="DEFAULT")
case("exp-two-txt", "6.2", "Two TXT records at the exp= name: the default explanation.",
     rec("v=spf1 -all exp=why.example.org", {"why.example.org": [("TXT", "one"), ("TXT", "two")]}), "fail", explanation="DEFAULT")
case("exp-servfail", "6.2", "A server failure on the exp lookup is ignored: fail with the default explanation.",
     rec("v=spf1 -all exp=temp.example.net"), "fail", explanation="DEFAULT")
case("exp-timeout", "6.2", "A timeout on the exp lookup is ignored.", rec("v=spf1 -all exp=slow.example.net"), "fail", explanation="DEFAULT")
case("exp-bad-macro-in-text", "6.2", "A syntax error in the explanation text: the default explanation.",
     rec("v=spf1 -all exp=why.example.org", {"why.example.org": [("TXT", "bad %{z} macro")]}), "fail", explanation="DEFAULT")
case("exp-bad-macro-in-spec", "6.2", "A syntax error in the exp= domain-spec is a record syntax error: permerror.",
     rec("v=spf1 -all exp=%{z}.example.org"), "permerror")
case("exp-twice", "6", "exp= twice is permerror.", rec("v=spf1 -all exp=a.example.org exp=b.example.org"), "permerror")
case("exp-empty", "6.2", "exp= with an empty domain-spec is permerror.", rec("v=spf1 -all exp="), "permerror")
case("exp-only-on-fail", "6.2", "softfail carries no explanation.",
     rec("v=spf1 ~all exp=why.example.org", {"why.example.org": [("TXT", "why")]}), "softfail", explanation="")
case("exp-not-on-pass", "6.2", "pass carries no explanation.",
     rec("v=spf1 +all exp=why.example.org", {"why.example.org": [("TXT", "why")]}), "pass", explanation="")
case("exp-not-counted", "4.6.4", "The exp lookup is not one of the ten DNS terms.",
     rec("v=spf1 " + " ".join(["a:no.example.net"] * 10) + " -all exp=why.example.org", {"why.example.org": [("TXT", "ten and exp")]}),
     "fail", explanation="ten and exp")

# --- unknown modifiers (section 6) ------------------------------------------

case("unknown-modifier", "6", "Unknown modifiers are ignored.", rec("v=spf1 colour=blue -all"), "fail")
case("unknown-modifier-macro", "6", "An unknown modifier's value may hold macros.", rec("v=spf1 note=%{d}.%{i} ip4:192.0.2.10 -all"), "pass")
case("unknown-modifier-empty", "6", "An unknown modifier may have an empty value.", rec("v=spf1 note= -all"), "fail")
case("unknown-modifier-twice", "6", "Unknown modifiers may repeat.", rec("v=spf1 note=a note=b -all"), "fail")
case("unknown-modifier-bad-macro", "6", "An unknown modifier's value must still be a macro-string: permerror.",
     rec("v=spf1 note=%{z} -all"), "permerror")
case("modifier-bad-name", "6", "A modifier name must start with a letter: permerror.", rec("v=spf1 1note=x -all"), "permerror")

# --- Macros (section 7) -------------------------------------------------------

macro("macro-s", "7.3", "%{s} is the sender.", "%{s}", SENDER)
macro("macro-l", "7.3", "%{l} is the local part.", "%{l}", "first-last")
macro("macro-o", "7.3", "%{o} is the sender's domain.", "%{o}", DOMAIN)
macro("macro-d", "7.3", "%{d} is the current domain.", "%{d}", DOMAIN)
macro("macro-i4", "7.3", "%{i} of an IPv4 client is its dotted quad.", "%{i}", CLIENT4)
macro("macro-i6", "7.3", "%{i} of an IPv6 client is its 32 nibbles, dot-separated.", "%{i}", NIBBLES6, ip=CLIENT6)
macro("macro-i-mapped", "7.3", "%{i} of an IPv4-mapped client is the IPv4 dotted quad.", "%{i}", CLIENT4, ip="::ffff:192.0.2.10")
macro("macro-v4", "7.3", "%{v} is 'in-addr' for IPv4.", "%{v}", "in-addr")
macro("macro-v6", "7.3", "%{v} is 'ip6' for IPv6.", "%{v}", "ip6", ip=CLIENT6)
macro("macro-h", "7.3", "%{h} is the HELO domain.", "%{h}", HELO)
macro("macro-p-unknown", "7.3", "%{p} without a validated name is 'unknown'.", "%{p}", "unknown")
macro("macro-p", "7.3", "%{p} is the client's validated name.", "%{p}", "yes.example.net", zone={PTR4: [("PTR", "yes.example.net")]})
macro("macro-p-prefers-domain", "7.3", "%{p} prefers a validated name in the current domain.", "%{p}", "host.mail.example.org",
      zone={PTR4: [("PTR", "yes.example.net"), ("PTR", "host.mail.example.org")], "host.mail.example.org": [("A", CLIENT4)]})
macro("macro-p-not-validated", "7.3", "A PTR name whose forward lookup fails to give the client is not %{p}.", "%{p}", "unknown",
      zone={PTR4: [("PTR", "no.example.net")]})
macro("macro-c4", "7.2", "%{c} (exp only) is the client address in readable form.", "%{c}", CLIENT4)
macro("macro-c6", "7.2", "%{c} of an IPv6 client is its compressed form.", "%{c}", "2001:db8::10", ip=CLIENT6)
macro("macro-r", "7.2", "%{r} (exp only) is the checking host's name.", "%{r}", "receiver.example")
macro("macro-t", "7.2", "%{t} (exp only) is the current time in seconds.", "%{t}", "1700000000")
macro("macro-d1", "7.3", "A digit keeps that many parts from the right.", "%{d1}", "org")
macro("macro-d2", "7.3", "%{d2} is the last two labels.", "%{d2}", "example.org")
macro("macro-d-big", "7.3", "More parts asked than there are: the whole value.", "%{d9}", DOMAIN)
macro("macro-dr", "7.3", "'r' reverses the parts.", "%{dr}", "org.example.mail")
macro("macro-d2r", "7.3", "Reversal comes before keeping the right-hand parts.", "%{d2r}", "example.mail")
macro("macro-ir", "7.3", "%{ir} reverses the octets.", "%{ir}", "10.2.0.192")
macro("macro-i2", "7.3", "%{i2} is the last two octets.", "%{i2}", "2.10")
macro("macro-l-dash", "7.3", "A delimiter splits on '-' and rejoins with '.'.", "%{l-}", "first.last")
macro("macro-lr-dash", "7.3", "Split on '-', reversed.", "%{lr-}", "last.first")
macro("macro-l1r-dash", "7.3", "Split on '-', reversed, last part kept.", "%{l1r-}", "first")
macro("macro-l-plus", "7.3", "'+' is a delimiter.", "%{l+}", "a.b.c", mail_from="a+b+c@mail.example.org")
macro("macro-l-comma", "7.3", "',' is a delimiter.", "%{l,}", "a.b", mail_from="a,b@mail.example.org")
macro("macro-l-slash", "7.3", "'/' is a delimiter.", "%{l/}", "a.b", mail_from="a/b@mail.example.org")
macro("macro-l-underscore", "7.3", "'_' is a delimiter.", "%{l_}", "a.b", mail_from="a_b@mail.example.org")
macro("macro-l-equals", "7.3", "'=' is a delimiter.", "%{l=}", "a.b", mail_from="a=b@mail.example.org")
macro("macro-l-several", "7.3", "Several delimiters split on any of them.", "%{l-+}", "a.b.c", mail_from="a-b+c@mail.example.org")
macro("macro-l-dot-kept", "7.3", "Without transformer the value is kept as is, dots and all.", "%{l}", "first.last", mail_from="first.last@mail.example.org")
macro("macro-percent", "7.1", "'%%' is a literal percent sign.", "100%% sure", "100% sure")
macro("macro-underscore", "7.1", "'%_' is a space.", "a%_b", "a b")
macro("macro-dash", "7.1", "'%-' is the URL-encoded space '%20'.", "a%-b", "a%20b")
macro("macro-upper-s", "7.3", "An upper-case letter URL-escapes the value: '@' becomes %40.", "%{S}", "first-last%40mail.example.org")
macro("macro-upper-l-plus", "7.3", "URL escaping uses upper-case hex: '+' becomes %2B.", "%{L}", "a%2Bb", mail_from="a+b@mail.example.org")
macro("macro-upper-unreserved", "7.3", "Unreserved characters (- . _ ~) stay as they are.", "%{L}", "a-b.c_d~e", mail_from="a-b.c_d~e@mail.example.org")
macro("macro-upper-transformed", "7.3", "Escaping applies after the transformers.", "%{L1r+}", "a", mail_from="a+b@mail.example.org")
macro("macro-letter-case", "7.3", "Upper and lower letters give the same value when nothing needs escaping.", "%{D} %{d}", f"{DOMAIN} {DOMAIN}")
macro("macro-mixed-text", "7.1", "Macros and literal text mix freely in an explanation.", "%{i} may not send for %{d}.",
      f"{CLIENT4} may not send for {DOMAIN}.")
spec("spec-ir-v", "7.4", "A domain-spec of reversed address, version and part of the domain.",
     "%{ir}.%{v}._spf.%{d2}", "10.2.0.192.in-addr._spf.example.org")
spec("spec-lr-dash", "7.4", "A domain-spec built from the reversed dash-split local part.",
     "%{lr-}.lp._spf.%{d2}", "last.first.lp._spf.example.org")
spec("spec-i6-reversed", "7.4", "%{ir} of an IPv6 client in a domain-spec is the ip6.arpa-style nibble order.",
     "%{ir}.%{v}._spf.%{d2}", ".".join(reversed(NIBBLES6.split("."))) + ".ip6._spf.example.org", ip=CLIENT6)
spec("spec-h", "7.3", "%{h} in a domain-spec.", "%{h}.helo.example.net", "mta.example.org.helo.example.net")
spec("spec-upper-i", "7.3", "An upper-case letter in a domain-spec escapes too (nothing to escape in an address).",
     "%{I}.chk.example.net", "192.0.2.10.chk.example.net")
spec("spec-p", "7.3", "%{p} in a domain-spec costs the PTR lookups and gives the validated name.",
     "%{p}.chk.example.net", "yes.example.net.chk.example.net", zone={PTR4: [("PTR", "yes.example.net")]})
spec("spec-long-truncated", "7.3", "An expansion over 253 octets loses labels from the left until it fits.",
     "%{l}.chk.example.net", ".".join(["b" * 60] * 3) + ".chk.example.net",
     mail_from=".".join(["a" * 60] + ["b" * 60] * 3) + "@mail.example.org")
case("spec-253-kept", "7.3", "An expansion of exactly 253 octets is used whole.",
     rec("v=spf1 exists:%{l}.chk.example.net -all", {("c" * 54) + "." + ".".join(["b" * 60] * 3) + ".chk.example.net": [("A", "127.0.0.2")]}),
     "pass", mail_from=("c" * 54) + "." + ".".join(["b" * 60] * 3) + "@mail.example.org")
for letter in "crt":
    case(f"macro-{letter}-outside-exp", "7.2", f"%{{{letter}}} is allowed only in explanation text: in a domain-spec it is permerror.",
         rec(f"v=spf1 exists:%{{{letter}}}.chk.example.net -all"), "permerror")
case("macro-unknown-letter", "7.1", "An unknown macro letter is permerror.", rec("v=spf1 exists:%{x}.example.net -all"), "permerror")
case("macro-lone-percent", "7.1", "A '%' not followed by '{', '%', '_' or '-' is permerror.", rec("v=spf1 exists:100%.example.net -all"), "permerror")
case("macro-percent-end", "7.1", "A '%' at the end of a domain-spec is permerror.", rec("v=spf1 a:yes.example.net% -all"), "permerror")
case("macro-unclosed", "7.1", "An unclosed macro is permerror.", rec("v=spf1 exists:%{d.example.net -all"), "permerror")
case("macro-zero-digit", "7.1", "A digit transformer of 0 is permerror.", rec("v=spf1 exists:%{d0}.example.net -all"), "permerror")
case("macro-r-before-digit", "7.1", "Transformers are digits then 'r': '%{dr2}' is permerror.", rec("v=spf1 exists:%{dr2}.example.net -all"), "permerror")
case("macro-bad-delimiter", "7.1", "A delimiter outside . - + , / _ = is permerror.", rec("v=spf1 exists:%{l:}.example.net -all"), "permerror")
case("macro-empty-braces", "7.1", "'%{}' is permerror.", rec("v=spf1 exists:%{}.example.net -all"), "permerror")
case("macro-domain-end", "7.1", "A domain-spec may end in a macro instead of a top label.",
     rec("v=spf1 exists:chk.%{d} -all", {"chk.mail.example.org": [("A", "127.0.0.2")]}), "pass")
case("macro-in-include", "7", "Macros work in include targets.",
     rec("v=spf1 include:%{d2}.inc.example.net -all", {"example.org.inc.example.net": [("TXT", "v=spf1 +all")]}), "pass")
case("macro-l-in-include-d", "7.3", "%{o} stays the sender's domain inside an include.",
     rec("v=spf1 include:inc.example.net -all", {"inc.example.net": [("TXT", "v=spf1 exists:%{o}.chk.example.net -all")],
                                                 "mail.example.org.chk.example.net": [("A", "127.0.0.2")]}), "pass")

# --- DNS term limit (section 4.6.4) -------------------------------------------

# Fillers that cost one DNS term each, match nothing and make no void lookup.
FILL = {
    "a": "a:no.example.net",
    "mx": "mx:mx-no.example.net",
    "ptr": "ptr:elsewhere.example.com",
    "include": "include:fail.example.net",
}
PTR_OK = {PTR4: [("PTR", "yes.example.net")]}
for kind, filler in FILL.items():
    case(f"limit-ten-{kind}", "4.6.4", f"Ten '{kind}' terms are within the limit.",
         rec("v=spf1 " + " ".join([filler] * 10) + " -all", PTR_OK), "fail")
    case(f"limit-eleven-{kind}", "4.6.4", f"An eleventh '{kind}' term is permerror.",
         rec("v=spf1 " + " ".join([filler] * 11) + " -all", PTR_OK), "permerror")
case("limit-eleventh-exists", "4.6.4", "'exists' counts: ten fillers and an exists is permerror.",
     rec("v=spf1 " + " ".join([FILL["a"]] * 10) + " exists:no.example.net -all"), "permerror")
case("limit-tenth-exists", "4.6.4", "Nine fillers and an exists is within the limit.",
     rec("v=spf1 " + " ".join([FILL["a"]] * 9) + " exists:no.example.net -all"), "pass")
case("limit-redirect-counts", "4.6.4", "redirect= counts: ten fillers and a redirect is permerror.",
     rec("v=spf1 " + " ".join([FILL["a"]] * 10) + " redirect=pass.example.net"), "permerror")
case("limit-redirect-tenth", "4.6.4", "Nine fillers and a redirect is within the limit.",
     rec("v=spf1 " + " ".join([FILL["a"]] * 9) + " redirect=pass.example.net"), "pass")
case("limit-mixed-ten", "4.6.4", "The kinds add up: a, mx, ptr, include mixed to ten is fine.",
     rec("v=spf1 " + " ".join([FILL["a"], FILL["mx"], FILL["ptr"], FILL["include"]] * 2 + [FILL["a"], FILL["mx"]]) + " -all", PTR_OK), "fail")
case("limit-mixed-eleven", "4.6.4", "Mixed kinds to eleven is permerror.",
     rec("v=spf1 " + " ".join([FILL["a"], FILL["mx"], FILL["ptr"], FILL["include"]] * 2 + [FILL["a"], FILL["mx"], FILL["ptr"]]) + " -all",
         PTR_OK), "permerror")
case("limit-not-ip-all", "4.6.4", "ip4, ip6 and all cost no DNS term.",
     rec("v=spf1 " + " ".join([FILL["a"]] * 10) + " " + " ".join(f"ip4:198.51.100.{n}" for n in range(20)) + " ip6:2001:db8::1 -all"), "fail")
case("limit-across-include", "4.6.4", "Terms inside an include count toward the same ten.",
     rec("v=spf1 " + " ".join([FILL["a"]] * 5) + " include:inc.example.net -all",
         {"inc.example.net": [("TXT", "v=spf1 " + " ".join([FILL["a"]] * 5) + " -all")]}), "permerror")
case("limit-across-include-ok", "4.6.4", "Four outside, the include and five inside make ten: fine.",
     rec("v=spf1 " + " ".join([FILL["a"]] * 4) + " include:inc.example.net -all",
         {"inc.example.net": [("TXT", "v=spf1 " + " ".join([FILL["a"]] * 5) + " -all")]}), "fail")
case("limit-stop-at-match", "4.6.4", "Terms after the matching one are not evaluated and do not count.",
     rec("v=spf1 a:yes.example.net " + " ".join([FILL["a"]] * 12) + " -all"), "pass")

# --- Void lookups (section 4.6.4) -----------------------------------------------

case("void-two", "4.6.4", "Two lookups with no answer are allowed.",
     rec("v=spf1 a:nowhere1.example.net a:txtonly.example.net -all"), "fail")
case("void-three", "4.6.4", "A third void lookup is permerror.",
     rec("v=spf1 a:nowhere1.example.net a:txtonly.example.net exists:nowhere2.example.net -all"), "permerror")
case("void-mx", "4.6.4", "An MX lookup with no answer is a void lookup too.",
     rec("v=spf1 mx:nowhere1.example.net mx:txtonly.example.net mx:nowhere2.example.net -all"), "permerror")
case("void-answers-reset-nothing", "4.6.4", "Lookups with answers in between do not undo the void count.",
     rec("v=spf1 a:nowhere1.example.net a:no.example.net a:nowhere2.example.net a:no.example.net a:nowhere3.example.net -all"), "permerror")
case("void-counts-terms", "4.6.4",
     "The limit is on terms: MX hosts without an address for the client's family are not void lookups of their own.",
     rec("v=spf1 mx:mx-v6hosts.example.net -all", {"mx-v6hosts.example.net": [("MX", (n, f"h{n}.example.net")) for n in range(4)],
                                                   **{f"h{n}.example.net": [("AAAA", "2001:db8:ffff::1")] for n in range(4)}}), "fail")
case("void-p-macro-not-term", "4.6.4",
     "The PTR lookups behind %{p} belong to no term: with no PTR record, one void exists term stays within the limit.",
     rec("v=spf1 exists:%{p}.chk.example.net -all"), "fail")
case("void-match-before-third", "4.6.4", "A match before the third void lookup ends the evaluation first.",
     rec("v=spf1 a:nowhere1.example.net a:nowhere2.example.net ip4:192.0.2.10 a:nowhere3.example.net -all"), "pass")

# --- Temporary errors (sections 2.6.6, 4.4, 5) ----------------------------------

case("record-servfail", "4.4", "A server failure on the record lookup is temperror.", {DOMAIN: ["SERVFAIL"]}, "temperror")
case("record-timeout", "4.4", "A timeout on the record lookup is temperror.", {DOMAIN: ["TIMEOUT"]}, "temperror")
case("helo-timeout", "4.4", "A timeout on the HELO domain's record (MAIL FROM <>) is temperror.", {HELO: ["TIMEOUT"]}, "temperror", mail_from="")
case("nested-a-servfail", "5", "A server failure deep inside an include is temperror at the top.",
     rec("v=spf1 include:broken-a.example.net +all"), "temperror")
case("error-after-match", "5", "A term after the match is never looked up: no temperror.",
     rec("v=spf1 ip4:192.0.2.10 a:temp.example.net -all"), "pass")
case("redirect-timeout", "6.1", "A timeout on the redirect target's record is temperror.", rec("v=spf1 redirect=slow.example.net"), "temperror")
