"""A rules file through a real mitmdump (and mitmweb): one that states only what it changes runs with the defaults
for the rest; one with mistakes stops startup with every mistake on a line of its own (file, line, reason), no
traceback, and no claim to listen; replayguard loaded into a running mitmproxy with such a file stays idle until the
file is fixed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import Client, completed, user
from test_trace import of, records

from replayguard.tools.harness import ROOT, Mitmdump, mitmdump_command

BAD = ("match:\n"
       "  - paht: /v1/responses\n"
       "upstream:\n"
       "  ping_idle: soon\n"
       "retry: 1\n")
MISTAKES = [
    "2: unknown key match.paht; expected one of host, path, filter",
    "4: upstream.ping_idle: expected a number >= 0, got 'soon'",
    "5: unknown section 'retry'; expected one of match, upstream, recovery, limits, trace, client, faults",
]


def test_a_rules_file_that_states_only_what_it_changes(fake, mitm):
    proxy = mitm(fake, rules={"trace": {"bodies": "full"}})  # no match, no timers: the defaults
    client = Client(proxy.url + "/v1/responses")  # matched by the default `*/responses`
    completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    client.close()
    (start,) = of(records(proxy.tmp / "trace.jsonl", until="session.end"), "session.start")
    assert start["rules"]["trace"] == {"bodies": "full"}
    assert start["rules"]["match"] == [{"host": "api.openai.com", "path": "/v1/responses"},
                                       {"host": "chatgpt.com", "path": "/backend-api/codex/responses"},
                                       {"path": "*/responses"}]
    assert start["rules"]["upstream"]["first_event_timeout"] == 10  # the shipped default, not a test value
    proxy.wait_log(r"rules from .*rules\.yaml \(policy pair-aware\)")


@pytest.mark.parametrize("tool", ["mitmdump", "mitmweb"])
def test_mistakes_stop_startup_each_on_its_line_without_a_traceback(tool, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(BAD)
    web = ["--set", "web_port=0", "--set", "web_open_browser=false"] if tool == "mitmweb" else []
    command = mitmdump_command(tool) + [
        "--listen-host", "127.0.0.1", "--listen-port", "0", "--set", f"confdir={tmp_path / 'conf'}", *web,
        "-s", str(ROOT / "addon.py"), "--set", f"replayguard_rules={rules}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    for mistake in MISTAKES:
        assert f"replayguard: bad rules file: {rules}:{mistake}\n" in out, out
    assert "Traceback" not in out and "listening" not in out and "Error logged during startup" not in out, out
    assert "replayguard: not starting: fix the rules file" in out


def test_loaded_into_a_running_mitmproxy_it_stays_idle_until_the_file_is_fixed(fake, tmp_path):
    rules, trace = tmp_path / "rules.yaml", tmp_path / "trace.jsonl"
    rules.write_text(BAD)
    proxy = Mitmdump(tmp_path / "mitm", ["--mode", f"reverse:http://127.0.0.1:{fake.port}",
                                        "-s", str(Path(__file__).parent / "load_later.py"),
                                        "--set", f"replayguard_rules={rules}",
                                        "--set", f"replayguard_trace={trace}"], None, addon=False).start()
    try:
        proxy.wait_log(r"handling no flow until the rules file is fixed", timeout=20)
        for mistake in MISTAKES:
            assert f"replayguard: bad rules file: {rules}:{mistake}" in proxy.log
        assert "Traceback" not in proxy.log and proxy.proc.poll() is None
        # Idle: an upgrade passes through mitmproxy untouched.
        client = Client(proxy.url + "/v1/responses")
        completed(client.turn({"model": "m", "store": False, "input": [user("plain")]}))
        client.close()
        assert not trace.exists() or of(records(trace), "session.start") == []  # not a replayguard session
        rules.write_text("recovery:\n  policy: strict\n")
        proxy.wait_log(rf"reloaded rules from {rules} \(policy strict\)", timeout=20)
        assert proxy.log.count("bad rules file") == len(MISTAKES)  # reported once, not on every poll
    finally:
        proxy.stop()
