"""pop3.mailbox: snapshot, index, UIDL, sizes, wire encoding, lock, update (QUIT)."""

from __future__ import annotations

import hashlib
import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailstack.pop3 import mailbox
from mailstack.pop3.mailbox import (
    INDEX_NAME,
    MailboxInUse,
    Maildrop,
    MessageGone,
    WireEncoder,
    encode_message,
    named_wire_size,
    plain_message,
    uidl_for,
    unique_name,
    wire_size_of,
)

from .support import message_files, message_path, temp_dir, write_message


def unstuff(reply_body: bytes) -> bytes:
    """What a client makes of a multi-line body: drop terminator and stuffing."""
    assert reply_body.endswith(b"\r\n.\r\n") or reply_body == b".\r\n"
    lines = reply_body[:-3].split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


class WireTests(SynchronousTestCase):
    def test_crlfAndStuffing(self) -> None:
        """Bare LF becomes CRLF, CRLF stays, lines starting with a dot get another."""
        self.assertEqual(encode_message(b"a\n.b\r\n..c\nd"), b"a\r\n..b\r\n...c\r\nd\r\n.\r\n")

    def test_leadingDot(self) -> None:
        """A dot at the very start of the message is stuffed too."""
        self.assertEqual(encode_message(b".x\n"), b"..x\r\n.\r\n")

    def test_empty(self) -> None:
        """An empty message is just the terminator and has size 0."""
        self.assertEqual(encode_message(b""), b".\r\n")
        self.assertEqual(wire_size_of([b""]), 0)

    def test_bareCRKept(self) -> None:
        """A bare CR is passed through and a trailing CR gets its CRLF after it."""
        self.assertEqual(encode_message(b"a\rb\r"), b"a\rb\r\r\n.\r\n")
        self.assertEqual(wire_size_of([b"a\rb\r"]), 6)

    def test_sizeCountsCRLFNotStuffing(self) -> None:
        """RFC 1939 section 11: LF counts two octets, stuffing dots are not counted."""
        self.assertEqual(wire_size_of([b".a\n.b\n"]), 8)

    def test_splitCRLF(self) -> None:
        """A CRLF split across chunks is neither doubled nor counted twice."""
        enc = WireEncoder()
        out = enc.feed(b"a\r") + enc.feed(b"\n.b\r") + enc.feed(b"\r\n") + enc.end()
        self.assertEqual(out, b"a\r\n..b\r\r\n.\r\n")
        self.assertEqual(wire_size_of([b"a\r", b"\n.b\r", b"\r\n"]), len(b"a\r\n.b\r\r\n"))

    @settings(max_examples=300, deadline=None)
    @given(
        st.binary(max_size=60).map(lambda b: b.translate(bytes.maketrans(b"\x00\x01\x02\x03", b"\r\n.\n"))), st.data()
    )
    def test_encoderMatchesSize(self, data: bytes, draw: st.DataObject) -> None:
        """For any bytes and any chunking, the unstuffed reply has exactly the counted size."""
        cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=4)))
        chunks = [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)], strict=True)]
        enc = WireEncoder()
        out = b"".join(enc.feed(c) for c in chunks) + enc.end()
        self.assertEqual(out, encode_message(data))
        self.assertEqual(len(unstuff(out)), wire_size_of(chunks))
        self.assertEqual(wire_size_of(chunks), wire_size_of([data]))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=60).map(lambda b: b.translate(bytes.maketrans(b"\x00\x01\x02\x03", b"\r\n.\n"))))
    def test_plainMessageShortcut(self, data: bytes) -> None:
        """plain_message(data) means the reply body is the bytes plus ``.CRLF``
        (the RETR shortcut), and the size is the file size."""
        if plain_message(data):
            self.assertEqual(data + b".\r\n", encode_message(data))
            self.assertEqual(wire_size_of([data]), len(data))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(min_size=1, max_size=60).map(lambda b: b.translate(bytes.maketrans(b"\x00\x01\x02", b"\r\n."))))
    def test_plainMessageExact(self, data: bytes) -> None:
        """plain_message misses no message that is its own wire form: for any
        non-empty bytes it is true exactly when encoding would change nothing."""
        self.assertEqual(plain_message(data), encode_message(data) == data + b".\r\n")

    def test_plainMessageCases(self) -> None:
        self.assertTrue(plain_message(b"Subject: x\r\n\r\nbody\r\n"))
        self.assertTrue(plain_message(b"a\rb\r\n"))  # a bare CR is passed as is
        for data in (b"", b"a", b"a\n", b"a\r\nb", b".a\r\n", b"a\r\n.b\r\n", b"a\nb\r\n", b"a\r"):
            self.assertFalse(plain_message(data), data)

    def test_wireSizeOfBigFile(self) -> None:
        """wire_size reads files larger than one read chunk correctly."""
        path = os.path.join(temp_dir(self), "m")
        data = (b"x" * 1000 + b"\n") * 3000 + b"\r"
        with open(path, "wb") as f:
            f.write(data)
        self.assertEqual(mailbox.wire_size(path), wire_size_of([data]))

    def test_topHeadersOnly(self) -> None:
        """TOP n 0: the header and the blank line."""
        msg = b"Subject: x\r\nFrom: y\r\n\r\nline1\r\nline2\r\n"
        self.assertEqual(encode_message(msg, 0), b"Subject: x\r\nFrom: y\r\n\r\n.\r\n")

    def test_topSomeLines(self) -> None:
        """TOP n 1 sends one body line; more lines than the body sends it all."""
        msg = b"Subject: x\n\n.line1\nline2\n"
        self.assertEqual(encode_message(msg, 1), b"Subject: x\r\n\r\n..line1\r\n.\r\n")
        self.assertEqual(encode_message(msg, 10), encode_message(msg))

    @given(st.integers(0, 40), st.integers(0, 5))
    def test_topChunked(self, cut: int, n: int) -> None:
        """TOP gives the same result however the file is chunked."""
        msg = b"A: 1\r\nB: 2\r\n\r\nx\r\n.y\r\nz\r\n"
        cut = min(cut, len(msg))
        enc = WireEncoder(n)
        out = enc.feed(msg[:cut]) + enc.feed(msg[cut:]) + enc.end()
        self.assertEqual(out, encode_message(msg, n))

    def test_topNoBody(self) -> None:
        """A message without a blank line is all header: TOP sends all of it."""
        self.assertEqual(encode_message(b"A: 1\nB: 2", 3), b"A: 1\r\nB: 2\r\n.\r\n")


