"""Smoke test of bench/fairness.py: both scenarios run and report each team's share and wait.
No timing and no share is asserted: on a shared machine in a second they mean little."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def test_fairness_bench_reports_each_teams_share_and_wait(tmp_path: Path) -> None:
    out = tmp_path / "fairness.md"
    argv = [sys.executable, "bench/fairness.py", "--duration", "1", "--warmup", "0", "--store",
            "memory", "--out", str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = out.read_text()
    for team in ("flood", "light", "heavy3", "heavy1"):
        row = re.search(rf"^\| {team} \| (\d+) \| [^|]+ \| (\d+) \| (\d+) \| ([\d.]+)% \| "
                        rf"(\d+|nan) ms \| (\d+|nan) ms \|$", report, re.MULTILINE)
        assert row, (team, report)
    assert re.search(r"\d+ slots in 1 s", report), report
