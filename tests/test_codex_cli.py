"""The real Codex CLI (npm @openai/codex, a native binary that runs offline against a local server) through a real
mitmdump with replayguard, against the fake upstream, with the upstream connection cut after Codex's tool call:
Codex's own tool-call chain (warm-up, reasoning, exec_command, function_call_output) survives without Codex
noticing; the run's full-bodies trace then reproduces offline (`replayguard reproduce`) with the same outcomes.
.ci/run installs the CLI and points REPLAYGUARD_CODEX at it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from replayguard.tools.harness import ROOT
from test_trace import records

CODEX = os.environ.get("REPLAYGUARD_CODEX") or shutil.which("codex")
pytestmark = pytest.mark.skipif(not CODEX, reason="Codex CLI not installed (.ci/run installs it with npm)")

KEY = "sk-codex-SECRET-0123456789"


def test_codex_tool_chain_survives_an_upstream_drop(fake, mitm, tmp_path):
    proxy = mitm(fake, faults=[{"kind": "drop", "after_turn": 2}],  # turn 1 is Codex's warm-up, 2 its tool call
                 trace={"bodies": "full"})
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(f'''model = "demo-model"
model_provider = "viaproxy"

[model_providers.viaproxy]
name = "via replayguard"
base_url = "{proxy.url.replace('ws://', 'http://')}/v1"
wire_api = "responses"
env_key = "DEMO_API_KEY"
supports_websockets = true
''')
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(CODEX_HOME=str(home), DEMO_API_KEY=KEY)
    result = subprocess.run([CODEX, "exec", "--skip-git-repo-check", "please run TOOL ls"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tool said:" in result.stdout  # the fake model's answer to Codex's function_call_output
    proxy.wait_log(r"injected fault after turn 2: drop upstream TCP")
    proxy.wait_log(r"turn 3: upstream connection dropped -> replay")
    # The replay on the fresh connection carried Codex's reasoning and function_call before its output.
    replays = [m for c, m in fake.received if c == 2 and m.get("type") == "response.create"]
    assert len(replays) == 1 and "previous_response_id" not in replays[0]
    kinds = [i.get("type") for i in replays[0]["input"]]
    assert kinds.index("function_call") < kinds.index("function_call_output")
    assert "reasoning" in kinds
    assert not any("No tool call found" in str(e) for _, e in fake.sent)
    # Codex's handshake headers went to both upstream connections; its turn state stuck.
    assert [h["headers"]["authorization"] for h in fake.handshakes] == [f"Bearer {KEY}"] * 2
    assert fake.handshakes[1]["headers"]["x-codex-turn-state"] == "ts-1"
    assert "error" not in {e.get("type") for _, e in fake.sent}
    # The recording reproduces: Codex's requests and the fake's outputs again, the drop injected again by the rule.
    trace = proxy.tmp / "trace.jsonl"
    records(trace, until="session.end")
    again = subprocess.run([sys.executable, "-m", "replayguard", "reproduce", str(trace), "--check",
                            "--trace", str(tmp_path / "reproduced.jsonl")],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.startswith("summary: 3 compared, 3 same, 0 differ"), again.stdout
    assert "completed x2, replayed (upstream connection dropped) x1" in again.stdout
    reproduced = records(tmp_path / "reproduced.jsonl")
    assert [f["kind"] for f in reproduced if f["event"] == "fault"] == ["drop"]  # by the rule, not the fake
    assert "SECRET" not in (tmp_path / "reproduced.jsonl").read_text()
