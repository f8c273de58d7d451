# -*- test-case-name: tests.queue.test_store -*-
"""The queue entry: envelope plus per-recipient delivery state.

Stored as UTF-8 JSON (``queue/env/<id>.json``, see ``queue/store.py``); the
``version`` field lets later formats read older ones.  Times are Unix seconds.

The DSN and SMTPUTF8 fields (``ret``, ``envid``, ``smtputf8``; per recipient
``notify``, ``orcpt``) are optional keys: absent means their default, and
``to_json`` leaves out those at their default, so an entry that uses neither
extension is written exactly as before (an older mailstack reads it) and older
entries read as they are.  Still format version 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_VERSION = 1

PENDING = "pending"  # not yet delivered; may have been tried (attempts > 0)
DELIVERED = "delivered"  # final: accepted by a maildir or a remote server
FAILED = "failed"  # final: will never be delivered; a bounce is owed unless sender is <>


_NUMBER = (int, float)
# The JSON form, exact keys and types (a bool is not taken for a number).
ENTRY_TYPES: dict[str, Any] = {
    "id": (str,), "sender": (str,), "arrival": _NUMBER, "size": (int,), "user": (str,), "peer": (str,),
    "delay_warned": (bool,), "version": _NUMBER, "recipients": (list,),
}
# Keys an envelope may lack (written before they existed); QueueEntry's defaults apply.
OPTIONAL_TYPES: dict[str, Any] = {"held_since": _NUMBER, "held_time": _NUMBER}
RECIPIENT_TYPES: dict[str, Any] = {
    "address": (str,), "original": (str,), "local": (bool,), "status": (str,), "attempts": (int,),
    "next_attempt": _NUMBER, "last_reply": (str,), "last_host": (str,), "notified": (bool,), "history": (list,),
}
# Optional keys (RFC 3461 DSN requests, RFC 6531), with their defaults.
ENTRY_OPTIONAL: dict[str, Any] = {"ret": "", "envid": "", "smtputf8": False}
RECIPIENT_OPTIONAL: dict[str, Any] = {"notify": [], "orcpt": ""}


def _shaped(
    data: dict[str, Any], types: dict[str, Any], optional: dict[str, Any], optional_types: dict[str, Any] | None = None
) -> bool:
    """Every required key (``types``: key -> allowed types), optional keys only from
    ``optional`` (key -> default, of the type required) or ``optional_types``."""
    extra = optional_types or {}
    keys = data.keys()
    if not (types.keys() <= keys <= types.keys() | optional.keys() | extra.keys()):
        return False
    if any(type(data[k]) not in kinds for k, kinds in types.items()):
        return False
    if any(type(data[k]) not in kinds for k, kinds in extra.items() if k in data):
        return False
    return all(type(data[k]) is type(v) for k, v in optional.items() if k in data)


def _compact(data: dict[str, Any], optional: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in optional or v != optional[k]}


def well_formed(data: Any, queue_id: str) -> bool:
    """Whether parsed JSON is a valid envelope of ``queue_id``.

    Valid JSON of the wrong shape (a damaged or hand-edited file) counts as
    unreadable too: it would otherwise fail later, in the manager's scheduling
    or the admin listing.  Checked on the dict, so a listing builds no entry.
    """
    if type(data) is not dict or not _shaped(data, ENTRY_TYPES, ENTRY_OPTIONAL, OPTIONAL_TYPES):
        return False
    if data["id"] != queue_id or data["version"] != FORMAT_VERSION:
        return False
    for r in data["recipients"]:
        if type(r) is not dict or not _shaped(r, RECIPIENT_TYPES, RECIPIENT_OPTIONAL):
            return False
        if any(type(n) is not str for n in r.get("notify", ())):
            return False
        if any(type(h) is not dict for h in r["history"]):
            return False
    return True


@dataclass
class RecipientState:
    address: str  # final mailbox after alias expansion, "local@domain"
    original: str  # as given at RCPT TO (DSN Original-Recipient)
    local: bool  # True: a maildir here; False: remote delivery
    status: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""  # "451 4.4.1 text", as the remote or we said it
    last_host: str = ""  # MX host (and IP) of the last attempt
    notified: bool = False  # the failure DSN for this recipient is committed (or not owed)
    history: list[dict[str, Any]] = field(default_factory=list)  # {"time", "host", "reply"}
    notify: list[str] = field(default_factory=list)  # RFC 3461 NOTIFY= (upper case); [] if not given
    orcpt: str = ""  # RFC 3461 ORCPT=, "addr-type;decoded"

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    @property
    def final(self) -> bool:
        return self.status in (DELIVERED, FAILED)

    def wants(self, kind: str) -> bool:
        """Whether a DSN of ``kind`` (SUCCESS, FAILURE, DELAY) was asked for (RFC 3461 section 4.1:
        without NOTIFY, FAILURE and DELAY)."""
        return kind in self.notify if self.notify else kind != "SUCCESS"

    @property
    def success_owed(self) -> bool:
        """Delivered with NOTIFY=SUCCESS and no notice committed yet."""
        return self.status == DELIVERED and "SUCCESS" in self.notify and not self.notified


@dataclass
class QueueEntry:
    id: str
    sender: str  # "" for the null reverse-path <>
    arrival: float
    recipients: list[RecipientState]
    size: int = 0
    user: str = ""  # authenticated submitter, if any
    peer: str = ""  # client IP it came from
    delay_warned: bool = False
    version: int = FORMAT_VERSION
    ret: str = ""  # RFC 3461 RET=: "FULL", "HDRS" or ""
    envid: str = ""  # RFC 3461 ENVID=, decoded
    smtputf8: bool = False  # RFC 6531: relaying needs a next hop that offers SMTPUTF8
    # ``mailstack queue hold``: when the hold began (0: not held), and the time
    # spent held before, which the queue lifetime does not count.
    held_since: float = 0.0
    held_time: float = 0.0

    @property
    def held(self) -> bool:
        return self.held_since > 0

    @property
    def expiry_base(self) -> float:
        """The arrival as the queue lifetime sees it: later by the time spent held."""
        return self.arrival + self.held_time

    @property
    def done(self) -> bool:
        """Every recipient final and every owed bounce committed: the entry may go."""
        return all(
            r.final and (r.notified or not self.sender or (r.status == DELIVERED and not r.success_owed))
            for r in self.recipients
        )

    def to_json(self) -> dict[str, Any]:
        data = _compact(asdict(self), ENTRY_OPTIONAL)
        data["recipients"] = [_compact(r, RECIPIENT_OPTIONAL) for r in data["recipients"]]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueueEntry:
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown queue entry version {data.get('version')!r}")
        fields = dict(data)
        fields["recipients"] = [RecipientState(**r) for r in data["recipients"]]
        return cls(**fields)