class UidlTests(SynchronousTestCase):
    def test_plainName(self) -> None:
        """A usual unique name is its own UIDL."""
        self.assertEqual(uidl_for("1700000000.M1P2Q3.host,S=12"), "1700000000.M1P2Q3.host,S=12")

    def test_hashedWhenUnfit(self) -> None:
        """Names over 70 characters or with spaces/non-ASCII are hashed (RFC 1939 section 7)."""
        long = "x" * 71
        self.assertEqual(uidl_for(long), hashlib.sha1(long.encode()).hexdigest())
        self.assertEqual(len(uidl_for("a b")), 40)
        self.assertEqual(len(uidl_for("é")), 40)

    def test_uidlsFastPath(self) -> None:
        """uidls_for returns the names themselves when all fit, else hashes the misfits."""
        names = ["1.M1.h,S=1", "2.M2.h,S=2"]
        self.assertIs(mailbox.uidls_for(names), names)
        self.assertEqual(mailbox.uidls_for(["ok", "a b"]), ["ok", uidl_for("a b")])
        self.assertEqual(mailbox.uidls_for(["x" * 71]), [uidl_for("x" * 71)])

    def test_uniqueName(self) -> None:
        """The info part after ':' is not part of the unique name."""
        self.assertEqual(unique_name("123.M1.h,S=5:2,S"), "123.M1.h,S=5")
        self.assertEqual(unique_name("123.M1.h"), "123.M1.h")


