"""CI cannot be green by skipping: under CI=true a skipped test fails (its tool's install failed), except the skips
by design of the Python line under test; and the README's test command is the one .ci/run runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from replayguard.tools.harness import ROOT

PROBE = '''
import pytest

def test_tool_missing():
    pytest.skip("chromium is not installed")

def test_by_design_of_this_line():
    pytest.skip("openai is installed only on the mitmproxy 12 line")

def test_runs():
    assert True
'''


def run_probe(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "-rs",
                           str(tmp_path / "test_probe.py")], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_a_skip_fails_under_ci(tmp_path):
    result = run_probe(tmp_path, "true")
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 passed, 1 skipped" in result.stdout, result.stdout
    assert "CI=true: skipped (Skipped: chromium is not installed), but .ci/run installs" in result.stdout


def test_outside_ci_a_skip_is_a_skip(tmp_path):
    result = run_probe(tmp_path, None)
    assert result.returncode == 0 and "1 passed, 2 skipped" in result.stdout, result.stdout


def test_the_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"```sh\n(python3 -m venv \.venv && .*pytest -n 4)\n```", readme).group(1)
    install, _, test = command.partition(" && .venv/bin/python -m pytest -n 4")
    # .ci/run runs it with "$PY" for python3 and each line's constraints file
    assert install.replace("python3 -m venv", '"$PY" -m venv').replace("ci/constraints-py311.txt",
                                                                      '"$constraints"') in ci, install
    assert ".venv/bin/python -m pytest -n 4" in ci and test == ""
    for name in ("constraints-py311.txt", "constraints-py312.txt"):
        pins = (ROOT / "ci" / name).read_text()
        assert re.search(r"^mitmproxy==\d", pins, re.M) and re.search(r"^websockets==\d", pins, re.M), name
    assert re.search(r"^openai==3\.63\.0$", (ROOT / "ci" / "constraints-py312.txt").read_text(), re.M)
    assert "CODEX_PINNED=0.171.0" in ci and "@openai/codex@$1" in ci
