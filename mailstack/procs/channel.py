# -*- test-case-name: tests.procs.test_channel -*-
"""The AMP connection between the master and a session worker: whole boxes cut in one loop.

``amp.AMP`` reads its boxes through ``Int16StringReceiver`` and a state
machine: several Python calls for every key and every value.  The master
gets five or six commands per submitted message (login throttle, sending
limits, connection slots, kick) from every worker, and that parsing was a
visible share of its CPU per message.  ``Channel.dataReceived`` cuts every
whole box out of the data it is given in one loop (``split_boxes``) and
hands each to ``ampBoxReceived``, as amp's own parser does; a box cut off at
the end of the data waits for the rest.  Everything else (dispatch,
answers, errors, sending) is ``amp.AMP``'s.

The wire format is amp's (``BinaryBoxProtocol``): per key and value a 2-byte
big-endian length and the bytes, a key of 1 to 255 bytes, and a zero length
where the box ends.  A longer key drops the connection, as amp does
(``lengthLimitExceeded``).  AMP's protocol switching and StartTLS, which
need amp's parser, are not used on these connections.
"""

from __future__ import annotations

import struct

from twisted.protocols import amp

_LENGTH = struct.Struct("!H").unpack_from
MAX_KEY_LENGTH = 255  # amp.BinaryBoxProtocol._MAX_KEY_LENGTH


def split_boxes(data: bytes) -> tuple[list[amp.AmpBox], int, int]:
    """``(boxes, used, bad_key_length)``: the whole boxes at the start of ``data``,
    how many bytes they took, and the length of a key over ``MAX_KEY_LENGTH``
    (0 if none: the bytes from ``used`` on are the start of the next box)."""
    boxes: list[amp.AmpBox] = []
    end = len(data)
    used = pos = 0
    box = amp.AmpBox()
    while pos + 2 <= end:
        (key_length,) = _LENGTH(data, pos)
        if not key_length:
            pos += 2
            boxes.append(box)
            box = amp.AmpBox()
            used = pos
            continue
        if key_length > MAX_KEY_LENGTH:
            return boxes, used, key_length
        value_at = pos + 2 + key_length
        if value_at + 2 > end:
            break
        (value_length,) = _LENGTH(data, value_at)
        after = value_at + 2 + value_length
        if after > end:
            break
        box[data[pos + 2 : value_at]] = data[value_at + 2 : after]
        pos = after
    return boxes, used, 0


class Channel(amp.AMP):
    """``amp.AMP`` that reads its boxes with ``split_boxes`` (see the module docstring)."""

    _unparsed = b""

    def dataReceived(self, data: bytes) -> None:
        if self._unparsed:
            data = self._unparsed + data
        boxes, used, bad_key_length = split_boxes(data)
        self._unparsed = b"" if bad_key_length else data[used:]
        for box in boxes:
            self.boxReceiver.ampBoxReceived(box)
        if bad_key_length:
            self.lengthLimitExceeded(bad_key_length)
