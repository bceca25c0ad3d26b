"""Smoke test of bench/ledger.py: both phases run and report numbers, and every entry ends in
PostgreSQL once. No timing is asserted."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


def test_ledger_bench_reports_rows_per_second(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.fail("the benchmark needs wrk: apt-get install -y wrk")
    out = tmp_path / "ledger.md"
    done = subprocess.run([sys.executable, "bench/ledger.py", "--duration", "1", "--store",
                           "memory", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = out.read_text()
    assert re.search(r"- steady: \d+ requests/s served, \d+ rows/s written", report), report
    assert re.search(r"- catch-up: \d+ entries built up .* wrote \d+ rows/s", report), report
    rows, distinct = map(int, re.search(r"at the end: (\d+) \((\d+) distinct", report).groups())
    assert rows == distinct > 0
