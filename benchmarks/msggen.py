"""Test messages: ~4 KB RFC 5322 messages with unique Message-IDs, and Maildir filling.

The same generator feeds the SMTP load client and the pre-generated mailboxes of the
POP3 workloads, so every server sees byte-identical mail.
"""

from __future__ import annotations

import os
import time
import uuid

_LINE = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\r\n"
assert len(_LINE) < 998


def make_message(sender: str, rcpt: str, size: int = 4096, msgid: str | None = None) -> tuple[str, bytes]:
    """(Message-ID, message bytes with CRLF line ends) of about ``size`` bytes."""
    msgid = msgid or f"<{uuid.uuid4().hex}@bench.test>"
    head = (
        f"From: <{sender}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: benchmark message {msgid}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: {msgid}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    body_len = max(0, size - len(head))
    n = body_len // len(_LINE) + 1
    body = (_LINE * n)[:body_len]
    # end on a line boundary
    cut = body.rfind(b"\r\n")
    body = body[: cut + 2] if cut >= 0 else b""
    return msgid, head + body


def make_big_message(sender: str, rcpt: str, size: int) -> tuple[str, bytes]:
    """A message of ``size`` bytes (e.g. 30 MB) made of 76-character base64-like lines."""
    msgid = f"<{uuid.uuid4().hex}@bench.test>"
    head = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: big\r\nMessage-ID: {msgid}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode("ascii")
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"
    n = max(1, (size - len(head)) // len(line))
    return msgid, head + line * n


def fill_maildir(path: str, count: int, rcpt: str = "user@bench.test", uid: int | None = None,
                 gid: int | None = None, linked: bool = False) -> int:
    """Write ``count`` ~4 KB messages straight into ``path``/new (no fsync: test data).

    With ``linked`` only the first message is written and the others are hard links
    (a fresh file every 10,000) to it (same bytes, its own name each): ~40x faster on a busy disk, and enough for
    STAT/UIDL, which never look inside.
    Creates ``tmp/ new/ cur/``; names follow the usual ``<time>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<vsize>``
    form (Dovecot's size fields; the messages have CRLF line ends, so both are the file size).
    Returns the number of bytes written.  With ``uid``/``gid`` the tree is chowned
    (Dovecot's mail processes run as that user).
    """
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    new = os.path.join(path, "new")
    now = int(time.time()) - 86400
    pid = os.getpid()
    total = 0
    _, template = make_message("sender@bench.test", rcpt, msgid="<TEMPLATE>")
    first = None
    data = b""
    for i in range(count):
        # ext4 allows 65,000 links per inode: a fresh file every 10,000 leaves room
        # for the seed plus several servers' copies.
        if linked and first is not None and i % 10000:
            name = f"{now + i // 1000}.M{i % 1000000}P{pid}Q{i}.bench,S={len(data)},W={len(data)}"
            os.link(first, os.path.join(new, name))
            total += len(data)
            continue
        data = template.replace(b"<TEMPLATE>", f"<{i:08d}.{uuid.uuid4().hex[:12]}@bench.test>".encode())
        name = f"{now + i // 1000}.M{i % 1000000}P{pid}Q{i}.bench,S={len(data)},W={len(data)}"
        fd = os.open(os.path.join(new, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        first = os.path.join(new, name)
        total += len(data)
    if uid is not None:
        chown_tree(path, uid, gid if gid is not None else uid)
    return total


def link_maildir(src: str, dst: str) -> int:
    """Hard-link every message of Maildir ``src``/new into ``dst``/new (same file system).

    Maildir files are never changed in place, so two servers can start from the same
    pre-generated files; a rename or unlink by one leaves the other's names alone.
    """
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(dst, sub), exist_ok=True)
    n = 0
    for e in os.scandir(os.path.join(src, "new")):
        os.link(e.path, os.path.join(dst, "new", e.name))
        n += 1
    return n


def chown_tree(path: str, uid: int, gid: int) -> None:
    for dirpath, _dirnames, filenames in os.walk(path):
        os.chown(dirpath, uid, gid)
        for n in filenames:
            os.chown(os.path.join(dirpath, n), uid, gid)


def count_maildir(path: str) -> int:
    """Messages in new/ and cur/ of one Maildir (0 if absent)."""
    n = 0
    for sub in ("new", "cur"):
        try:
            n += sum(1 for e in os.scandir(os.path.join(path, sub)) if not e.name.startswith("."))
        except FileNotFoundError:
            pass
    return n
