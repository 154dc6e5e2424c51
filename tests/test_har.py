"""HAR exports written by mitmproxy's own exporter (`mitmdump --set hardump=FILE`), through replayguard and through
plain mitmdump, read by `replayguard trace` and `reproduce`: the same story as the flow file of the same run.
(The Codex CLI through both is in test_rollout.py.)"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from websockets.exceptions import InvalidStatus

from conftest import BASE_RULES, Client, completed, tool_chain, user
from replayguard.core.records import read_records
from replayguard.tools.fake_upstream import FakeUpstream
from replayguard.tools.harness import ROOT, Mitmdump
from replayguard.tools.sources import trace_records
from replayguard.tools.viewer import build_sessions, main as view

AUTH = {"Authorization": "Bearer sk-har-SECRET-0123456789abcdef"}


@dataclass
class Recorded:
    trace: Path
    flows: Path
    har: Path
    responses: list[dict[str, Any]]


def fco(call_id: str, text: str = "out") -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": text}


def record(tmp: Path, plain: bool = False) -> Recorded:
    """A real run through mitmdump (with replayguard unless ``plain``) saving a trace (full bodies), a flow file and
    mitmproxy's HAR export: (1) a tool chain whose upstream drops after turn 2 and loses its cache after turn 4,
    recovered; (2) a tool output sent after the upstream died, whose call is not in the chain: failed closed (plain:
    the upstream's own answer); (3) a client bug: a tool output without its call or previous_response_id: the
    upstream's 'No tool call found'."""
    trace, flows, har = tmp / "trace.jsonl", tmp / "flows.mitm", tmp / "export.har"
    rules = json.loads(json.dumps(BASE_RULES))
    rules["trace"] = {"bodies": "full"}
    rules["faults"] = [{"kind": "drop", "after_turn": 2, "times": 1},
                       {"kind": "error", "error": "previous_response_not_found", "after_turn": 4}]
    fake = FakeUpstream().start()
    args = ["--mode", f"reverse:http://127.0.0.1:{fake.port}", "-w", str(flows), "--set", f"hardump={har}"]
    if not plain:
        args += ["--set", f"replayguard_trace={trace}"]
    proxy = Mitmdump(tmp / "mitm", args, None if plain else rules, addon=not plain)
    try:
        proxy.start()
        url = proxy.url + "/v1/responses"
        client = Client(url, headers=AUTH)
        if plain:  # the same failures, by the fake: plain mitmdump has no fault rules
            responses = tool_chain(client, 2)
            fake.drop_all()
            time.sleep(0.2)
        else:
            responses = tool_chain(client, 6)
        client.close()
        second = Client(url, headers=AUTH)
        first = completed(second.turn({"model": "m", "store": False, "input": [user("hello")]}))
        fake.drop_all()
        if plain:  # mitmdump closes the client's side too: the client comes back on a new connection
            second.until_closed(timeout=10)
            second = Client(url, headers=AUTH)
        else:
            proxy.wait_log(r"lost while idle")
        second.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": first["id"],
                     "input": [fco("call_never_made", "orphan")]})
        if plain:
            assert second.recv()["error"]["code"] == "previous_response_not_found"
            second.close()
        else:
            second.until_closed(timeout=10)
        third = Client(url, headers=AUTH)
        events = third.turn({"model": "m", "store": False, "input": [fco("call_lost")]})
        assert "No tool call found" in events[-1]["error"]["message"]
        third.close()
        if plain:
            fake.refuse_next(1, 503)
            with pytest.raises(InvalidStatus):
                Client(url, headers=AUTH)
        if not plain:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # every session's end is in the trace
                events_ = [r["event"] for r in read_records(trace.read_text().splitlines())[0]]
                if events_.count("session.end") >= 3:
                    break
                time.sleep(0.05)
    finally:
        proxy.stop()  # mitmdump writes the HAR as it stops
        fake.stop()
    assert har.exists()
    return Recorded(trace, flows, har, responses)


@pytest.fixture(scope="module")
def through_replayguard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    yield record(tmp_path_factory.mktemp("har-rg"))


@pytest.fixture(scope="module")
def through_plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    yield record(tmp_path_factory.mktemp("har-plain"), plain=True)


