"""CPU cost of inbound DKIM verification per message: dkimpy alone against the
fast check (``mailstack.inbound.dkimfast``) with dkimpy behind it.

Verifies 4 KB messages signed with an RSA-2048 and an Ed25519 key (by our
signer, relaxed/relaxed) the way the thread pool does (``verify_file`` on a
file object, key records prefetched), then with dkimpy alone as before the
fast check (``_verify_one`` per signature on the message read into memory),
and the whole ``DKIMVerifier.verify_message`` (signature scan, key lookups
from an in-process zone, verification; pool calls made inline).  A message
whose body was changed in transit shows the cost of a failure (fast check,
then dkimpy).  Prints CPU ms per message (``time.process_time``, best of five
rounds: steady on a shared machine).

    PYTHONPATH=. python3 benchmarks/dkim_verify_cost.py [--messages N]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import IO, Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dkim_cost import message_4k  # noqa: E402 (after the sys.path set-up above)
from twisted.internet.defer import Deferred, succeed  # noqa: E402

from mailstack.dkim import canon, keys, sign  # noqa: E402
from mailstack.dkim.keys import public_value  # noqa: E402
from mailstack.inbound import dkimverify  # noqa: E402
from tests.support.dnsserver import ZoneResolver  # noqa: E402


def signed_message(key: sign.SigningKey) -> bytes:
    header, body = message_4k()
    body += b"\r\n"  # as every message received over SMTP ends
    h = canon.BodyHash()
    h.feed(body)
    field = sign.sign_one(canon.header_fields(header), h.digest(), key, int(time.time()))
    return field + header + b"\r\n" + body


def cpu_ms(n: int, one: Callable[[], object], rounds: int = 5) -> float:
    """CPU ms per call: the best of ``rounds`` rounds of ``n // rounds`` calls
    (the least disturbed by other work on a shared machine)."""
    one()  # warm caches (parsed keys), as a steady stream of mail from one sender does
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(n // rounds):
            one()
        best = min(best, time.process_time() - start)
    return best / (n // rounds) * 1000


def dkimpy_alone(message: bytes, records: dict[str, bytes | None]) -> list[tuple[str, str]]:
    """What ``verify_file`` did before the fast check."""
    return [dkimverify._verify_one(io.BytesIO(message).read(), 0, records)]


def whole(message: bytes, resolver: ZoneResolver) -> list[dkimverify.DKIMResult]:
    verifier = dkimverify.DKIMVerifier(resolver, lambda f, *a: succeed(f(*a)))

    def read(reader: Callable[[IO[bytes]], Any]) -> Deferred:
        return succeed(reader(io.BytesIO(message)))

    out: list[dkimverify.DKIMResult] = []
    verifier.verify_message(read).addCallback(out.extend)
    assert out and out[0].result == "pass", out
    return out


def measure(alg: str, tmp: str, n: int) -> str:
    """One line of figures for a key of type ``alg``."""
    store = keys.KeyStore(os.path.join(tmp, alg))
    store.keygen("example.org", "s1", alg)
    (key,) = store.active("example.org")
    record = f"v=DKIM1; k={alg}; p={public_value(key.private_key)}".encode()
    records: dict[str, bytes | None] = {"s1._domainkey.example.org.": record}
    resolver = ZoneResolver({"s1._domainkey.example.org": [("TXT", record.decode())]})
    message = signed_message(key)
    changed = message.replace(b"lazy dog", b"lazy cat", 1)
    assert dkimverify.verify_file(io.BytesIO(message), records, 1) == [("pass", "")]
    before = cpu_ms(n, lambda: dkimpy_alone(message, records))
    after = cpu_ms(n, lambda: dkimverify.verify_file(io.BytesIO(message), records, 1))
    full = cpu_ms(n, lambda: whole(message, resolver))
    failing = cpu_ms(n, lambda: dkimverify.verify_file(io.BytesIO(changed), records, 1))
    return (f"  {alg:8s} dkimpy alone {before:6.3f}  fast check {after:6.3f}  "
            f"whole verifier {full:6.3f}  (a failing message {failing:6.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    print(f"DKIM verification, 4 KB messages, {args.messages} each, CPU ms per message (lower is better)")
    with tempfile.TemporaryDirectory() as tmp:
        for alg in ("rsa", "ed25519"):
            print(measure(alg, tmp, args.messages))


if __name__ == "__main__":
    main()
