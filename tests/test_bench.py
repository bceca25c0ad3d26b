"""Smoke test of the benchmark: `bench/run.py` starts every case, loads it for a second and
writes a table with one row of numbers per case. No timing is asserted: numbers on a shared
machine mean nothing, the table's existence does."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import Mock

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CASES = ["a", "a2", "b", "c", "c_aio", "k", "d", "e", "f", "g"]
INSTALL = {"wrk": "wrk", "nginx": "nginx", "redis-server": "redis-server"}


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _bench()


def run_script(script: str, *args: str) -> None:
    """Run a benchmark script with its tools checked first; fail with its output if it fails
    or takes more than 4 minutes (it stops what it started on SIGTERM)."""
    missing = [tool for tool in INSTALL if bench.find_tool(tool) is None]
    if missing:
        pytest.fail(f"the benchmark needs {', '.join(missing)}: "
                    f"apt-get install -y {' '.join(INSTALL[m] for m in missing)}")
    proc = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"{script} took more than 240 s:\n{output}")
    assert proc.returncode == 0, output


def test_bench_writes_a_row_of_numbers_per_case(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    run_script("bench/run.py", "--duration", "1", "--runs", "1", "--connections", "4",
               "--warmup", "0", "--single-duration", "1", "--out", str(out))

    text = out.read_text()
    assert "python3 bench/run.py --duration 1 --runs 1 --connections 4" in text
    assert "medians of 1 runs" in text
    assert f"Machine: {os.cpu_count()} cores" in text
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    labels = [bench.CASES[c].label for c in DEFAULT_CASES]
    assert [row.split("|")[1].strip() for row in rows] == labels
    on_redis = {bench.CASES[c].label: "redis" in bench.CASES[c].server for c in DEFAULT_CASES}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        case, rps, spread, cpu, redis, p50, p99, p50_1, vs_b, vs_aio, cpu_vs_aio, added, errors = \
            cells
        assert float(rps) > 0 and float(p50) > 0 and float(p99) >= float(p50), row
        assert float(p50_1) > 0, row
        assert re.fullmatch(r"\d+-\d+", spread), row
        assert re.fullmatch(r"\d+", cpu), row  # the server's own CPU time, from /proc
        assert re.fullmatch(r"\d+" if on_redis[case] else "-", redis), row
        if on_redis[case]:
            assert int(redis) <= int(cpu), row  # Redis's part of the case's CPU
        for ratio in (vs_b, vs_aio, cpu_vs_aio):
            assert re.fullmatch(r"\d+\.\d\dx", ratio), row
        assert re.fullmatch(r"[+-]\d+\.\d\d ms", added), row
        assert errors == "0", row
    cpu_of = {row.split("|")[1].strip(): int(row.split("|")[4]) for row in rows}
    assert cpu_of[bench.CASES["e"].label] > 0  # the gateway (and its Redis) did work for its load
    redis_of = {row.split("|")[1].strip(): row.split("|")[5].strip() for row in rows}
    assert int(redis_of[bench.CASES["e"].label]) > 0  # Redis ran the miss's scripts
    assert "LiteLLM" not in text  # opt-in: too slow to install for a smoke run
    # the gateways counted the answers the cases were meant to exercise
    assert re.search(r"gw_redis: .*200 HIT: \d+.*200 MISS: \d+", text)


def test_profile_summary_from_a_speedscope_file(tmp_path: Path) -> None:
    """The py-spy part needs py-spy and ptrace; its summary is checked on a file made up here."""
    frames = [
        {"name": "serve", "file": str(ROOT / "gateway/server.py"), "line": 1},
        {"name": "admit", "file": str(ROOT / "gateway/store/redis.py"), "line": 2},
        {"name": "send", "file": "/x/site-packages/httpcore/_async/http11.py", "line": 3},
    ]
    samples = [[0, 1], [0, 1], [0, 2], [0]]
    path = tmp_path / "p.speedscope.json"
    path.write_text(json.dumps({"shared": {"frames": frames}, "profiles": [{
        "type": "sampled", "unit": "seconds", "samples": samples, "weights": [0.005] * 4}]}))
    summary = bench.summarise_profile(path, rate=200, duration=0.04)
    assert summary["samples"] == 4 and summary["busy"] == 0.5
    assert summary["own"]["admit (gateway/store/redis.py)"] == 2
    assert summary["total"]["serve (gateway/server.py)"] == 4
    assert summary["areas"][bench._CLIENT] == 1
    assert summary["areas"]["gateway: store (gateway/store/)"] == 2


def test_hand_written_findings_survive_a_new_report(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    out.write_text("# old\n\n## Profile\n\nold tables\n\n## Profile findings\n\nkept\n")
    assert bench.kept_findings(out) == "## Profile findings\n\nkept\n"
    assert bench.kept_findings(tmp_path / "missing.md") == ""


def test_the_in_process_driver_answers_hits_from_the_cache(mock: Mock) -> None:
    """bench/inproc.py: the gateway's app driven without HTTP; its warm-up's first request is
    the one that reaches the upstream, every other is a cache hit."""
    mock.configure(other_keys=[bench.UPSTREAM_KEY])
    port = mock.server.url.rsplit(":", 1)[1]
    proc = subprocess.run([sys.executable, "bench/inproc.py", "memory://", "hit", "50",
                           "--stub-port", port], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.fullmatch(r"hit: [0-9.]+ us of CPU per request, [0-9,]+ requests/s\n",
                        proc.stdout), proc.stdout
    assert mock.count("POST chat/completions") == 1
