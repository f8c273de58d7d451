"""Accept throughput of the MX listener with the inbound checks off and on.

Starts a fake DNS server (tests/support/dnsserver.py) answering the SPF, DMARC
and DNSBL questions, then twice a mailstack ``twistd`` asking it: once with
every ``[inbound]`` check off, once with DNSBL, SPF, greylisting, DKIM,
DMARC and Authentication-Results on (rspamd, a separate daemon, is left out),
and drives each with ``loadclient.run_load``::

    PYTHONPATH=$PWD python3 benchmarks/inbound_bench.py --messages 2000 --sessions 20

Prints one JSON object: the loadclient summary of each run, the server's CPU
time per accepted message (user + system, from /proc: steadier than the rate
on a machine shared with other work) and the ratios.  The greylist triplet is
passed before the timed run, as a known sender's is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import smtplib
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from loadclient import run_load  # noqa: E402 (after the sys.path set-up above)

from tests.e2e.harness import Server  # noqa: E402 (after the sys.path set-up above)
from tests.support.dnsserver import DNSServer  # noqa: E402 (after the sys.path set-up above)

SENDER = "loadclient@client.test"
RCPT = "alice@localhost"
ZONE = {
    "client.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    "_dmarc.client.test": [("TXT", "v=DMARC1; p=reject")],
    "bench.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    "_dmarc.bench.test": [("TXT", "v=DMARC1; p=none")],
}
OFF = "[inbound]\nspf = false\ndkim = false\ndmarc = false\n"
ON = '[inbound]\ndnsbl = ["bl.test"]\ngreylist = "1s"\n'


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(root: str, dns: DNSServer, inbound: str, messages: int, sessions: int) -> dict:
    server = Server(root, f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n{inbound}')
    r = server.admin("user", "add", RCPT, "--password-stdin", input="bench-pw\n")
    assert r.returncode == 0, r.stderr
    server.start()
    try:
        port = server.ports["smtp"]
        if "greylist" in inbound:  # the first try of the triplet is deferred
            try:
                with smtplib.SMTP("127.0.0.1", port) as c:
                    c.sendmail(SENDER, [RCPT], b"Subject: warm-up\r\n\r\nx\r\n")
            except smtplib.SMTPRecipientsRefused:
                pass
            time.sleep(1.5)
        assert server.process is not None
        before = cpu_seconds(server.process.pid)
        result = asyncio.run(run_load("127.0.0.1", port, messages, sessions, lambda i: RCPT, sender=SENDER))
        summary = result.summary()
        summary["server_cpu_ms_per_msg"] = round(
            1000 * (cpu_seconds(server.process.pid) - before) / max(result.sent, 1), 3
        )
        return summary
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--sessions", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dns = DNSServer(ZONE, tmp)
        dns.start()
        try:
            os.mkdir(os.path.join(tmp, "off"))
            os.mkdir(os.path.join(tmp, "on"))
            off = run(os.path.join(tmp, "off"), dns, OFF, args.messages, args.sessions)
            on = run(os.path.join(tmp, "on"), dns, ON, args.messages, args.sessions)
        finally:
            dns.stop()
    ratio = on["accept_msg_per_s"] / off["accept_msg_per_s"] if off["accept_msg_per_s"] else None
    cpu = on["server_cpu_ms_per_msg"] / off["server_cpu_ms_per_msg"] if off["server_cpu_ms_per_msg"] else None
    print(
        json.dumps(
            {
                "checks_off": off,
                "checks_on": on,
                "rate_on_over_off": ratio and round(ratio, 3),
                "cpu_on_over_off": cpu and round(cpu, 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
