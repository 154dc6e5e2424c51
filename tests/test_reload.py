"""rules.yaml edited while mitmdump runs: a good file applies to new flows, a bad one is reported with file, line and
reason and the last good rules stay in force."""

from __future__ import annotations

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
