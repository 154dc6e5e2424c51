"""The trace viewer: the timeline, the call pairing and the diagnosis, from synthetic records, from a live trace
and from a mitmproxy flow file recorded through a real mitmdump."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import Client, completed, user
from replayguard.tools.harness import ROOT
from replayguard.tools.viewer import build_sessions, load, main, records_from_flows
from test_trace import records


def rec(event: str, ts: float, **fields: Any) -> dict[str, Any]:
    return {"ts": ts, "session": "s1", "event": event, **fields}


def call(cid: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": cid, "name": "exec_command"}


def output(cid: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": cid}


MSG = {"type": "message", "role": "user"}


def chain(second_input: list[dict[str, Any]], previous: str | None = "resp_1") -> list[dict[str, Any]]:
    return [
        rec("session.start", 0, url="ws://h/v1/responses"),
        rec("turn.start", 1, turn=1, previous_response_id=None, input=[MSG]),
        rec("turn.end", 2, turn=1, status="completed", response_id="resp_1", output=[call("call_a")], ms=5),
        rec("turn.start", 3, turn=2, previous_response_id=previous, input=second_input),
        rec("turn.end", 4, turn=2, status="completed", response_id="resp_2", output=[{"type": "message"}], ms=6),
    ]


def run(records_: list[dict[str, Any]], tmp_path: Path, *args: str) -> tuple[int, str, str]:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records_))
    out, err = io.StringIO(), io.StringIO()
    code = main(str(path), as_json="--json" in args, check="--check" in args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_good_chain_all_calls_paired(tmp_path):
    code, out, _ = run(chain([output("call_a")]), tmp_path, "--check")
    assert code == 0
    assert "turn 2   resp_2 <- turn 1  completed" in out
    assert "call_a: called in turn 1 output, answered in turn 2 input  [paired]" in out
    assert "problems" not in out


def test_orphaned_call_id_is_named_with_its_turn(tmp_path):
    # Turn 2 forgot previous_response_id: its function_call_output has no call in what the upstream sees.
    records_ = chain([output("call_a")], previous=None)
    records_[4] = rec("turn.end", 4, turn=2, status="error", response_id=None, output=[], ms=3, error={
        "status": 400, "code": None, "message": "No tool call found for function call output with call_id call_a."})
    code, out, _ = run(records_, tmp_path, "--check")
    assert code == 2
    assert ("turn 2: function_call_output call_id call_a has no call before it in the request (the upstream "
            "answers: No tool call found for function call output with call_id call_a.); its call is in turn 1 "
            "output, which this request does not chain on") in out
    assert "[ORPHANED]" in out and "error 400 None: No tool call found" in out


def test_unknown_previous_id_and_missing_tool_output(tmp_path):
    _, out, _ = run(chain([MSG], previous="resp_gone"), tmp_path)
    assert "turn 2: previous_response_id resp_gone names no response in this file" in out
    _, out, _ = run(chain([MSG]), tmp_path)
    assert ("turn 2: continues turn 1 whose function_call call_a has no output in this request (the upstream "
            "answers: No tool output found for function call call_a.)") in out


def test_recovery_lines_and_a_bad_replay_are_shown(tmp_path):
    records_ = chain([output("call_a")])
    records_.insert(3, rec("upstream.lost", 2.5, conn=1, how="upstream closed", detail="close code 1011", turn=None))
    records_.insert(5, rec("recovery", 3.5, turn=2, trigger="upstream closed", action="replay full input",
                           from_conn=1, to_conn=2, removed_previous_response_id="resp_1", items=3, bytes=10,
                           input=[MSG, output("call_a")]))  # a replay without the call: must be flagged
    _, out, _ = run(records_, tmp_path)
    lines = out.splitlines()
    lost = next(i for i, line in enumerate(lines) if "upstream #1 lost while idle: upstream closed" in line)
    replay = next(i for i, line in enumerate(lines) if "↻ turn 2 replayed on upstream #2" in line)
    assert lines[lost - 1].lstrip().startswith("turn 1") and lines[replay - 1].lstrip().startswith("turn 2")
    assert "previous_response_id resp_1 removed" in lines[replay]
    assert "turn 2: function_call_output call_id call_a has no call before it in the replay replayguard sent" in out


def test_json_output(tmp_path):
    code, out, _ = run(chain([output("call_a")]), tmp_path, "--json")
    data = json.loads(out)
    (session,) = data["sessions"]
    assert [t["response_id"] for t in session["turns"]] == ["resp_1", "resp_2"]
    assert session["turns"][1]["chains_on"] == "turn 1"
    assert session["calls"] == [{"call_id": "call_a", "call": "turn 1 output", "answer": "turn 2 input",
                                 "state": "paired"}]
    assert session["problems"] == [] and code == 0


def test_half_written_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chain([output("call_a")])) + '{"ts": 5, "sess')
    out, err = io.StringIO(), io.StringIO()
    assert main(str(path), out=out, err=err) == 0
    assert "skipped line 6: not a whole trace record" in err.getvalue()
    assert "resp_2" in out.getvalue()


def test_unreadable_file_is_a_clear_error(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    assert main(str(tmp_path / "missing.jsonl"), out=out, err=err) == 1
    assert "cannot read" in err.getvalue() and "Traceback" not in err.getvalue()
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01garbage")
    assert main(str(junk), out=out, err=err) == 1
    assert "neither a replayguard trace nor a mitmproxy flow file" in err.getvalue()


# -- through a real mitmdump --------------------------------------------------------------------------
def shape(sessions: list[Any]) -> list[tuple[Any, ...]]:
    """What a chain is: turns, ids, chaining, item kinds and call_ids (text previews aside)."""
    def kinds(items: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
        return [(i.get("type"), i.get("call_id")) for i in items]
    return [(t.number, t.response_id, t.previous_response_id, t.status, kinds(t.input), kinds(t.output))
            for view in sessions for t in view.turns]


def timeline(view: Any) -> list[str]:
    return [line for _, line in sorted(view.timeline, key=lambda e: e[0])]


def test_flow_file_rebuilds_the_same_timeline_as_the_live_trace(fake, mitm, tmp_path):
    """Turns, recoveries, faults, upstream connections: the flow file alone tells the same story as the trace."""
    flows = tmp_path / "flows.mitm"
    proxy = mitm(fake, args=["-w", str(flows)], faults=[
        {"kind": "error", "error": "previous_response_not_found", "after_turn": 2}])
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("please run TOOL ls")]}))
    fc = next(i for i in r1["output"] if i["type"] == "function_call")
    fake.close_all()
    proxy.wait_log(r"lost while idle")
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [{"type": "function_call_output", "call_id": fc["call_id"], "output": "x"}]}))
    r3 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r2["id"],
                                "input": [user("and now?")]}))
    client.close()
    trace = proxy.tmp / "trace.jsonl"
    records(trace, until="session.end")
    live, _ = load(trace)
    proxy.stop()
    from_flows = records_from_flows(flows)
    (live_view,), (flow_view,) = build_sessions(live), build_sessions(from_flows)
    assert len(shape([live_view])) == 3 and shape([flow_view]) == shape([live_view])
    assert flow_view.id == live_view.id
    assert live_view.recoveries == flow_view.recoveries == 2  # the close, then the swallowed not_found
    assert timeline(flow_view) == timeline(live_view)
    assert any("⚡ injected fault" in line for line in timeline(flow_view))
    assert any("upstream #2 opened (recovery)" in line for line in timeline(flow_view))
    assert any("upstream #1 closed" in line for line in timeline(flow_view))
    assert [t.replayed_input for t in flow_view.turns] == [t.replayed_input for t in live_view.turns]
    result = subprocess.run([sys.executable, "-m", "replayguard", "trace", str(flows)], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert f"turn 2   {r2['id']} <- turn 1  completed" in result.stdout
    assert f"turn 3   {r3['id']} <- turn 2  completed" in result.stdout
    assert "3 turns (3 completed), 2 recoveries" in result.stdout
    assert f"{fc['call_id']}: called in turn 1 output, answered in turn 2 input  [paired]" in result.stdout
    assert f"ws://127.0.0.1:{fake.port}/v1/responses  [flow]" in result.stdout
    live_text = subprocess.run([sys.executable, "-m", "replayguard", "trace", str(trace)], capture_output=True,
                               text=True, timeout=60, cwd=ROOT).stdout
    assert "upstream #1 lost while idle: upstream closed" in live_text and "↻ turn 2 replayed on upstream #2" in live_text


def test_flow_file_diagnoses_the_orphaned_call(fake, mitm, tmp_path):
    flows = tmp_path / "flows.mitm"
    proxy = mitm(fake, args=["-w", str(flows)])
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("please run TOOL ls")]}))
    fc = next(i for i in r1["output"] if i["type"] == "function_call")
    # A client bug: the tool output goes out without previous_response_id and without the call.
    events = client.turn({"model": "m", "store": False,
                          "input": [{"type": "function_call_output", "call_id": fc["call_id"], "output": "x"}]})
    assert "No tool call found" in events[-1]["error"]["message"]
    client.close()
    proxy.stop()
    result = subprocess.run([sys.executable, "-m", "replayguard", "trace", "--check", str(flows)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert (f"turn 2: function_call_output call_id {fc['call_id']} has no call before it in the request"
            in result.stdout)
    assert "its call is in turn 1 output, which this request does not chain on" in result.stdout
    assert "[ORPHANED]" in result.stdout


def test_a_warm_up_turn_is_named_as_such(tmp_path):
    """Codex's first turn is a response.create with generate: false: it prepares the connection and its response
    has no output; the viewer says so instead of an empty output."""
    records_ = [
        rec("session.start", 0, url="ws://h/v1/responses"),
        rec("turn.start", 1, turn=1, previous_response_id=None, generate=False,
            input=[{"type": "message", "role": "developer"}]),
        rec("turn.end", 2, turn=1, status="completed", response_id="resp_w", output=[], ms=3),
        rec("turn.start", 3, turn=2, previous_response_id="resp_w", generate=True, input=[MSG]),
        rec("turn.end", 4, turn=2, status="completed", response_id="resp_2", output=[call("call_a")], ms=6),
    ]
    code, out, _ = run(records_, tmp_path)
    assert code == 0
    assert "2 turns (2 completed, 1 warm-up), 0 recoveries" in out
    assert ("turn 1   resp_w  completed  3 ms  warm-up (generate: false: prepares the connection, generates "
            "nothing; in: message)") in out
    assert "turn 2   resp_2 <- turn 1  completed  6 ms  in: message  out: function_call(call_a)" in out
    assert "out: -" not in out
    code, out, _ = run(records_, tmp_path, "--json")
    assert [t["generate"] for t in json.loads(out)["sessions"][0]["turns"]] == [False, True]
