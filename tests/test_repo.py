"""The promises the repository makes about itself: README commands, CI, example configs."""

from __future__ import annotations

import re

from gateway import config as cfg

from .conftest import ROOT


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, re.S)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_command = readme_commands()[1]
    assert "pytest" in test_command
    lines = [line for line in (ROOT / ".ci/run").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[-1] == test_command


def test_readme_run_command_uses_a_valid_config() -> None:
    run_command = readme_commands()[0]
    path = re.search(r"--config (\S+?);?\s", run_command + " ").group(1)  # type: ignore[union-attr]
    config = cfg.load(ROOT / path, env={})
    assert config.store.url == "memory://"
    assert config.upstream.base_url == "http://127.0.0.1:8099/api/v1"
