"""Fault injection from rules.yaml, through a real mitmdump against the fake upstream: each kind produces the
failure it names, and the recovery or fail-close the core promises; every injection is logged and traced."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from conftest import Client, completed, user
from replayguard.tools.harness import Mitmdump
from test_trace import of, records

AUTH = {"Authorization": "Bearer tok_fault_SECRET_9d8e7f"}


def start(mitm, fake, tmp_path: Path, faults: list[dict[str, Any]], **sections: Any):
    path = tmp_path / "trace.jsonl"
    proxy = mitm(fake, args=["--set", f"replayguard_trace={path}"], faults=faults, **sections)
    proxy.wait_log(r"fault rule\(s\) active")
    return proxy, path


def tool_turn(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("please run TOOL ls")]}))
    return r1, next(i for i in r1["output"] if i["type"] == "function_call")


def continue_with_output(client: Client, r1: dict[str, Any], call: dict[str, Any]) -> list[dict[str, Any]]:
    out = {"type": "function_call_output", "call_id": call["call_id"], "output": "file.txt"}
    return client.turn({"model": "m", "store": False, "previous_response_id": r1["id"], "input": [out]})


def creates(fake: Any, conn: int) -> list[dict[str, Any]]:
    return [m for c, m in list(fake.received) if c == conn and m.get("type") == "response.create"]


def assert_replayed_on_conn2(fake: Any, call: dict[str, Any]) -> None:
    (replay,) = creates(fake, 2)
    assert "previous_response_id" not in replay
    assert [(i["type"], i.get("call_id")) for i in replay["input"]] == [
        ("message", None), ("function_call", call["call_id"]), ("function_call_output", call["call_id"])]
    assert not any("No tool call found" in str(e) for _, e in fake.sent)


def injected(path: Path, kind: str) -> dict[str, Any]:
    recs = records(path, until="fault")
    faults = of(recs, "fault")
    assert faults and all(f["injected"] is True for f in faults)
    return next(f for f in faults if f["kind"] == kind)


@pytest.mark.parametrize("kind,extra,how", [
    ("drop", {}, "upstream connection dropped"),
    ("close", {"code": 4000}, "upstream closed"),
])
def test_drop_and_close_after_turn_then_replay(fake, mitm, tmp_path, kind, extra, how):
    proxy, path = start(mitm, fake, tmp_path, [{"kind": kind, "after_turn": 1, **extra}])
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1, call = tool_turn(client)
    proxy.wait_log(r"lost while idle")
    r2 = completed(continue_with_output(client, r1, call))
    assert r2["output"][0]["content"][0]["text"] == "tool said: file.txt"
    assert_replayed_on_conn2(fake, call)
    assert f"injected fault after turn 1: {'drop upstream TCP' if kind == 'drop' else 'close upstream with 4000'}" \
        in proxy.log
    fault = injected(path, kind)
    assert fault["turn"] == 1 and fault["rule_line"] is not None
    lost = of(records(path), "upstream.lost")[0]
    assert lost["how"] == how
    if kind == "close":
        assert "4000" in lost["detail"]
    assert not any(e["type"] == "error" for e in client.received)
    client.close()


def test_blackhole_is_found_by_the_preflight_ping(fake, mitm, tmp_path):
    proxy, path = start(mitm, fake, tmp_path, [{"kind": "blackhole", "after_turn": 1}],
                        upstream={"ping_idle": 0, "ping_timeout": 0.5})
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1, call = tool_turn(client)
    completed(continue_with_output(client, r1, call))
    assert_replayed_on_conn2(fake, call)
    assert of(records(path, until="recovery"), "recovery")[0]["trigger"] == "no pong within ping timeout"
    assert injected(path, "blackhole")["turn"] == 1
    client.close()


def test_refused_handshakes_fail_the_recovery_closed(fake, mitm, tmp_path):
    proxy, path = start(mitm, fake, tmp_path, [
        {"kind": "drop", "after_turn": 1},
        {"kind": "refuse", "after_turn": 1, "status": 429, "count": 1},
    ])
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1, call = tool_turn(client)
    proxy.wait_log(r"lost while idle")
    client.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
                 "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "x"}]})
    events, code, _ = client.until_closed()
    assert code == 1013  # try again later: the (injected) upstream said 429
    assert events[-1]["status"] == 429 and events[-1]["error"]["code"] == "upstream_unavailable"
    assert "HTTP 429" in events[-1]["error"]["message"]
    assert len(fake.handshakes) == 1  # the refusal was injected: nothing reached the upstream
    hs = of(records(path, until="session.end"), "handshake")
    assert hs[-1]["ok"] is False and hs[-1]["status"] == 429 and hs[-1]["injected"] is True
    assert "upstream handshake refused with HTTP 429" in proxy.log


def test_refuse_at_turn_zero_refuses_the_first_handshake(fake, mitm, tmp_path):
    proxy, path = start(mitm, fake, tmp_path, [{"kind": "refuse", "after_turn": 0, "status": 401}])
    with pytest.raises(InvalidStatus) as e:
        Client(proxy.url + "/v1/responses", headers=AUTH)
    assert e.value.response.status_code == 401
    assert not fake.handshakes
    recs = records(path, until="session.end")
    assert [r["event"] for r in recs] == ["session.start", "fault", "handshake", "session.end"]
    # The next session is not refused (count 1, per session... of this one only).
    assert of(recs, "handshake")[0]["injected"] is True


@pytest.mark.parametrize("error", ["previous_response_not_found", "websocket_connection_limit_reached"])
def test_injected_recoverable_error_is_swallowed_and_replayed(fake, mitm, tmp_path, error):
    proxy, path = start(mitm, fake, tmp_path, [{"kind": "error", "after_turn": 1, "error": error}])
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1, call = tool_turn(client)
    r2 = completed(continue_with_output(client, r1, call))
    assert r2["output"][0]["content"][0]["text"] == "tool said: file.txt"
    assert creates(fake, 1) == [creates(fake, 1)[0]]  # the continuation never reached connection 1
    assert_replayed_on_conn2(fake, call)
    assert not any(e["type"] == "error" for e in client.received)
    recs = records(path, until="recovery")
    assert of(recs, "upstream.lost")[0]["detail"]["code"] == error
    assert any(f["kind"] == "error" and error in f["detail"] for f in of(recs, "fault"))
    client.close()


def test_injected_server_error_reaches_the_client(fake, mitm, tmp_path):
    proxy, path = start(mitm, fake, tmp_path, [{"kind": "error", "after_turn": 1, "error": "server_error"}])
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hi")]}))
    events = client.turn({"model": "m", "store": False, "previous_response_id": r1["id"], "input": [user("again")]})
    assert events == [{"type": "error", "status": 500, "error": {
        "type": "server_error", "code": "server_error",
        "message": "The server had an error while processing your request. Sorry about that!", "param": None}}]
    assert len(creates(fake, 1)) == 1
    # The session goes on: the next turn is resumed from the chain state on the same connection.
    r3 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [user("third")]}))
    assert r3["output"][0]["content"][0]["text"] == "reply to: third"
    assert of(records(path, until="turn.end", count=3), "turn.end")[1]["error"]["status"] == 500
    client.close()


def test_delay_beyond_first_event_timeout_recovers(fake, mitm, tmp_path):
    proxy, path = start(mitm, fake, tmp_path, [{"kind": "delay", "after_turn": 1, "seconds": 3}],
                        upstream={"first_event_timeout": 1})
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1, call = tool_turn(client)
    r2 = completed(continue_with_output(client, r1, call))
    assert r2["output"][0]["content"][0]["text"] == "tool said: file.txt"
    assert_replayed_on_conn2(fake, call)
    rec = of(records(path, until="recovery"), "recovery")[0]
    assert rec["trigger"] == "no event within first event timeout"
    details = [f["detail"] for f in of(records(path), "fault") if f["kind"] == "delay"]
    assert details[0].startswith("delay next turn's first frame 3s") and details[1] == "first frame of turn 2 held 3s"


def test_short_delay_only_slows_the_turn(fake, mitm, tmp_path):
    proxy, path = start(mitm, fake, tmp_path, [{"kind": "delay", "after_turn": 1, "seconds": 0.6}])
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hi")]}))
    completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"], "input": [user("b")]}))
    ends = of(records(path, until="turn.end", count=2), "turn.end")
    assert ends[1]["ms"] >= 600 > ends[0]["ms"]
    assert len(fake.handshakes) == 1
    client.close()


def test_seeded_probability_fires_reproducibly(fake, mitm, tmp_path):
    proxy, path = start(mitm, fake, tmp_path, [{"kind": "drop", "probability": 0.5, "seed": 7}])
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    previous = None
    for n in range(8):
        request = {"model": "m", "store": False, "input": [user(f"turn {n}")]}
        if previous:
            request["previous_response_id"] = previous
        previous = completed(client.turn(request))["id"]
    rng = random.Random(7)
    expected = [n + 1 for n in range(8) if rng.random() < 0.5]
    fired = [f["turn"] for f in of(records(path), "fault")]
    assert fired == expected and 0 < len(expected) < 8
    assert len(fake.handshakes) == 1 + len([t for t in expected if t < 8])
    client.close()


def test_faults_are_scoped_by_matchers(fake, mitm, tmp_path):
    proxy, path = start(mitm, fake, tmp_path, [{"kind": "drop", "after_turn": 1, "path": "/other/*"},
                                               {"kind": "close", "after_turn": 1, "filter": "~hq x-chaos"}])
    plain = Client(proxy.url + "/v1/responses", headers=AUTH)
    completed(plain.turn({"model": "m", "store": False, "input": [user("hi")]}))
    chaos = Client(proxy.url + "/v1/responses", headers={**AUTH, "x-chaos": "1"})
    completed(chaos.turn({"model": "m", "store": False, "input": [user("hi")]}))
    recs = records(path, until="fault")
    (fault,) = of(recs, "fault")
    assert fault["kind"] == "close"
    chaos_session = of(recs, "session.start")[1]["session"]
    assert fault["session"] == chaos_session
    plain.close()
    chaos.close()


def test_bad_fault_rule_stops_startup(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("match:\n  - path: '*/responses'\nfaults:\n  - kind: drop\n    after_turn: 1\n    status: 500\n")
    proc = Mitmdump(tmp_path, ["--set", f"replayguard_rules={rules}"], None)
    result = subprocess.run(proc.command(), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1
    assert f"{rules}:6: faults.status applies to kind refuse, not drop" in result.stdout + result.stderr