def trace(path: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = view(str(path), as_json="--json" in args, check="--check" in args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def story(path: Path) -> list[tuple[Any, ...]]:
    """What a chain is: per session, turns (ids, chaining, status, kinds and call_ids), the timeline, problems."""
    out = []
    for v in build_sessions(trace_records(path)[0]):
        turns = [(t.number, t.response_id, t.chains_on, t.status, [(i.get("type"), i.get("call_id")) for i in t.input],
                  [(i.get("type"), i.get("call_id")) for i in t.output]) for t in v.turns]
        out.append((v.id, turns, sorted(line for _, line in v.timeline), v.problems, v.recoveries, v.failed_closed))
    return out


def test_a_har_through_replayguard_tells_the_flow_files_story(through_replayguard):
    rec = through_replayguard
    har_story, flow_story = story(rec.har), story(rec.flows)
    assert har_story == flow_story
    (chain, orphan, bug) = har_story
    assert chain[4] == 2 and [t[1] for t in chain[1]] == [r["id"] for r in rec.responses]
    assert orphan[5] is True and any("failed closed (previous_response_not_found" in line for line in orphan[2])
    assert any("No tool call found for function call output with call_id call_lost" in p for p in bug[3])
    code, out, err = trace(rec.har, "--check")
    assert code == 2 and err == ""
    assert "6 turns (6 completed), 2 recoveries" in out and "[HAR export]" in out
    assert "↻ turn 3 replayed on upstream #2 after upstream connection dropped" in out
    assert "SECRET" not in out


def test_a_har_reproduces_like_the_flow_file(through_replayguard, tmp_path):
    rec = through_replayguard
    result = subprocess.run([sys.executable, "-m", "replayguard", "reproduce", str(rec.har), "--check"],
                            capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("summary: 9 compared, 9 same, 0 differ"), result.stdout
    assert "replayed (upstream connection dropped) x1" in summary
    assert "replayed (upstream answered previous_response_not_found) x1" in summary
    assert "failed closed: previous_response_not_found, close 1011 x1" in summary
    assert "client error: No tool call found for function call output with call_id call_lost. x1" in summary
    fixture = tmp_path / "from-har.json"
    written = subprocess.run([sys.executable, "-m", "replayguard", "reproduce", str(rec.har), "--write-test",
                              str(fixture)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert written.returncode == 0, written.stderr
    text = fixture.read_text()
    assert "SECRET" in rec.har.read_text() and "SECRET" not in text  # mitmproxy's HAR keeps the key; we do not
    assert json.loads(text)["recorded_from"]["kind"] == "HAR export"


def test_a_har_through_plain_mitmdump(through_plain):
    rec = through_plain
    chain, cut, orphan, bug, refused = build_sessions(trace_records(rec.har)[0])
    assert [t.status for t in chain.turns] == ["completed", "completed"] and chain.recoveries == 0
    assert chain.calls[rec.responses[0]["output"][0]["call_id"]].state == "paired"
    assert [t.status for t in cut.turns] == ["completed"] and cut.end.startswith("ended")
    # No replayguard: the client's reconnect gets the upstream's own previous_response_not_found.
    assert [t.status for t in orphan.turns] == ["error"] and orphan.turns[0].error["code"] == \
        "previous_response_not_found"
    assert any(f"previous_response_id {cut.turns[0].response_id} names no response in this file" not in p
               for p in orphan.problems) or orphan.turns[0].chains_on == f"session {cut.id} turn 1"
    assert any("call_id call_lost has no call before it in the request" in p for p in bug.problems)
    assert bug.calls["call_lost"].state == "ORPHANED"
    assert refused.turns == [] and any("handshake refused: HTTP 503" in line for _, line in refused.timeline)
    code, out, _ = trace(rec.har, "--check")
    assert code == 2 and "[ORPHANED]" in out


def test_bad_har_input_gets_one_clear_error(tmp_path):
    path = tmp_path / "x.har"
    path.write_text(json.dumps({"log": {"version": "1.2", "entries": [
        {"request": {"method": "POST", "url": "https://api.openai.com/v1/responses", "headers": []},
         "response": {"status": 200}}]}}))
    code, out, err = trace(path)
    assert code == 1 and "no WebSocket entry" in err and "is an HTTP request, not a Responses WebSocket" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    # Junk where frames should be: skipped, whatever is readable is read.
    path.write_text(json.dumps({"log": {"entries": [
        "junk", {"request": {"url": "wss://h/v1/responses", "headers": [{"name": "Upgrade", "value": "websocket"},
                                                                       7, {"value": "x"}]},
                 "response": {"status": 101}, "startedDateTime": "not a date",
                 "_webSocketMessages": [None, {"type": "send", "opcode": 2, "data": "!!notbase64"},
                                        {"type": "send", "opcode": 1, "time": 1.0,
                                         "data": json.dumps({"type": "response.create", "input": "hi"})},
                                        {"type": "receive", "opcode": 9, "data": ""},
                                        {"type": "receive", "opcode": 1, "time": "x", "data": "{\"type\": 5}"}]}]}}))
    code, out, err = trace(path)
    assert code == 0 and "Traceback" not in err, err
    assert "entry 1: not a HAR entry, skipped" in err and "turn 1" in out
    reproduce = subprocess.run([sys.executable, "-m", "replayguard", "reproduce", str(path)], capture_output=True,
                               text=True, timeout=60, cwd=ROOT)
    assert reproduce.returncode == 1 and "Traceback" not in reproduce.stderr, reproduce.stderr
    assert "connection lost (how is not recorded)" in reproduce.stdout  # a HAR keeps no close code
