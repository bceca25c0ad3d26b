"""Smoke test of bench/scale.py: each case runs at a tiny size, every request is answered and the
report is written. No timing, memory or ratio is asserted: at this size they mean nothing."""

from __future__ import annotations

import re
from pathlib import Path

from .test_bench import run_script


def test_scale_bench_runs_every_case_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "SCALE.md"
    run_script("bench/scale.py", "--flat-requests", "300", "--slice", "1", "--connections", "4",
               "--held", "40", "--streams", "24", "--hold", "1", "--pollers", "30", "--tasks",
               "6", "--poll-duration", "1", "--out", str(out))

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
