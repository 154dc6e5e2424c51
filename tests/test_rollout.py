"""Codex CLI session files (rollouts) read by `replayguard trace` and `reproduce`.

The files in tests/fixtures/codex/ were written by the real Codex CLI 0.171.0 (`codex exec "please run TOOL ls"`,
offline, against the fake upstream) by the live tests below; regenerate them with
REPLAYGUARD_WRITE_FIXTURES=1 REPLAYGUARD_CODEX=/path/to/codex pytest tests/test_rollout.py -k live.
They hold no secret (Codex does not write its API key into a rollout; the tests check it)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from codex import CODEX, KEY, SKIP_REASON, run_codex

from replayguard.tools.fake_upstream import Answer, FakeUpstream, Script, ScriptedTurn
from replayguard.tools.harness import ROOT, Mitmdump
from replayguard.tools.rollout import read_rollout, records
from replayguard.tools.sources import read_recording, trace_records
from replayguard.tools.viewer import build_sessions, main as view

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "codex"
WRITE_FIXTURES = bool(os.environ.get("REPLAYGUARD_WRITE_FIXTURES"))
live = pytest.mark.skipif(not CODEX, reason=SKIP_REASON)
NO_TOOL_CALL = {"type": "error", "status": 400, "error": {
    "type": "invalid_request_error", "code": None, "param": "input",
    "message": "No tool call found for function call output with call_id call_1."}}


def trace(path: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = view(str(path), as_json="--json" in args, check="--check" in args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def sessions(path: Path) -> list[Any]:
    return build_sessions(trace_records(path)[0])


def shape(view_: Any) -> list[tuple[Any, ...]]:
    def kinds(items: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
        return [(i.get("type"), i.get("call_id")) for i in items]
    return [(t.number, t.status, t.previous_response_id is not None, kinds(t.input), kinds(t.output))
            for t in view_.turns]


def keep(rollout: Path, name: str) -> None:
    """Refresh a committed fixture from this run (REPLAYGUARD_WRITE_FIXTURES=1)."""
    assert KEY not in rollout.read_text() and "SECRET" not in rollout.read_text()
    if WRITE_FIXTURES:
        FIXTURES.mkdir(parents=True, exist_ok=True)
        shutil.copy(rollout, FIXTURES / f"{name}.jsonl")


# -- the committed real files (every run) --------------------------------------------------------------
def test_a_tool_call_turn_reads_as_two_chained_requests():
    code, out, err = trace(FIXTURES / "tool_call.jsonl", "--check")
    assert code == 0 and err == ""
    (view_,) = sessions(FIXTURES / "tool_call.jsonl")
    assert view_.id.endswith("#1") and view_.source.startswith("codex rollout (codex_exec 0.171.0)")
    first, second = view_.turns
    assert shape(view_) == [
        (1, "completed", False, [("message", None)] * 3, [("reasoning", None), ("function_call", "call_1")]),
        (2, "completed", True, [("function_call_output", "call_1")], [("reasoning", None), ("message", None)])]
    assert second.previous_response_id == first.response_id and first.response_id.startswith("resp_")
    assert "call_1: called in turn 1 output, answered in turn 2 input  [paired]" in out
    assert f"turn 2   {second.response_id} <- turn 1  completed" in out
    assert first.ms is not None and second.ms is not None


def test_a_response_that_broke_off_is_a_lost_turn_and_codex_retries_on_a_new_connection():
    path = FIXTURES / "drop_mid_response.jsonl"
    broken, retry = sessions(path)
    assert broken.id.endswith("#1") and retry.id.endswith("#2")
    ((_, status, chained, inputs, kept),) = shape(broken)
    assert status == "connection lost" and not chained and kept == [("reasoning", None)]
    (line,) = [line for _, line in broken.timeline]
    assert line.startswith("! upstream lost during turn 1 (seen by the client): the response broke off "
                           "(Codex kept 1 output item, then retried ")
    assert "the rollout does not say how (close, drop or silence)" in line
    ((_, status, chained, again, _),) = shape(retry)
    assert status == "completed" and not chained and again == inputs + kept  # the whole history, kept items too


def test_a_silent_upstream_shows_as_the_time_codex_waited():
    (line,) = [line for _, line in sessions(FIXTURES / "silent_mid_response.jsonl")[0].timeline]
    waited = float(line.split("then retried ")[1].split(" s later")[0])
    assert waited >= 3.0  # the provider's stream_idle_timeout_ms = 3000 in that run


def test_no_tool_call_found_is_diagnosed_with_its_call_id_and_turn():
    path = FIXTURES / "no_tool_call_found.jsonl"
    code, out, _ = trace(path, "--check")
    assert code == 2
    assert "turn 2   - <- turn 1  error" in out
    assert "error 400 None: No tool call found for function call output with call_id call_1." in out
    assert ('✗ turn 2: the upstream answered "No tool call found for function call output with call_id call_1."; '
            "its call is in turn 1 output, which this request chains on: the upstream did not have that part of the "
            "chain") in out
    assert "call_1: called in turn 1 output, answered in turn 2 input  [ORPHANED]" in out


def test_codex_giving_up_keeps_its_last_error():
    (view_,) = sessions(FIXTURES / "gave_up.jsonl")
    (turn,) = view_.turns
    assert turn.status == "connection lost" and turn.output == []
    assert turn.error["message"].startswith("stream disconnected before completion")


def test_a_cut_rollout_is_read_as_far_as_it_goes(tmp_path):
    data = (FIXTURES / "tool_call.jsonl").read_bytes()
    lines = data.splitlines(keepends=True)
    usage = next(i for i, line in enumerate(lines) if b'"token_usage_record"' in line)
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(lines[:usage + 1]) + lines[usage + 1][:40])
    code, out, err = trace(cut)
    assert code == 0 and "half-written" in err and "Traceback" not in err
    assert "turn 1" in out and "completed" in out
    for size in range(0, len(data), max(1, len(data) // 40)):  # cut anywhere: one clear answer, never a traceback
        cut.write_bytes(data[:size])
        code, out, err = trace(cut)
        assert code in (0, 1) and "Traceback" not in err, (size, err)
        if code == 1:
            assert err.startswith("replayguard trace: ") and err.count("\n") == 1


def test_records_are_the_trace_schema_with_the_whole_requests():
    rollout = read_rollout(FIXTURES / "tool_call.jsonl")
    recs = records(rollout)
    starts = [r for r in recs if r["event"] == "turn.start"]
    assert [r["body"]["input"][0]["type"] for r in starts] == ["message", "function_call_output"]
    assert all("internal_chat_message_metadata_passthrough" not in i for r in starts for i in r["body"]["input"])
    assert [r["event"] for r in recs][0] == "session.start" and recs[-1]["event"] == "session.end"


# -- reproduce (a real mitmdump in front of the scripted fake) --------------------------------------------------
def reproduce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "replayguard", "reproduce", *args], capture_output=True, text=True,
                          timeout=180, cwd=ROOT)


def test_reproduce_a_rollout_shows_what_replayguard_does_where_codex_lost_the_response(tmp_path):
    path = FIXTURES / "drop_mid_response.jsonl"
    recording = read_recording(path)
    assert [s.id[-2:] for s in recording.sessions] == ["#1", "#2"]
    ((failure,),) = [t.failures for t in recording.sessions[0].turns]
    assert (failure.kind, failure.after) == ("drop", 4)  # after the kept reasoning item's events
    result = reproduce(str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "connection lost (how is not recorded)" in result.stdout
    assert "failed closed: upstream_stream_interrupted, close 1011" in result.stdout  # replayguard's answer
    assert "fake upstream: session 1 turn 1: TCP drop after 4 events" in result.stdout
    assert "the rollout does not say how the upstream failed" in result.stdout and "mitmdump -w FILE" in result.stdout
    plain = reproduce(str(path), "--against", "plain", "--check")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "2 compared, 2 same, 0 differ [recorded vs plain mitmdump]" in plain.stdout
    fixture = tmp_path / "rollout-fixture.json"
    written = reproduce(str(path), "--write-test", str(fixture))
    assert written.returncode == 0 and "text redacted" in written.stdout
    text = fixture.read_text()
    assert "please run TOOL ls" not in text and '"recorded_from"' in text and "codex rollout" in text
    again = reproduce(str(fixture))
    assert again.returncode == 1 and "failed closed: upstream_stream_interrupted" in again.stdout
    code, out, _ = trace(fixture)
    assert code == 0 and "connection lost" in out and "#2" in out


def test_reproduce_where_codex_gave_up_and_where_its_connection_was_refused():
    result = reproduce(str(FIXTURES / "gave_up.jsonl"), "--check")
    assert result.returncode == 1, result.stdout + result.stderr  # replayguard resends what Codex lost
    assert ("DIFFERS session 1 (" in result.stdout and "turn 1: recorded connection lost (how is not recorded) | "
            "reproduced resent (upstream connection dropped)" in result.stdout)
    assert "Codex kept 0 output items: reproduced as a TCP drop before the first event" in result.stdout
    code, out, _ = trace(FIXTURES / "fallback_502.jsonl")
    assert code == 0 and "turn 1   -  refused" in out and "! handshake refused: HTTP 502 (open)" in out
    result = reproduce(str(FIXTURES / "fallback_502.jsonl"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "open  same     handshake refused: HTTP 502     handshake refused: HTTP 502" in result.stdout
    assert "fallback to HTTPS: reproduced as a refused WebSocket handshake" in result.stdout


def test_reproduce_a_clean_rollout_and_an_upstream_error():
    result = reproduce(str(FIXTURES / "tool_call.jsonl"), "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("note: a Codex rollout keeps Codex's history")
    assert "summary: 2 compared, 2 same, 0 differ" in result.stdout
    result = reproduce(str(FIXTURES / "no_tool_call_found.jsonl"), "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "client error: No tool call found for function call output with call_id call_1. x1" in result.stdout


# -- the real Codex CLI, offline ------------------------------------------------------------------------------
def wire(fake: FakeUpstream) -> list[dict[str, Any]]:
    return [m for _, m in fake.received if m.get("type") == "response.create"]


def ids(items: list[dict[str, Any]]) -> list[tuple[Any, Any, Any]]:
    return [(i.get("type"), i.get("id"), i.get("call_id")) for i in items]


@live
def test_live_the_rebuilt_requests_are_those_codex_sent(fake, tmp_path):
    run = run_codex(tmp_path, fake.url)
    assert run.returncode == 0, run.stderr
    keep(run.rollout, "tool_call")
    sent = wire(fake)
    assert sent[0].get("generate") is False  # Codex's warm-up: not in the rollout
    rebuilt = [r["body"] for r in records(read_rollout(run.rollout)) if r["event"] == "turn.start"]
    assert len(rebuilt) == len(sent) - 1 == 2
    warmup_id = next(e["response"]["id"] for _, e in fake.sent if e.get("type") == "response.completed")
    assert sent[1]["previous_response_id"] == warmup_id and "previous_response_id" not in rebuilt[0]
    assert rebuilt[1]["previous_response_id"] == sent[2]["previous_response_id"]
    for mine, theirs in zip(rebuilt, sent[1:]):
        assert ids(mine["input"]) == ids(theirs["input"])
        assert mine["input"] == theirs["input"]  # item for item, as sent


@live
def test_live_a_drop_mid_response(fake, tmp_path):
    fake.drop_after_events = 6  # the warm-up has 3 events; the tool call's turn is cut after its reasoning item
    run = run_codex(tmp_path, fake.url)
    assert run.returncode == 0, run.stderr
    keep(run.rollout, "drop_mid_response")
    broken, retry = read_rollout(run.rollout).connections
    assert [r.status for r in broken] == ["connection lost"] and [r.status for r in retry] == ["completed"]
    resend = wire(fake)[-1]  # Codex's retry on a new connection: its whole history, no previous_response_id
    assert "previous_response_id" not in resend and retry[0].previous_response_id is None
    # The same items, but for the base instructions Codex sends first and does not keep in the rollout.
    assert ids(resend["input"])[1:] == ids(retry[0].input)
    assert broken[0].outputs == [i for i in resend["input"] if i["type"] == "reasoning"]


@live
def test_live_a_drop_between_responses_leaves_no_trace_in_the_rollout(fake, tmp_path):
    fake.drop_after_responses = 2  # after the warm-up and the tool call: Codex reconnects and resends silently
    run = run_codex(tmp_path, fake.url)
    assert run.returncode == 0, run.stderr
    assert len({c for c, _ in fake.received}) == 2 and "previous_response_id" not in wire(fake)[-1]
    (view_,) = sessions(run.rollout)
    assert [(t.status, t.previous_response_id is not None) for t in view_.turns] == [("completed", False),
                                                                                   ("completed", True)]
    assert view_.timeline == [] and view_.problems == []


@live
def test_live_a_silent_upstream(fake, tmp_path):
    fake.stall_after_events = 6  # silent mid-response: Codex waits for its idle timeout, then retries
    run = run_codex(tmp_path, fake.url, provider="stream_idle_timeout_ms = 3000")
    assert run.returncode == 0, run.stderr
    keep(run.rollout, "silent_mid_response")
    broken = read_rollout(run.rollout).requests[0]
    assert broken.status == "connection lost" and broken.gap is not None and broken.gap >= 3.0


@live
def test_live_codex_gives_up_on_a_mute_upstream(fake, tmp_path):
    fake.mute = True
    run = run_codex(tmp_path, fake.url, provider="stream_idle_timeout_ms = 2000\nstream_max_retries = 1\n"
                                                  "request_max_retries = 1")
    assert run.returncode != 0
    assert "Reconnecting... 1/1" in run.stderr  # printed, and not kept in the rollout:
    assert "Reconnecting" not in run.rollout.read_text()
    keep(run.rollout, "gave_up")
    (request,) = read_rollout(run.rollout).requests
    assert request.status == "connection lost" and "stream disconnected before completion" in request.error_text


class _ErrorAt(ScriptedTurn):
    """The upstream answers its ``at``-th response.create with an error event; the model answers the others."""

    def __init__(self, at: int, event: dict[str, Any]) -> None:
        super().__init__()
        self.at, self.event = at, event

    def answer(self, index: int) -> Answer | None:
        return Answer(status="error", error=self.event) if index == self.at else None


@live
def test_live_no_tool_call_found(fake, tmp_path):
    fake.script = Script({(0, 0): _ErrorAt(2, NO_TOOL_CALL)})  # the warm-up, the tool call, then its output
    run = run_codex(tmp_path, fake.url)
    assert run.returncode != 0 and "No tool call found" in run.stderr
    keep(run.rollout, "no_tool_call_found")
    code, out, _ = trace(run.rollout, "--check")
    assert code == 2 and "turn 2: the upstream answered \"No tool call found" in out


@live
def test_live_through_replayguard_the_rollout_matches_the_trace(fake, mitm, tmp_path):
    har = tmp_path / "codex.har"
    proxy = mitm(fake, faults=[{"kind": "drop", "after_turn": 2}], trace={"bodies": "full"},
                 args=["--set", f"hardump={har}"])
    run = run_codex(tmp_path, proxy.url)
    assert run.returncode == 0, run.stderr
    proxy.wait_log(r"turn 3: upstream connection dropped -> replay")
    proxy.stop()  # the HAR is written when mitmdump stops
    (live_view,) = sessions(proxy.tmp / "trace.jsonl")
    (rollout_view,) = sessions(run.rollout)
    # The same responses (replayguard passes the upstream's ids through), but for Codex's warm-up.
    assert [t.response_id for t in rollout_view.turns] == [t.response_id for t in live_view.turns][1:]
    assert live_view.recoveries == 1 and rollout_view.timeline == []  # Codex never saw the drop
    (har_view,) = sessions(har)
    assert har_view.source == "HAR export" and har_view.recoveries == 1
    assert [line for _, line in har_view.timeline] == [line for _, line in live_view.timeline]
    result = reproduce(str(run.rollout), "--check")
    assert result.returncode == 0 and "2 compared, 2 same" in result.stdout, result.stdout + result.stderr
    assert "SECRET" not in json.dumps(trace_records(har)[0])  # replayguard's records in the HAR are redacted


@live
def test_live_through_plain_mitmdump_the_har_shows_codex_reconnecting(fake, tmp_path):
    har = tmp_path / "plain.har"
    fake.drop_after_responses = 2
    proxy = Mitmdump(tmp_path / "plain", ["--mode", f"reverse:http://127.0.0.1:{fake.port}",
                                          "--set", f"hardump={har}"], None, addon=False)
    try:
        proxy.start()
        run = run_codex(tmp_path, proxy.url)
    finally:
        proxy.stop()
    assert run.returncode == 0, run.stderr
    first, second = sessions(har)  # two WebSocket entries: Codex's second connection resends its history
    assert [t.status for t in first.turns] == ["completed", "completed"] and first.turns[0].input[0]["role"] == \
        "developer"
    (resend,) = second.turns
    assert resend.previous_response_id is None and resend.status == "completed"
    assert [i.get("call_id") for i in resend.input if i.get("call_id")] == ["call_1", "call_1"]
    assert first.recoveries == second.recoveries == 0 and first.problems == second.problems == []


@live
def test_live_through_replayguard_a_drop_mid_response_is_failed_closed_and_codex_resends(fake, mitm, tmp_path):
    """What `reproduce` shows for drop_mid_response.jsonl is what Codex meets through replayguard: the turn fails
    closed with upstream_stream_interrupted (part of it had reached Codex), and Codex resends its history."""
    fake.drop_after_events = 6
    proxy = mitm(fake)
    run = run_codex(tmp_path, proxy.url)
    assert run.returncode == 0, run.stderr
    proxy.wait_log(r"turn 2: upstream connection dropped after part of the response reached the client -> failed "
                   r"closed \(close 1011\)")
    broken, retry = read_rollout(run.rollout).connections
    assert [r.status for r in broken] == ["connection lost"] and [r.status for r in retry] == ["completed"]
    (live_fail,) = [r for r in trace_records(proxy.tmp / "trace.jsonl")[0] if r["event"] == "fail_close"]
    assert live_fail["error"]["error"]["code"] == "upstream_stream_interrupted"


@live
def test_live_through_replayguard_a_mute_upstream_ends_in_codexs_https_fallback(fake, mitm, tmp_path):
    """Every upstream connection silent: replayguard fails each WebSocket attempt closed; Codex falls back to HTTPS,
    which mitmdump answers 502 (the fake speaks WebSocket only), and that is the one error its rollout keeps."""
    fake.mute = True
    proxy = mitm(fake)
    run = run_codex(tmp_path, proxy.url, provider="stream_max_retries = 0\nrequest_max_retries = 0")
    assert run.returncode != 0 and "Falling back from WebSockets to HTTPS transport" in run.stderr
    assert "replayguard: no event within first event timeout" in run.stderr  # seen on stderr, not kept
    keep(run.rollout, "fallback_502")
    (request,) = read_rollout(run.rollout).requests
    assert (request.status, request.http_status) == ("refused", 502)
    assert "first event timeout" not in run.rollout.read_text()


@live
def test_live_a_resumed_session_continues_on_a_new_connection_with_its_whole_history(fake, tmp_path):
    first = run_codex(tmp_path, fake.url)
    again = run_codex(tmp_path, fake.url, prompt="now say hello", resume=True)
    assert first.returncode == again.returncode == 0, again.stderr
    assert again.rollout == first.rollout  # appended to the same file
    before, after = read_rollout(again.rollout).connections
    assert [r.status for r in before] == ["completed", "completed"]
    (resumed,) = after
    sent = wire(fake)[-1]  # on the resumed process's connection, after its warm-up
    assert sent["previous_response_id"] != before[-1].response_id and resumed.previous_response_id is None
    assert resumed.input == sent["input"]  # the whole history and the new message, item for item


@live
def test_live_through_replayguard_a_silent_upstream_is_only_a_wait_in_the_rollout(fake, mitm, tmp_path):
    """Silent after the tool call: replayguard finds it by its first-event timeout (2 s in the tests' rules) and
    replays; Codex never notices, and its rollout shows only the wait, in the next response's duration."""
    fake.blackhole_after_responses = 2  # the warm-up and the tool call
    proxy = mitm(fake)
    run = run_codex(tmp_path, proxy.url)
    assert run.returncode == 0, run.stderr
    proxy.wait_log(r"turn 3: no event within first event timeout .* -> replay")
    (view_,) = sessions(run.rollout)
    assert [t.status for t in view_.turns] == ["completed", "completed"] and view_.timeline == []
    assert view_.turns[1].ms >= 2000
