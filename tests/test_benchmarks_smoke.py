"""The benchmark script keeps working: a --quick run (tens of messages) end to end.

Only checks that the run completes, prints the table and writes sane JSON; the
figures themselves are never asserted (they belong in the closing note and README,
not in a timed test; the run's only time bound is the test timeout).  The
Postfix/Dovecot side is skipped when their binaries (or root) are missing; CI
installs them (.ci/install-debian), so normally it runs.  The end-to-end run is
marked ``bench`` and ``e2e`` (it starts real servers): ``pytest -m "not e2e"``
leaves it out.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from types import ModuleType

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "run.py")


@pytest.fixture
def bench(monkeypatch):
    """Import a module of benchmarks/ (they import each other by plain name), for this test only."""
    monkeypatch.syspath_prepend(BENCHMARKS)

    def load(name: str) -> ModuleType:
        return importlib.import_module(name)

    return load


@pytest.mark.bench
@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_quick_run_prints_table_and_writes_json(tmp_path, bench):
    """``run.py --quick`` completes, prints one row per workload and writes JSON
    with a reference and a mailstack side; rows for parts that are missing say
    n/a instead of failing the run."""
    reference = bench("refservers").available()[0]
    out = tmp_path / "bench.json"
    # Default temp folder: Postfix's socket paths must stay short (sun_path is 108 bytes).
    args = [sys.executable, SCRIPT, "--quick", "--json", str(out)]
    if not reference:
        args.append("--skip-reference")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=200, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| workload" in proc.stdout
    assert "accept+Maildir, 50 sessions" in proc.stdout
    data = json.loads(out.read_text())
    assert set(data) >= {"reference", "mailstack", "meta", "table"}
    assert data["meta"]["quick"] is True
    for side in ("reference", "mailstack"):
        for key in ("accept10", "accept50", "relay10", "pop3_download"):
            row = data[side][key]
            assert "na" in row or row["value"] > 0, (side, key, row)
            # an acknowledged message must never go missing
            assert not row.get("lost"), (side, key, row)
    if reference:
        assert "na" not in data["reference"]["accept10"], data["reference"]["accept10"]
        assert "na" not in data["reference"]["pop3_download"], data["reference"]["pop3_download"]
    # the temp folder (servers' queues and Maildirs) is removed afterwards
    assert not os.path.exists(data["meta"]["work"])


def test_percentile_nearest_rank(bench):
    """p50/p99 use the nearest-rank method over the recorded latencies."""
    loadclient = bench("loadclient")

    values = [i / 100 for i in range(1, 101)]
    assert loadclient.percentile(values, 50) == 0.5
    assert loadclient.percentile(values, 99) == 0.99
    assert loadclient.percentile([], 99) is None


def test_dot_stuffing(bench):
    """Lines starting with a dot are doubled and the message ends with CRLF . CRLF."""
    loadclient = bench("loadclient")

    assert loadclient.dot_stuff(b".a\r\nb\r\n.c\r\n") == b"..a\r\nb\r\n..c\r\n.\r\n"
    assert loadclient.dot_stuff(b"x") == b"x\r\n.\r\n"
