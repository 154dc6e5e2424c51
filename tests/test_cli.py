"""The command line names itself as it was run: `replayguard ...` as the console script, `python -m replayguard ...`
as a module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from replayguard.__main__ import program_name


def test_program_name():
    assert program_name("/venv/bin/replayguard") == "replayguard"
    assert program_name("/src/replayguard/__main__.py") == "python -m replayguard"


def test_help_names_the_console_script_and_the_module():
    script = Path(sys.executable).parent / "replayguard"
    as_script = subprocess.run([str(script), "trace", "--help"], capture_output=True, text=True, check=True)
    assert as_script.stdout.startswith("usage: replayguard trace ")
    as_module = subprocess.run([sys.executable, "-m", "replayguard", "--help"], capture_output=True, text=True,
                               check=True)
    assert as_module.stdout.startswith("usage: python -m replayguard ")
    assert "fake-upstream" in as_module.stdout and "trace" in as_module.stdout
