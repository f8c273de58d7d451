"""CPU cost of DKIM signing per message, and of the body hash per MB.

Signs 4 KB messages the way the ``dkimsign`` check does (relaxed body hash
fed in chunks, then one DKIM-Signature per key over the header fields) with
an RSA-2048 and an Ed25519 key, and hashes 8 MB bodies of text and of base64.
Then runs the whole ``dkimsign`` check per message as a submission session
does (``data_begin``, the message streamed in 1500-byte writes, ``data`` with
the signer and its key store), thread pool calls made inline.  Prints CPU ms
per message (``time.process_time``: steady on a shared machine) and ms per
MB; the target is under 0.5 ms per message.

    PYTHONPATH=. python3 benchmarks/dkim_cost.py [--messages N]
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from mailstack.checks import dkimsign
from mailstack.dkim import canon, keys, sign, signer
from mailstack.headers import HeaderReader
from mailstack.intake import ReceivedMessage
from mailstack.pipeline import Connection, Transaction

HEADER = (
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.net>\r\nSubject: quarterly numbers\r\n"
    b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1234.abcd@example.org>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
)


def message_4k() -> tuple[bytes, bytes]:
    line = b"The quick brown fox jumps over the lazy dog, again and  again.\t \r\n"
    body = (line * (4096 // len(line) + 1))[:4096 - len(HEADER)]
    return HEADER, body


def per_message(key: sign.SigningKey, header: bytes, body: bytes, n: int) -> float:
    fields = canon.header_fields(header)
    start = time.process_time()
    for _ in range(n):
        h = canon.BodyHash()
        h.feed(body)
        sign.sign(fields, h.digest(), [key], 1796378400)
    return (time.process_time() - start) / n * 1000


def signature_only(key: sign.SigningKey, header: bytes, body: bytes, n: int) -> float:
    fields = canon.header_fields(header)
    h = canon.BodyHash()
    h.feed(body)
    digest = h.digest()
    start = time.process_time()
    for _ in range(n):
        sign.sign(fields, digest, [key], 1796378400)
    return (time.process_time() - start) / n * 1000


def whole_check(store: keys.KeyStore, message: bytes, n: int) -> float:
    """CPU ms per message of the dkimsign check, as a submission session runs it."""
    clock = Clock()
    clock.advance(1796378400)
    check = dkimsign.DKIMSignCheck(signer.DKIMSigner(store, lambda d: True), maybeDeferred, clock)
    conn = Connection("127.0.0.1", "submission", "mail.example.org", user="alice@example.org")
    reader = HeaderReader()
    reader.feed(message)
    reader.end()
    received = ReceivedMessage(reader.fields, len(message), message, 0, maybeDeferred)

    def one() -> None:
        txn = Transaction(None, {})
        observer = check.data_begin(conn, txn)
        for i in range(0, len(message), 1500):
            observer.write(message[i : i + 1500])
        check.data(conn, txn, received).addErrback(lambda f: f.raiseException())

    one()  # loads the key file
    start = time.process_time()
    for _ in range(n):
        one()
    return (time.process_time() - start) / n * 1000


def per_mb(body: bytes) -> float:
    start = time.perf_counter()
    h = canon.BodyHash()
    for i in range(0, len(body), 65536):
        h.feed(body[i : i + 65536])
    h.digest()
    return (time.perf_counter() - start) / (len(body) / 2**20) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    header, body = message_4k()
    print(f"DKIM signing, {len(header) + len(body)}-byte messages, {args.messages} each, CPU (lower is better)")
    with tempfile.TemporaryDirectory() as tmp:
        for alg in ("rsa", "ed25519"):
            store = keys.KeyStore(os.path.join(tmp, alg))
            store.keygen("example.org", "s1", alg)
            (key,) = store.active("example.org")
            whole = per_message(key, header, body, args.messages)
            alone = signature_only(key, header, body, args.messages)
            check = whole_check(store, header + b"\r\n" + body, args.messages)
            print(f"  {alg:8s} {whole:7.3f} ms/message  (of which the signature {alone:.3f} ms); "
                  f"the whole dkimsign check {check:.3f} ms/message")
    text = (b"Hello this is  a line of text with words\t and spaces   \r\n" * 200000)[: 8 << 20]
    b64 = base64.encodebytes(os.urandom(6 << 20)).replace(b"\n", b"\r\n")[: 8 << 20]
    print("Relaxed body hash (thread pool in the server)")
    print(f"  text     {per_mb(text):7.2f} ms/MB")
    print(f"  base64   {per_mb(b64):7.2f} ms/MB")


if __name__ == "__main__":
    main()