class NamedSizeTests(SynchronousTestCase):
    def test_wField(self) -> None:
        """Dovecot's ``,W=<wire size>`` in the unique name is the size."""
        self.assertEqual(named_wire_size("1700000000.M1P2Q3.host,S=4000,W=4100"), 4100)
        self.assertEqual(named_wire_size("1700000000.M1P2Q3.host,W=7,S=5"), 7)
        self.assertEqual(named_wire_size("1700000000.M1P2Q3.host,W=0"), 0)

    def test_noOrBadWField(self) -> None:
        """No ``,W=`` (or a malformed one): None, the file must be read.  ``,S=``
        alone is the file size, which is not the wire size of LF-stored mail."""
        for name in (
            "1700000000.M1P2Q3.host,S=4000",
            "1700000000.M1P2Q3.host",
            "1700000000.M1P2Q3.host,W=",
            "1700000000.M1P2Q3.host,W=12x",
            "1700000000.M1P2Q3.host,W=-1",
            "1700000000.M1P2Q3.host,W=1234567890123456",
        ):
            self.assertIsNone(named_wire_size(name), name)


class MaildropTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(temp_dir(self), "alice")

    def open(self) -> Maildrop:
        drop = Maildrop.open(self.path)
        self.addCleanup(drop.close)
        return drop

    def quit(self) -> None:
        """One session that ends with QUIT: the messages in new/ move to cur/."""
        drop = Maildrop.open(self.path)
        drop.update()
        drop.close()

    def test_createsMissingMaildir(self) -> None:
        """A user who never got mail has an empty, freshly created Maildir."""
        drop = self.open()
        self.assertEqual(len(drop), 0)
        for sub in ("tmp", "new", "cur"):
            self.assertTrue(os.path.isdir(os.path.join(self.path, sub)))

    def test_newReadInPlaceMovedAtQuit(self) -> None:
        """Messages in new/ are read where they are, and move to cur/ with ':2,'
        (as Maildir readers do) only when the session ends with QUIT."""
        name = write_message(self.path, b"hello\n")
        drop = self.open()
        self.assertEqual((drop.uniques, drop.sizes, drop.uidls), ([name], [7], [name]))
        self.assertEqual(os.listdir(os.path.join(self.path, "new")), [name])
        self.assertEqual(drop.read_start(0, 100), (None, b"hello\n"))
        self.assertEqual(drop.update(), 0)
        drop.close()
        self.assertEqual(os.listdir(os.path.join(self.path, "new")), [])
        self.assertEqual(os.listdir(os.path.join(self.path, "cur")), [name + ":2,"])
        drop = self.open()
        self.assertEqual((drop.uniques, drop.sizes, drop.new_sizes), ([name], [7], 0))

    def test_noQuitMovesNothing(self) -> None:
        """A session closed without update() leaves new/ as it was."""
        name = write_message(self.path, b"hello\n")
        self.open().close()
        self.assertEqual(os.listdir(os.path.join(self.path, "new")), [name])
        self.assertEqual(os.listdir(os.path.join(self.path, "cur")), [])

    def test_newAfterCur(self) -> None:
        """Messages still in new/ are numbered after those in cur/, even older ones."""
        seen = write_message(self.path, b"a", when=1700000005)
        self.quit()
        late = write_message(self.path, b"b", when=1700000009)
        early = write_message(self.path, b"c", when=1700000001)
        drop = self.open()
        self.assertEqual(drop.uniques, [seen, early, late])
        self.assertEqual(drop._file(0), os.path.join(self.path, "cur", seen + ":2,"))
        self.assertEqual(drop._file(2), os.path.join(self.path, "new", late))

    def test_movedByOtherReaderCountedOnce(self) -> None:
        """A message in both new/ and cur/ (another reader moving it between the
        two listings) is one message, read from cur/."""
        name = write_message(self.path, b"a")
        os.link(os.path.join(self.path, "new", name), os.path.join(self.path, "cur", name + ":2,S"))
        drop = self.open()
        self.assertEqual(drop.uniques, [name])
        self.assertEqual(drop._file(0), os.path.join(self.path, "cur", name + ":2,S"))

    def test_orderByDeliveryTime(self) -> None:
        """New messages are numbered by delivery time, after those already indexed."""
        b = write_message(self.path, b"b", when=1700000002)
        a = write_message(self.path, b"a", when=1700000001)
        drop = self.open()
        self.assertEqual(drop.uniques, [a, b])
        drop.update()
        drop.close()
        c = write_message(self.path, b"c", when=1600000000)
        drop = self.open()
        self.assertEqual(drop.uniques, [a, b, c])

    def test_orderByMicroseconds(self) -> None:
        """Within one second, .M<usec> orders numerically (M99 before M100)."""
        cur = os.path.join(self.path, "cur")
        os.makedirs(cur)
        for name in ("5.M100P1.h:2,", "5.M99P1.h:2,", "4.M7P1.h:2,"):
            open(os.path.join(cur, name), "wb").close()
        self.assertEqual(self.open().uniques, ["4.M7P1.h", "5.M99P1.h", "5.M100P1.h"])

    def test_indexAvoidsRereading(self) -> None:
        """The second open reads no message file: sizes come from the index."""
        for i in range(5):
            write_message(self.path, b"x\n" * i)
        drop = self.open()
        self.assertEqual(drop.new_sizes, 5)
        sizes = list(drop.sizes)
        drop.update()  # moves them to cur/ and indexes them there
        drop.close()
        opened: list[str] = []
        real_open, real_os_open = mailbox._open, mailbox._os_open

        def spy(path: str, *a: object) -> object:
            opened.append(path)
            return real_open(path, *a)

        def os_spy(path: str, *a: int) -> int:
            opened.append(path)
            return real_os_open(path, *a)

        self.patch(mailbox, "_open", spy)
        self.patch(mailbox, "_os_open", os_spy)
        drop = self.open()
        self.assertEqual(drop.new_sizes, 0)
        self.assertEqual(drop.sizes, sizes)
        self.assertEqual([os.path.basename(p) for p in opened], [INDEX_NAME])
        drop.close()
        write_message(self.path, b"new\n")
        drop = self.open()
        self.assertEqual(drop.new_sizes, 1)
        self.assertEqual(len(opened), 3)  # the index, then only the new message

    def test_sizeFromNameNotRead(self) -> None:
        """Messages whose names carry ``,W=`` are not opened at login: the size is
        taken from the name (Dovecot's convention), and it is what RETR sends."""
        new = os.path.join(self.path, "new")
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)
        bodies = [b"Subject: a\r\n\r\n.dot\r\nline\r\n", b"Subject: b\r\n\r\nbody\r\n" * 3]
        for k, data in enumerate(bodies):
            with open(os.path.join(new, f"1700000000.M{k}P1Q{k}.h,S={len(data)},W={len(data)}"), "wb") as f:
                f.write(data)
        write_message(self.path, b"lf only\n", when=1700000001)  # ,S= only: read
        opened: list[str] = []
        real_os_open = mailbox._os_open

        def os_spy(path: str, *a: int) -> int:
            opened.append(os.path.basename(path))
            return real_os_open(path, *a)

        self.patch(mailbox, "_os_open", os_spy)
        drop = self.open()
        self.assertEqual(drop.new_sizes, 1)
        self.assertEqual(len(opened), 1)
        self.assertIn(",S=8", opened[0])
        self.assertEqual(drop.sizes, [len(bodies[0]), len(bodies[1]), len(b"lf only\r\n")])
        for i in range(len(drop)):
            f, data = drop.read_start(i, 1 << 16)
            self.assertIsNone(f)
            self.assertEqual(len(unstuff(encode_message(data))), drop.sizes[i])

    def test_indexWrittenWholeNoLeftovers(self) -> None:
        """The index is replaced by rename (no temporary file left behind) and
        holds every message; renames new/ -> cur/ keep the info part."""
        write_message(self.path, b"a\r\n")
        write_message(self.path, b"b\r\n", info=":2,S")
        self.quit()
        self.assertEqual(sorted(n for n in os.listdir(self.path) if n.startswith(".")), [])
        with open(os.path.join(self.path, INDEX_NAME), "rb") as f:
            doc = json.loads(f.read())
        self.assertEqual(len(doc["names"]), 2)
        self.assertEqual(sorted(n.partition(":")[2] for n in os.listdir(os.path.join(self.path, "cur"))), ["2,", "2,S"])
        self.assertEqual(os.listdir(os.path.join(self.path, "new")), [])

    def test_unchangedFolderNotListed(self) -> None:
        """With cur/ unchanged since the index (mtime old enough), cur/ is not even listed."""
        names = [write_message(self.path, b"m%d\n" % i) for i in range(3)]
        self.quit()
        path = message_path(self.path, names[2])
        os.rename(path, path + "FS")  # flags set by another reader
        self.patch(mailbox, "_now_ns", lambda: 10**20)  # every mtime is old now
        first = self.open()
        expected = (list(first.uniques), list(first.sizes), [first._file(i) for i in range(3)])
        first.close()
        listed: list[str] = []
        real = mailbox._listdir

        def spy(path: str) -> list[str]:
            listed.append(os.path.basename(path))
            return real(path)

        self.patch(mailbox, "_listdir", spy)
        drop = self.open()
        self.assertEqual(listed, ["new"])
        self.assertEqual((drop.uniques, drop.sizes, [drop._file(i) for i in range(3)]), expected)
        self.assertTrue(drop._file(2).endswith(":2,FS"))
        for i in range(3):
            self.assertEqual(drop.read_start(i, 100)[1], b"m%d\n" % i)

    def test_changedFolderListed(self) -> None:
        """A flag rename changes cur/'s mtime: the folder is listed again, UIDLs unchanged."""
        write_message(self.path, b"a\n")
        self.quit()
        self.patch(mailbox, "_now_ns", lambda: 10**20)
        drop = self.open()
        before = list(drop.uidls)
        old = drop._file(0)
        drop.close()
        st = os.stat(os.path.join(self.path, "cur"))
        os.rename(old, old + "S")
        os.utime(os.path.join(self.path, "cur"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        drop = self.open()
        self.assertEqual(drop.uidls, before)
        self.assertEqual(drop._file(0), old + "S")

    def test_recentMtimeNotTrusted(self) -> None:
        """An mtime younger than RACY_NS is stored as null, so the next open lists cur/."""
        write_message(self.path, b"a\n")
        self.quit()
        self.open().close()
        with open(os.path.join(self.path, INDEX_NAME)) as f:
            self.assertIsNone(json.load(f)["cur_mtime_ns"])

    def test_indexDropsGoneMessages(self) -> None:
        """A message deleted by another reader leaves the index on the next open."""
        a = write_message(self.path, b"a")
        b = write_message(self.path, b"b")
        self.quit()
        os.unlink(message_path(self.path, a))
        drop = self.open()
        self.assertEqual(drop.uniques, [b])
        with open(os.path.join(self.path, INDEX_NAME)) as f:
            self.assertEqual(json.load(f)["names"], [b])

    def test_corruptIndexRebuilt(self) -> None:
        """An unreadable index is rebuilt from the files."""
        write_message(self.path, b"abc\n")
        self.quit()
        with open(os.path.join(self.path, INDEX_NAME), "wb") as f:
            f.write(b"{not json")
        drop = self.open()
        self.assertEqual(drop.sizes, [5])

    def test_uidlSurvivesFlagRename(self) -> None:
        """Renaming cur/X:2, to cur/X:2,S (another reader) keeps UIDL and size."""
        name = write_message(self.path, b"abc\n")
        drop = self.open()
        before = (list(drop.uidls), list(drop.sizes))
        drop.update()
        drop.close()
        os.rename(os.path.join(self.path, "cur", name + ":2,"), os.path.join(self.path, "cur", name + ":2,S"))
        drop = self.open()
        self.assertEqual((drop.uidls, drop.sizes), before)

    def test_lockIsExclusive(self) -> None:
        """A second open of a locked maildrop raises MailboxInUse; close releases it."""
        drop = self.open()
        self.assertRaises(MailboxInUse, Maildrop.open, self.path)
        drop.close()
        self.open()

    def test_readAfterRename(self) -> None:
        """A message renamed after the snapshot is found again."""
        write_message(self.path, b"abc\n")
        drop = self.open()
        os.rename(drop._file(0), os.path.join(self.path, "cur", drop.uniques[0] + ":2,RS"))
        f, data = drop.read_start(0, 100)
        self.assertIsNone(f)
        self.assertEqual(data, b"abc\n")

    def test_readGone(self) -> None:
        """A message deleted after the snapshot raises MessageGone."""
        write_message(self.path, b"abc\n")
        drop = self.open()
        os.unlink(drop._file(0))
        self.assertRaises(MessageGone, drop.read_start, 0, 100)

    def test_readStartLarge(self) -> None:
        """read_start leaves the file open when there may be more."""
        write_message(self.path, b"x" * 100)
        drop = self.open()
        f, data = drop.read_start(0, 10)
        self.assertEqual(data, b"x" * 10)
        self.assertEqual(f.read(), b"x" * 90)
        f.close()

    def test_updateRemovesMarkedOnly(self) -> None:
        """update unlinks the marked messages, in cur/ and in new/, and nothing else."""
        write_message(self.path, b"a")
        kept = write_message(self.path, b"b")
        self.quit()
        write_message(self.path, b"c")
        keep = write_message(self.path, b"d")
        drop = self.open()
        drop.deleted[:] = b"\x01\x00\x01\x00"
        self.assertEqual(drop.update(), 0)
        self.assertEqual(message_files(self.path), sorted([kept + ":2,", keep + ":2,"]))

    def test_updateAlreadyGone(self) -> None:
        """A marked message someone else removed is not a failure."""
        write_message(self.path, b"a")
        drop = self.open()
        os.unlink(drop._file(0))
        drop.deleted[0] = 1
        self.assertEqual(drop.update(), 0)

    def test_updateFollowsRename(self) -> None:
        """A marked message renamed by another reader is still removed."""
        write_message(self.path, b"a")
        drop = self.open()
        os.rename(drop._file(0), os.path.join(self.path, "cur", drop.uniques[0] + ":2,S"))
        drop.deleted[0] = 1
        self.assertEqual(drop.update(), 0)
        self.assertEqual(os.listdir(os.path.join(self.path, "cur")), [])

    def test_updateCountsFailures(self) -> None:
        """An unlink that fails (other than "already gone") is counted, the other
        marked messages are still removed, and their folder is fsynced once."""
        for body in (b"a", b"b", b"c"):
            write_message(self.path, body)
        drop = self.open()
        drop.deleted[:] = b"\x01\x01\x01"
        bad = drop.uniques[1]
        real_unlink = mailbox._unlink
        syncs: list[int] = []
        real_fsync = os.fsync

        def unlink(name: str, **kw: int) -> None:
            if name.startswith(bad):
                raise PermissionError(name)
            real_unlink(name, **kw)

        def fsync(fd: int) -> None:
            syncs.append(fd)
            real_fsync(fd)

        self.patch(mailbox, "_unlink", unlink)
        self.patch(mailbox.os, "fsync", fsync)
        self.assertEqual(drop.update(), 1)
        self.assertEqual(message_files(self.path), [bad])
        self.assertEqual(len(syncs), 1)

    def test_oddFileNames(self) -> None:
        """Non-UTF-8 names get a hashed UIDL that survives the index; names with LF are ignored."""
        os.makedirs(os.path.join(self.path, "cur"))
        with open(os.path.join(os.fsencode(self.path), b"cur", b"17.M\xff.h:2,"), "wb") as f:
            f.write(b"x\n")
        with open(os.path.join(self.path, "cur", "18.M\n.h:2,"), "wb") as f:
            f.write(b"y\n")
        drop = self.open()
        self.assertEqual(len(drop), 1)
        uidl = drop.uidls[0]
        self.assertEqual(len(uidl), 40)
        drop.close()
        self.patch(mailbox, "_now_ns", lambda: 10**20)
        for _ in range(2):
            drop = self.open()
            self.assertEqual((drop.uidls, drop.new_sizes), ([uidl], 0))
            self.assertEqual(drop.read_start(0, 10)[1], b"x\n")
            drop.close()

    def test_stdlibReadsIt(self) -> None:
        """Python's mailbox.Maildir still reads the folder with our index and lock in it."""
        import mailbox as stdlib

        write_message(self.path, b"Subject: hi\n\nbody\n")
        self.open().close()
        box = stdlib.Maildir(self.path, create=False)
        self.assertEqual([m["subject"] for m in box], ["hi"])
