"""The code's own hygiene: ruff on everything, mypy --strict on the package."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_ruff() -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "gateway", "tests", "bench"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy", "gateway"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
