"""rules.yaml edited while mitmdump runs: a good file applies to new flows, a bad one is reported with file, line and
reason and the last good rules stay in force."""

from __future__ import annotations

import pytest
import yaml

from conftest import BASE_RULES, Client, completed, user
from test_trace import of, records


def sessions_started(proxy) -> int:
    return len(of(records(proxy.tmp / "trace.jsonl"), "session.start"))


def test_bad_edit_keeps_last_good_rules_and_a_good_edit_applies(fake, mitm):
    proxy = mitm(fake)
    path = proxy.rules_path
    path.write_text("match:\n  - path: '*/responses'\nupstream:\n  ping_idle: soon\n")
    proxy.wait_log(rf"{path}:4: upstream.ping_idle: expected a number >= 0, got 'soon'; keeping the last good rules")
    assert proxy.proc.poll() is None  # still running
    # The old rules still apply: a matched session, and it still recovers.
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hi")]}))
    fake.close_all()
    proxy.wait_log(r"lost while idle")
    completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"], "input": [user("b")]}))
    proxy.wait_log(r"turn 2: upstream closed.*-> replay")
    client.close()
    assert sessions_started(proxy) == 1

    # A good edit: replayguard no longer matches this path, so the next session is left to mitmproxy.
    good = dict(BASE_RULES, match=[{"path": "/elsewhere/*"}])
    path.write_text(yaml.safe_dump(good))
    proxy.wait_log(rf"reloaded rules from {path}")
    other = Client(proxy.url + "/v1/responses")
    completed(other.turn({"model": "m", "store": False, "input": [user("plain")]}))
    other.close()
    assert sessions_started(proxy) == 1  # not a replayguard session
    assert proxy.log.count("keeping the last good rules") == 1  # reported once, not every poll


def test_bad_rules_option_at_runtime_is_refused(fake, mitm, tmp_path):
    """`set replayguard_rules=...` with a bad file raises OptionsError: mitmproxy keeps the old value."""
    from mitmproxy.exceptions import OptionsError
    from mitmproxy.test import taddons

    from replayguard.proxy.addon import ReplayGuard

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE_RULES))
    bad = tmp_path / "bad.yaml"
    bad.write_text("match: 3\n")
    addon = ReplayGuard()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, replayguard_rules=str(good))
        assert addon.rules is not None and addon.rules.source == str(good)
        try:
            tctx.configure(addon, replayguard_rules=str(bad))
        except OptionsError as e:
            assert f"{bad}:1: match must be a list" in str(e)
        else:
            raise AssertionError("a bad rules file was accepted")
        assert addon.rules.source == str(good)


def test_editing_the_script_and_then_the_package_reloads_both_and_live_sessions_end_cleanly(fake, tmp_path):
    """mitmproxy calls ``done`` synchronously on a reload: a coroutine there would silently end its file watcher
    and leave the old code running. Two successive edits, one of addon.py and one of the package, each load the
    new code; the live sessions of the old one end with a retryable error (mid-turn) or close 1012 (idle)."""
    import shutil

    from websockets.exceptions import ConnectionClosed

    from conftest import ROOT
    from replayguard.tools.harness import Mitmdump

    work = tmp_path / "checkout"
    work.mkdir()
    shutil.copy(ROOT / "addon.py", work / "addon.py")
    shutil.copytree(ROOT / "replayguard", work / "replayguard", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "rules.yaml").write_text(yaml.safe_dump(BASE_RULES))
    proxy = Mitmdump(tmp_path / "mitm", ["--mode", f"reverse:http://127.0.0.1:{fake.port}", "-s",
                                         str(work / "addon.py")], BASE_RULES, addon=False)
    proxy.start()
    try:
        def live_sessions() -> tuple[Client, Client]:
            idle = Client(proxy.url + "/v1/responses")
            completed(idle.turn({"model": "m", "store": False, "input": [user("hi")]}))
            busy = Client(proxy.url + "/v1/responses")
            fake.response_delay = 30  # the upstream thinks: busy's turn is in flight during the reload
            busy.send({"type": "response.create", "model": "m", "store": False, "input": [user("think")]})
            fake.wait_for(lambda: len(fake.received) >= 2)
            return idle, busy

        def ended(idle: Client, busy: Client) -> None:
            events, code, _ = busy.until_closed(15)
            assert code == 1012 and events[-1]["error"]["code"] == "replayguard_reloaded", (code, events)
            assert events[-1]["status"] == 503 and events[-1]["error"]["type"] == "server_error"
            _, code, reason = idle.until_closed(15)
            assert code == 1012 and "reload" in reason
            fake.response_delay = 0

        # Edit 1: addon.py itself.
        idle, busy = live_sessions()
        (work / "addon.py").write_text((work / "addon.py").read_text() + "\n# edited\n")
        proxy.wait_log(r"2 live session\(s\) end with replayguard_reloaded", timeout=15)
        ended(idle, busy)
        assert proxy.log.count("Loading script") == 2
        # Edit 2: a module of the package; its new code is what runs now.
        idle, busy = live_sessions()
        module = work / "replayguard" / "proxy" / "addon.py"
        module.write_text(module.read_text().replace('"replayguard: rules from %s', '"replayguard (edit 2): rules from %s'))
        proxy.wait_log(r"replayguard \(edit 2\): rules from", timeout=15)
        ended(idle, busy)
        assert proxy.log.count("Loading script") == 3
        # The new code serves new sessions, and still recovers.
        client = Client(proxy.url + "/v1/responses")
        r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hi")]}))
        fake.close_all()
        proxy.wait_log(r"lost while idle")
        completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"], "input": [user("b")]}))
        client.close()
        assert "Traceback" not in proxy.log and "AddonManagerError" not in proxy.log
    finally:
        proxy.stop()
    with pytest.raises(ConnectionClosed):
        idle.ws.recv(timeout=1)


def test_a_misspelt_replayguard_option_stops_startup_naming_the_real_ones(fake, tmp_path):
    """mitmproxy keeps an unknown --set option aside in case a script defines it later, and says nothing. replayguard
    logs an error at startup, which makes mitmproxy exit 1 (it has printed its listening line by then: it loads
    scripts while it starts its servers)."""
    import subprocess

    from replayguard.tools.harness import Mitmdump

    proxy = Mitmdump(tmp_path, ["--mode", f"reverse:http://127.0.0.1:{fake.port}", "--set",
                                "replayguard_rule=faults.yaml"], None)
    done = subprocess.run(proxy.command(), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "unknown option 'replayguard_rule' (did you mean replayguard_rules?)" in out
    assert "replayguard's options are: replayguard_rules, replayguard_trace" in out
    assert "Error logged during startup, exiting" in out


def test_a_package_that_cannot_be_read_now_is_not_a_changed_package(tmp_path, monkeypatch):
    """Out of file descriptors, the package's files cannot be listed: that is no edit, and no reload (a reload then
    would end every live session)."""
    import errno
    import os
    from pathlib import Path

    from replayguard.proxy import addon as addon_module

    script = tmp_path / "addon.py"
    script.write_text("# the script\n")
    os.utime(script, (1_000_000, 1_000_000))
    guard = addon_module.ReplayGuard(script=str(script))
    guard._package_seen = addon_module._package_signature()
    assert guard._package_seen is not None

    def exhausted(self, pattern):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(Path, "rglob", exhausted)
    assert addon_module._package_signature() is None
    guard._check_package()
    assert script.stat().st_mtime == 1_000_000  # not touched: mitmproxy does not reload it
