"""The real Codex CLI (npm @openai/codex, a native binary that runs offline against a local server) through a real
mitmdump with replayguard, against the fake upstream:
- with the upstream connection cut after Codex's tool call, Codex's own tool-call chain (warm-up, reasoning,
  exec_command, function_call_output) survives without Codex noticing; the run's full-bodies trace then reproduces
  offline (`replayguard reproduce`) with the same outcomes;
- the README's own config.toml blocks, as written (the reverse mode's port aside), in reverse and in regular mode
  (HTTPS_PROXY and CODEX_CA_CERTIFICATE with mitmproxy's CA, as the README's command line sets them);
- what Codex does with replayguard's fail-closes: a 5xx error event, and strict's bare close 1008.
.ci/run installs the CLI and points REPLAYGUARD_CODEX at it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from replayguard.tools.harness import ROOT
from test_readme import fenced_blocks
from test_trace import of, records

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


# -- the README's configuration, as written ------------------------------------------------------------------------
def readme_toml(base_url: str) -> str:
    """The README's config.toml block whose provider points at ``base_url``."""
    (block,) = [text for lang, text in fenced_blocks() if lang == "toml" and f'base_url = "{base_url}"' in text]
    return block


def readme_proxy_env() -> dict[str, str]:
    """The variables the README's regular-mode command line sets for Codex."""
    (line,) = [line for _, text in fenced_blocks() for line in text.splitlines()
               if "HTTPS_PROXY=" in line and line.split()[-1] == "codex"]
    return dict(word.split("=", 1) for word in shlex.split(line)[:-1])


def run_codex(home: Path, work: Path, env: dict[str, str], prompt: str = "please run TOOL ls",
              timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`codex exec PROMPT`; the whole process group is killed on a timeout (the CLI runs a native child)."""
    work.mkdir(exist_ok=True)
    full = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    full.update(CODEX_HOME=str(home), OPENAI_API_KEY=KEY, **env)
    proc = subprocess.Popen([CODEX, "exec", "--skip-git-repo-check", prompt], cwd=work, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def codex_home(tmp_path: Path, config: str) -> Path:
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(config)
    return home


def assert_tool_chain_through_replayguard(result, fake, proxy, provider: str) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"provider: {provider}" in result.stderr, result.stderr  # model_provider took effect
    assert "tool said:" in result.stdout
    assert [h["status"] for h in fake.handshakes] == [101]
    assert [m.get("generate", True) for _, m in fake.received if m.get("type") == "response.create"] == [
        False, True, True]  # the warm-up, the tool call, its output
    trace = proxy.tmp / "trace.jsonl"
    assert len(of(records(trace, until="session.end"), "session.start")) == 1  # a replayguard session
    shown = subprocess.run([sys.executable, "-m", "replayguard", "trace", str(trace)], capture_output=True, text=True,
                           cwd=ROOT, timeout=60).stdout
    assert "3 turns (3 completed, 1 warm-up)" in shown, shown
    assert re.search(r"turn 1 .* warm-up \(generate: false", shown), shown


def test_readme_reverse_mode_config(fake, mitm, tmp_path):
    proxy = mitm(fake)
    config = readme_toml("http://127.0.0.1:8000/v1").replace("127.0.0.1:8000", f"127.0.0.1:{proxy.port}")
    result = run_codex(codex_home(tmp_path, config), tmp_path / "work", {})
    assert_tool_chain_through_replayguard(result, fake, proxy, "viaproxy")


def regular_mode(fake, mitm):
    """mitmdump in regular mode; offline, api.openai.com is the fake upstream (map_remote, dialed lazily so that
    mitmproxy does not look the name up first). Neither is part of what a user sets up."""
    return mitm(fake=None, mode="regular",
                args=["--map-remote", f"|https://api.openai.com/|http://127.0.0.1:{fake.port}/",
                      "--set", "connection_strategy=lazy"])


def proxy_env(proxy) -> dict[str, str]:
    env = readme_proxy_env()
    assert env["HTTPS_PROXY"] == "http://127.0.0.1:8080"
    assert env["CODEX_CA_CERTIFICATE"] == "$HOME/.mitmproxy/mitmproxy-ca-cert.pem"
    return {"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}",
            "CODEX_CA_CERTIFICATE": str(proxy.tmp / "conf" / "mitmproxy-ca-cert.pem")}


def test_readme_regular_mode_config(fake, mitm, tmp_path):
    proxy = regular_mode(fake, mitm)
    result = run_codex(codex_home(tmp_path, readme_toml("https://api.openai.com/v1")), tmp_path / "work",
                       proxy_env(proxy))
    assert_tool_chain_through_replayguard(result, fake, proxy, "openai-ws")


def test_regular_mode_with_the_builtin_provider(fake, mitm, tmp_path):
    """What the README says of the built-in provider: in regular mode the two variables alone work too."""
    proxy = regular_mode(fake, mitm)
    result = run_codex(codex_home(tmp_path, ""), tmp_path / "work", proxy_env(proxy))
    assert_tool_chain_through_replayguard(result, fake, proxy, "openai")


# -- what Codex does with replayguard's fail-closes ----------------------------------------------------------------
def reverse_config(proxy) -> str:
    return readme_toml("http://127.0.0.1:8000/v1").replace("127.0.0.1:8000", f"127.0.0.1:{proxy.port}")


def resent_with_full_history(fake) -> dict:
    """The create Codex sent after the fail-close: its whole history, no previous_response_id."""
    creates = [m for _, m in fake.received if m.get("type") == "response.create"]
    last = creates[-1]
    kinds = [i.get("type") for i in last["input"]]
    assert "previous_response_id" not in last, last
    assert kinds.index("function_call") < kinds.index("function_call_output"), kinds
    return last


def test_codex_resends_its_history_after_a_5xx_fail_close(fake, mitm, tmp_path):
    # After the tool call the upstream is cut and the reconnect refused (503): turn 3 fails closed with the upstream's
    # 503, upstream_unavailable (close 1013). Codex reconnects and resends its whole history; it completes.
    proxy = mitm(fake, faults=[{"kind": "drop", "after_turn": 2}, {"kind": "refuse", "after_turn": 2, "count": 1}])
    result = run_codex(codex_home(tmp_path, reverse_config(proxy)), tmp_path / "work", {})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tool said:" in result.stdout
    fails = of(records(proxy.tmp / "trace.jsonl"), "fail_close")
    assert [(f["error"]["status"], f["error"]["error"]["code"], f["close_code"]) for f in fails][:1] == [
        (503, "upstream_unavailable", 1013)]
    resent_with_full_history(fake)


def test_codex_resends_its_history_after_strict_closes_1008(fake, mitm, tmp_path):
    # recovery.policy strict: a replay that involves a tool output is refused with a bare close 1008, no event.
    proxy = mitm(fake, faults=[{"kind": "drop", "after_turn": 2}], recovery={"policy": "strict"})
    result = run_codex(codex_home(tmp_path, reverse_config(proxy)), tmp_path / "work", {})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tool said:" in result.stdout
    fails = of(records(proxy.tmp / "trace.jsonl"), "fail_close")
    assert fails and fails[0]["close_code"] == 1008 and not fails[0].get("error")
    resent_with_full_history(fake)
