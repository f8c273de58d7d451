"""Tests for mailstack.procs.channel: AMP boxes cut out of the data in one loop."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailstack.procs.channel import Channel, split_boxes
from mailstack.procs.commands import Kick
from mailstack.procs.statecmds import ThrottleBegin


@implementer(amp.IBoxReceiver)
class Boxes:
    """An IBoxReceiver that keeps what it is given."""

    def __init__(self) -> None:
        self.boxes: list[dict[bytes, bytes]] = []
        self.stopped: Failure | None = None

    def startReceivingBoxes(self, boxSender: Any) -> None:
        pass

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self.boxes.append(dict(box))

    def stopReceivingBoxes(self, reason: Failure) -> None:
        self.stopped = reason


def receiver(cls: type[amp.BinaryBoxProtocol]) -> tuple[amp.BinaryBoxProtocol, Boxes, StringTransport]:
    boxes = Boxes()
    verifyObject(amp.IBoxReceiver, boxes)
    proto = cls(boxes)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, boxes, transport


BOXES = [
    {b"_command": b"ThrottleBegin", b"_ask": b"1", b"peer": b"127.0.0.1", b"account": b"user0@bench.test"},
    {b"_command": b"Kick", b"queue_ids": b"\x00\x18" + b"0661d33997ebca08d788428e"},
    {b"_answer": b"1", b"ticket": b"7", b"delay": b"0.0"},
    {b"_command": b"Ready"},
    {b"k" * 255: b"v" * 1000, b"empty": b""},
]
WIRE = b"".join(amp.AmpBox(box).serialize() for box in BOXES)

box_dicts = st.dictionaries(st.binary(min_size=1, max_size=255), st.binary(max_size=300), max_size=4)


class SplitTests(SynchronousTestCase):
    def test_wholeBoxes(self) -> None:
        """Boxes serialized by amp come back key for key, and all the bytes are used."""
        boxes, used, bad = split_boxes(WIRE)
        self.assertEqual([dict(b) for b in boxes], BOXES)
        self.assertEqual((used, bad), (len(WIRE), 0))

    def test_partialBoxWaits(self) -> None:
        """A box cut off anywhere is left for later: only the boxes before it are used."""
        first = amp.AmpBox(BOXES[0]).serialize()
        for cut in range(len(first), len(WIRE) - len(amp.AmpBox(BOXES[-1]).serialize())):
            boxes, used, bad = split_boxes(WIRE[:cut])
            self.assertEqual(WIRE[:used], b"".join(amp.AmpBox(b).serialize() for b in BOXES[: len(boxes)]))
            self.assertEqual(bad, 0)

    def test_overlongKey(self) -> None:
        """A key length over 255 is reported, with the boxes before it."""
        data = amp.AmpBox(BOXES[3]).serialize() + b"\x01\x00" + b"k" * 256 + b"\x00\x01v\x00\x00"
        boxes, used, bad = split_boxes(data)
        self.assertEqual(([dict(b) for b in boxes], bad), ([BOXES[3]], 256))


class ChannelTests(SynchronousTestCase):
    def test_sameBoxesAsAmp(self) -> None:
        """Fed in pieces of any size, a Channel gives its receiver the boxes amp's own
        parser gives, in the same order."""
        for size in (1, 2, 3, 7, 64, len(WIRE)):
            got = []
            for cls in (amp.BinaryBoxProtocol, Channel):
                proto, boxes, _ = receiver(cls)
                for i in range(0, len(WIRE), size):
                    proto.dataReceived(WIRE[i : i + size])
                got.append(boxes.boxes)
            self.assertEqual(got[0], got[1], size)
            self.assertEqual(got[1], BOXES)

    @given(st.lists(box_dicts, max_size=5), st.lists(st.integers(min_value=1, max_value=50), max_size=20))
    @settings(max_examples=200, deadline=None)
    def test_anyBoxesAnySplit(self, boxes: list[dict[bytes, bytes]], cuts: list[int]) -> None:
        """Any boxes, split anywhere, arrive whole and in order."""
        wire = b"".join(amp.AmpBox(b).serialize() for b in boxes)
        proto, got, _ = receiver(Channel)
        at = 0
        for n in cuts:
            proto.dataReceived(wire[at : at + n])
            at += n
        proto.dataReceived(wire[at:])
        self.assertEqual(got.boxes, boxes)

    def test_overlongKeyDrops(self) -> None:
        """A key over 255 bytes drops the connection and is reported as amp reports it
        (TooLong); the boxes before it were delivered."""
        proto, boxes, transport = receiver(Channel)
        proto.dataReceived(amp.AmpBox(BOXES[3]).serialize() + b"\x01\x00" + b"k" * 300)
        self.assertEqual(boxes.boxes, [BOXES[3]])
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(Exception("closed")))
        assert boxes.stopped is not None
        self.assertTrue(boxes.stopped.check(amp.TooLong))

    def test_commandsBothWays(self) -> None:
        """Two Channels talk AMP: a command with an answer and one without."""
        kicked: list[list[str]] = []

        class Server(Channel):
            @ThrottleBegin.responder
            def begin(self, peer: str, account: str) -> dict[str, Any]:
                return {"ticket": len(peer + account), "delay": 0.5}

            @Kick.responder
            def kick(self, queue_ids: list[str]) -> dict[str, Any]:
                kicked.append(queue_ids)
                return {}

        server, client = Server(), Channel()
        pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=False)
        answer = client.callRemote(ThrottleBegin, peer="127.0.0.1", account="a@b.test")
        client.callRemote(Kick, queue_ids=["0661d33997ebca08d788428e", "0661d33997ebca08d788428f"])
        pump.flush()
        self.assertEqual(self.successResultOf(answer), {"ticket": 17, "delay": 0.5})
        self.assertEqual(kicked, [["0661d33997ebca08d788428e", "0661d33997ebca08d788428f"]])
