"""Smoke test of bench/scale.py: each case runs at a tiny size, every request is answered and the
report is written. No timing, memory or ratio is asserted: at this size they mean nothing."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT
from .test_bench import INSTALL, bench


def test_scale_bench_runs_every_case_and_writes_the_report(tmp_path: Path) -> None:
    missing = [tool for tool in INSTALL if bench.find_tool(tool) is None]
    if missing:
        pytest.fail(f"the benchmark needs {', '.join(missing)}: "
                    f"apt-get install -y {' '.join(INSTALL[m] for m in missing)}")
    out = tmp_path / "SCALE.md"
    argv = [sys.executable, "bench/scale.py", "--flat-requests", "300", "--slice", "1",
            "--connections", "4", "--held", "40", "--streams", "24", "--hold", "1",
            "--pollers", "30", "--tasks", "6", "--poll-duration", "1", "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # scale.py stops what it started, then exits
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"bench/scale.py took more than 240 s:\n{output}")
    assert proc.returncode == 0, output

    text = out.read_text()
    assert "`python3 bench/scale.py --flat-requests 300 --slice 1" in text
    for store in ("memory", "redis"):  # at least the 300 asked for, none failed
        row = re.search(rf"^\| {store} \| ([\d,]+) \| \d+ \| \d+ \| \d+ \| [\d.]+x \|"
                        r".* \| (\d+) \| \*\*(met|NOT met)\*\* \|$", text, re.M)
        assert row and int(row[1].replace(",", "")) >= 300 and row[2] == "0", text
    for load, asked in (("held requests", 40), ("concurrent streams", 24)):
        row = re.search(rf"^\| {asked} {load} \| {asked} \| {asked} \| {asked} \| none \| "
                        rf"(\d+) \|", text, re.M)
        assert row and int(row[1]) > 0, text  # all answered whole; the upstream held some
    row = re.search(r"^\| 30 \| 6 \| [\d.]+ \| ([\d,]+) of ([\d,]+) \| \d+ \| ([\d.]+) \|",
                    text, re.M)
    assert row and row[1] == row[2] and float(row[3]) > 0, text  # every poll answered
