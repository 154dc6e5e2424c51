"""The tests' fork server (tests/forkserver.py) starts mitmdump as the installed script does: the same output and exit
status for a start that fails and for one that is stopped."""

from __future__ import annotations

import os
import re
import time

import pytest

from conftest import ForkedMitmdump
from replayguard.tools.harness import Mitmdump, StartFailed


def _both(tmp_path, args, rules=None):
    return [cls(tmp_path / cls.__name__, args, rules) for cls in (Mitmdump, ForkedMitmdump)]


def test_a_failed_start_reads_the_same_forked(tmp_path, monkeypatch):
    monkeypatch.delenv("REPLAYGUARD_NO_FORK", raising=False)
    outcomes = []
    for proxy in _both(tmp_path, [], {"upstream": {"ping_idle": "soon"}}):
        with pytest.raises(StartFailed) as err:
            proxy.start()
        assert proxy.proc is not None
        log = re.sub(r"\[\d\d:\d\d:\d\d\.\d+\] ", "", proxy.log).replace(str(proxy.tmp), "TMP")
        outcomes.append((proxy.proc.wait(10), log))
    assert type(proxy.proc).__name__ == "ForkedProcess"
    assert outcomes[0] == outcomes[1] and outcomes[0][0] == 1, outcomes
    assert "rules.yaml:2: upstream.ping_idle: expected a number >= 0, got 'soon'" in outcomes[0][1], outcomes


def test_a_stopped_mitmdump_ends_the_same_forked(tmp_path, fake, monkeypatch):
    monkeypatch.delenv("REPLAYGUARD_NO_FORK", raising=False)
    codes = []
    for proxy in _both(tmp_path, ["--mode", f"reverse:http://127.0.0.1:{fake.port}"],
                       {"match": [{"path": "*/responses"}]}):
        proxy.start()
        assert proxy.proc is not None and proxy.proc.poll() is None and proxy.port
        assert os.path.exists(f"/proc/{proxy.proc.pid}")
        started = time.monotonic()
        proxy.stop()
        codes.append(proxy.proc.returncode)
        assert time.monotonic() - started < 10
    assert type(proxy.proc).__name__ == "ForkedProcess"
    assert codes[0] == codes[1], codes
