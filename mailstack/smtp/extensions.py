# -*- test-case-name: tests.smtp.test_client_extensions -*-
"""What a queued message asks of the next hop: SMTPUTF8 (RFC 6531) and DSN (RFC 3461).

``Request.of(entry)`` is built by the remote agent from the queue entry;
``SMTPClientProtocol`` turns it into MAIL and RCPT parameters for a server
that offers the extension:

* SMTPUTF8: needed when the client gave it at MAIL or an address is not
  ASCII; a server that does not offer it cannot take the message, and each
  recipient fails with 553 5.6.7 (RFC 6531 section 3.4: no downgrade here);
* DSN: RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT, xtext-encoded, only
  when the server offers DSN (RFC 3461 section 5.2.1); otherwise nothing is
  sent and the queue answers NOTIFY=SUCCESS with a "relayed" notice itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mailstack import dsnparams
from mailstack.queue.entry import QueueEntry


@dataclass(frozen=True)
class Request:
    smtputf8: bool = False
    ret: str = ""
    envid: str = ""
    rcpt: Mapping[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)  # address -> (NOTIFY, ORCPT)

    @classmethod
    def of(cls, entry: QueueEntry) -> Request:
        return cls(
            smtputf8=entry.smtputf8,
            ret=entry.ret,
            envid=entry.envid,
            rcpt={r.address: (tuple(r.notify), r.orcpt) for r in entry.recipients if r.notify or r.orcpt},
        )

    def mail_params(self, offered: Mapping[str, str]) -> list[str]:
        if "DSN" not in offered:
            return []
        params = [f"RET={self.ret}"] if self.ret else []
        if self.envid:
            params.append(f"ENVID={dsnparams.xtext_encode(self.envid)}")
        return params

    def rcpt_params(self, address: str, offered: Mapping[str, str]) -> str:
        notify, orcpt = self.rcpt.get(address, ((), ""))
        if "DSN" not in offered:
            return ""
        out = f" NOTIFY={','.join(notify)}" if notify else ""
        if orcpt:
            out += f" ORCPT={dsnparams.orcpt_param(orcpt)}"
        return out
