"""`replayguard reproduce`: a recording (chain trace with full bodies, flow file, fixture) run again through a real
mitmdump in front of the scripted fake upstream, with the outcomes compared turn by turn.

The fixtures in tests/fixtures/ were recorded by the scenarios below, through a real mitmdump (regenerate them with
REPLAYGUARD_WRITE_FIXTURES=1 pytest tests/test_reproduce.py -k records_and_reproduces)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from conftest import BASE_RULES, Client, completed, user
from replayguard.core.records import read_records
from replayguard.tools.fake_upstream import (
    CONNECTION_LIMIT_EVENT, Answer, Break, FakeUpstream, Script, ScriptedTurn, scripted_events,
)
from replayguard.tools.harness import ROOT, Mitmdump
from replayguard.tools.recording import (
    RecordingError, read_recording, session_from_records,
)
from replayguard.tools.reproduce import filler, main, redact_text, script_for

FIXTURES = Path(__file__).resolve().parent / "fixtures"
WRITE_FIXTURES = bool(os.environ.get("REPLAYGUARD_WRITE_FIXTURES"))
AUTH = {"Authorization": "Bearer sk-test-SECRET-0123456789abcdef"}
SERVER_ERROR = {"type": "error", "status": 500, "error": {
    "type": "server_error", "code": "server_error", "message": "The server had an error.", "param": None}}


# -- recording real sessions through mitmdump ----------------------------------------------------------
@dataclass
class Recorded:
    trace: Path
    flows: Path
    log: str


def record(tmp: Path, scenario: Callable[[FakeUpstream, Mitmdump, Callable[[], Client]], None],
           **sections: dict[str, Any]) -> Recorded:
    """Run ``scenario`` through a real mitmdump with replayguard, writing a full-bodies trace and a flow file."""
    rules = json.loads(json.dumps(BASE_RULES))
    rules["trace"] = {"bodies": "full"}
    for name, values in sections.items():
        rules.setdefault(name, {}).update(values)
    trace, flows = tmp / "trace.jsonl", tmp / "flows.mitm"
    fake = FakeUpstream().start()
    proxy = Mitmdump(tmp / "mitm", ["--mode", f"reverse:http://127.0.0.1:{fake.port}", "-w", str(flows),
                                    "--set", f"replayguard_trace={trace}"], rules)
    try:
        proxy.start()
        scenario(fake, proxy, lambda: Client(proxy.url + "/v1/responses", headers=AUTH))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # every session's end is in the trace
            events = [rec["event"] for rec in read_records(trace.read_text().splitlines())[0]]
            if events.count("session.end") >= events.count("session.start"):
                break
            time.sleep(0.05)
    finally:
        proxy.stop()
        fake.stop()
    assert "SECRET" not in trace.read_text() and "SECRET" not in proxy.log
    return Recorded(trace, flows, proxy.log)


def call_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for i in response["output"] if i["type"] == "function_call"]


def tool_output(call_id: str, text: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": text}


def turn(client: Client, previous: str | None, *items: dict[str, Any]) -> dict[str, Any]:
    request: dict[str, Any] = {"model": "m", "store": False, "input": list(items)}
    if previous:
        request["previous_response_id"] = previous
    return completed(client.turn(request))


def tool_chain_with_drop(fake: FakeUpstream, proxy: Mitmdump, connect_: Callable[[], Client]) -> None:
    """(a) A tool-call chain; the upstream's TCP connection is cut between a function_call and its output."""
    c = connect_()
    r1 = turn(c, None, user("please run TOOL ls (my key is sk-proj-SECRETSECRET123456)"))
    fake.drop_all()
    proxy.wait_log(r"lost while idle")
    r2 = turn(c, r1["id"], tool_output(call_of(r1)[0]["call_id"], "file_a file_b"))
    r3 = turn(c, r2["id"], user("now run TOOL2"))
    turn(c, r3["id"], *(tool_output(fc["call_id"], "ok") for fc in call_of(r3)))
    c.close()


def cache_loss(fake: FakeUpstream, proxy: Mitmdump, connect_: Callable[[], Client]) -> None:
    """(b) The upstream loses its connection-local cache and answers previous_response_not_found."""
    c = connect_()
    r1 = turn(c, None, user("please run TOOL ls"))
    r2 = turn(c, r1["id"], tool_output(call_of(r1)[0]["call_id"], "file_a"))
    fake.forget_responses()
    r3 = turn(c, r2["id"], user("again: TOOL ls"))
    turn(c, r3["id"], tool_output(call_of(r3)[0]["call_id"], "file_b"))
    c.close()


def orphaned_output(fake: FakeUpstream, proxy: Mitmdump, connect_: Callable[[], Client]) -> None:
    """(c) After the upstream died, a client sends a tool output whose call is not in the chain: fail closed."""
    c = connect_()
    r1 = turn(c, None, user("hello"))
    fake.drop_all()
    proxy.wait_log(r"lost while idle")
    c.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
            "input": [tool_output("call_never_made", "orphan")]})
    events, code, _ = c.until_closed()
    assert events[-1]["error"]["code"] == "previous_response_not_found" and code == 1011


SCENARIOS = {
    "tool_chain_drop": (tool_chain_with_drop, "flows", [
        "completed", "replayed (upstream connection dropped)", "completed", "completed"]),
    "cache_loss": (cache_loss, "trace", [
        "completed", "completed", "replayed (upstream answered previous_response_not_found)", "completed"]),
    "orphaned_output": (orphaned_output, "trace", [
        "completed", "failed closed: previous_response_not_found, close 1011"]),
}


def run(path: str | Path, *args: str) -> tuple[int, str, str]:
    """reproduce in-process (argument parsing aside, what the CLI runs)."""
    out, err = io.StringIO(), io.StringIO()
    flags = {"check": "--check" in args, "keep_text": "--keep-text" in args}
    values = dict(zip(args, args[1:]))
    options: dict[str, Any] = {key: values.get(f"--{key.replace('_', '-')}") for key in
                               ("against", "policy", "rules", "keep", "trace", "write_test", "session")}
    if "--timeout" in values:
        options["timeout"] = float(values["--timeout"])
    code = main(str(path), **flags, **{k: v for k, v in options.items() if v is not None}, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "replayguard", "reproduce", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def rows(out: str) -> list[tuple[str, str]]:
    """(verdict, line) of each turn line of the full output."""
    found = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[0].isdigit() and parts[1] in ("same", "DIFFERS"):
            found.append((parts[1], line))
    return found


@pytest.fixture(scope="module")
def drop_recording(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    yield record(tmp_path_factory.mktemp("drop"), tool_chain_with_drop)


# -- the three fixtures, recorded from real runs ----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fixture_reproduces_with_the_recorded_outcomes(name, tmp_path):
    fixture = FIXTURES / f"{name}.json"
    result = cli(str(fixture), "--check", "--trace", str(tmp_path / "t.jsonl"))
    assert result.returncode == 0, result.stdout + result.stderr
    expected = SCENARIOS[name][2]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"summary: {len(expected)} compared, {len(expected)} same, 0 differ [recorded vs "
                              "replayguard, recovery.policy pair-aware]"), result.stdout
    for outcome in set(expected):
        assert f"{outcome} x{expected.count(outcome)}" in summary
    assert "DIFFERS" not in result.stdout and "Traceback" not in result.stderr
    doc = json.loads(fixture.read_text())
    assert [t["outcome"]["kind"] for s in doc["sessions"] for t in s["turns"]][-1] in (
        "completed", "recovered", "failed closed")


@pytest.mark.parametrize("name", ["cache_loss", "orphaned_output"])
def test_scenario_records_and_reproduces(name, tmp_path):
    """The scenario recorded now reproduces with the outcomes its committed fixture holds."""
    scenario, source, expected = SCENARIOS[name]
    recorded = record(tmp_path, scenario)
    code, out, err = run(recorded.trace, "--trace", str(tmp_path / "reproduced.jsonl"))
    assert code == 0, out + err
    assert [v for v, _ in rows(out)] == ["same"] * len(expected)
    for (_, line), outcome in zip(rows(out), expected):
        assert line.count(outcome) == 2, line  # recorded and reproduced
    if WRITE_FIXTURES:
        run(getattr(recorded, source), "--write-test", str(FIXTURES / f"{name}.json"))


def test_tool_chain_drop_from_trace_and_flow_file(drop_recording, tmp_path):
    """The same recording as a trace and as a flow file: the same outcomes; the flow file's event order is what the
    fake upstream sends again."""
    expected = SCENARIOS["tool_chain_drop"][2]
    code, out, err = run(drop_recording.trace, "--keep", str(tmp_path / "work"))
    assert code == 0, out + err
    assert [v for v, _ in rows(out)] == ["same"] * 4
    assert "upstream failures: after turn 1, idle: TCP drop" in out
    assert "fake upstream: session 1 turn 1: TCP drop while idle" in out
    assert f"reproduced run's trace: {tmp_path / 'work' / 'trace.jsonl'}" in out
    assert (tmp_path / "work" / "flows.mitm").exists() and (tmp_path / "work" / "mitmdump.log").exists()
    reproduced = read_recording(tmp_path / "work" / "trace.jsonl")  # itself reproducible
    assert [t.outcome.describe() for t in reproduced.sessions[0].turns] == expected

    recording = read_recording(drop_recording.flows)
    recorded_types = [t.events for t in recording.sessions[0].turns]
    from replayguard.tools import reproduce as rp
    result = rp.reproduce(recording, rp.Options(trace=str(tmp_path / "flows-reproduced.jsonl")))
    assert not result.differ and len(result.rows) == 4
    sent: list[list[str]] = []
    for _, event in result.fake_sent:
        if event["type"] == "response.created":
            sent.append([])
        sent[-1].append(event["type"])
    assert sent == recorded_types  # every turn in the recorded event order
    assert any(t.count("response.function_call_arguments.delta") > 1 for t in sent)
    if WRITE_FIXTURES:
        run(drop_recording.flows, "--write-test", str(FIXTURES / "tool_chain_drop.json"))


# -- every kind of upstream failure --------------------------------------------------------------------------
def every_failure(fake: FakeUpstream, proxy: Mitmdump, connect_: Callable[[], Client]) -> None:
    # Session 1: a close with a code, silence, the connection age limit while idle.
    c = connect_()
    r1 = turn(c, None, user("please run TOOL ls"))
    fake.close_all(4000, "going away")
    proxy.wait_log(r"lost while idle \(upstream closed: close code 4000")
    r2 = turn(c, r1["id"], tool_output(call_of(r1)[0]["call_id"], "x"))
    fake.blackhole_all()
    r3 = turn(c, r2["id"], user("still there?"))
    fake.send_connection_limit_all()
    proxy.wait_log(r"connection limit reached while idle")
    turn(c, r3["id"], user("please run TOOL ls"))
    c.close()
    # Session 2: the upstream cuts TCP after three events of a response.
    c = connect_()
    r1 = turn(c, None, user("hi"))
    fake.drop_after_events = 3
    c.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
            "input": [user("hi again")]})
    events, code, _ = c.until_closed()
    assert events[-1]["error"]["code"] == "upstream_stream_interrupted"
    # Session 3: the reconnect handshake is refused.
    c = connect_()
    r1 = turn(c, None, user("please run TOOL ls"))
    fake.refuse_next(1, 503)
    fake.drop_all()
    proxy.wait_log(r"lost while idle")
    c.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
            "input": [tool_output(call_of(r1)[0]["call_id"], "x")]})
    events, code, _ = c.until_closed()
    assert events[-1]["error"]["code"] == "upstream_unavailable"
    # Session 4: the client's own handshake is refused.
    fake.refuse_next(1, 429)
    with pytest.raises(InvalidStatus):
        connect_()
    # Session 5: the upstream answers a turn with a server_error event (scripted: the fake has no such control).
    fake.script = Script({(0, 2): ScriptedTurn(answers=[Answer(status="error", error=SERVER_ERROR)])})
    c = connect_()
    r1 = turn(c, None, user("hi"))
    fake.script.begin(0, 2)
    events = c.turn({"model": "m", "store": False, "previous_response_id": r1["id"], "input": [user("and?")]})
    assert events[-1]["error"]["code"] == "server_error"
    c.close()
    # Session 6: the client reconnects and continues session 5's chain: replayguard resumes it.
    fake.script = None
    c = connect_()
    turn(c, r1["id"], user("where were we?"))
    c.close()


EVERY_FAILURE = [
    ("same", "replayed (upstream closed)"), ("same", "replayed (no event within first event timeout)"),
    ("same", "replayed (upstream connection limit reached)"),
    ("same", "failed closed: upstream_stream_interrupted, close 1011"),
    ("same", "failed closed: upstream_unavailable, close 1013"), ("same", "handshake refused: HTTP 429"),
    ("same", "client error: server_error"),
    ("same", "resumed (previous_response_id is not on this upstream connection)"),
]


def test_every_kind_of_upstream_failure_reproduces(tmp_path):
    recorded = record(tmp_path, every_failure, upstream={"first_event_timeout": 1})
    for source in (recorded.trace, recorded.flows):
        code, out, err = run(source, "--trace", str(tmp_path / "reproduced.jsonl"))
        assert code == 0, out + err
        lines = rows(out) + [("same" if " same " in line else "DIFFERS", line) for line in out.splitlines()
                             if line.strip().startswith("open ")]
        for verdict, text in EVERY_FAILURE:
            assert any(v == verdict and text in line for v, line in lines), f"{text} not reproduced:\n{out}"
        assert "close 4000 while idle" in out  # the fake closed with the recorded code
        assert "handshake refused with HTTP 503" in out and "silence before the first event" in out
        assert "turn 3: silence before the first event" in out  # what the recording says
        assert "error websocket_connection_limit_reached while idle" in out
        assert "TCP drop after 3 events" in out or "TCP drop after 2 events" in out
        assert "DIFFERS" not in out
    third = read_recording(recorded.trace).sessions[2]
    code, out, _ = run(recorded.trace, "--session", third.id[:8], "--check")
    assert code == 0 and out.startswith("summary: 2 compared, 2 same, 0 differ")
    # Without replayguard the silent upstream leaves the client waiting: no outcome, and the session ends there.
    code, out, _ = run(recorded.trace, "--against", "plain", "--session", read_recording(recorded.trace).sessions[0].id,
                       "--timeout", "1")
    assert code == 1
    assert [v for v, _ in rows(out)] == ["same", "DIFFERS", "DIFFERS", "DIFFERS"]
    assert "no outcome [nothing within 1 s]" in rows(out)[2][1]
    assert "not sent [the connection closed in turn 3]" in rows(out)[3][1]
    assert "fake upstream: session 1 turn 3: silence before the first event" in out


# -- differences make it exit 1 ----------------------------------------------------------------------------
def test_strict_policy_changes_the_recovered_turn(tmp_path):
    code, out, _ = run(FIXTURES / "tool_chain_drop.json", "--check", "--policy", "strict",
                       "--trace", str(tmp_path / "t.jsonl"))
    assert code == 1
    assert ("DIFFERS session 1 (" in out and "turn 2: recorded replayed (upstream connection dropped) | reproduced "
            "failed closed: no error event, close 1008") in out
    assert "turn 3: recorded completed | reproduced not sent [the connection closed in turn 2]" in out
    assert "recovery.policy strict" in out and out.count("DIFFERS") == 3


def test_against_plain_mitmdump_loses_the_chain(tmp_path):
    code, out, _ = run(FIXTURES / "tool_chain_drop.json", "--against", "plain")
    assert code == 1
    assert [v for v, _ in rows(out)] == ["same", "DIFFERS", "DIFFERS", "DIFFERS"]
    line = rows(out)[1][1]
    assert "replayed (upstream connection dropped)" in line
    assert "client error: previous_response_not_found [on a new client connection]" in line
    assert "reproduced through: mitmdump" in out and "without replayguard" in out
    assert "[recorded vs plain mitmdump]" in out


def test_a_changed_recorded_outcome_is_a_difference(tmp_path):
    doc = json.loads((FIXTURES / "orphaned_output.json").read_text())
    first, second = doc["sessions"][0]["turns"]
    first["outcome"] = {"kind": "recovered", "recoveries": [["replayed", "upstream connection dropped"]],
                        "code": None, "close": None, "note": ""}
    second["outcome"]["close"] = 1008
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    code, out, _ = run(edited, "--check")
    assert code == 1
    assert "turn 1: recorded replayed (upstream connection dropped) | reproduced completed" in out
    assert ("turn 2: recorded failed closed: previous_response_not_found, close 1008 | reproduced failed closed: "
            "previous_response_not_found, close 1011") in out
    assert "summary: 2 compared, 0 same, 2 differ" in out


def test_the_recorded_host_and_path_are_what_the_rules_match(tmp_path):
    """The client addresses the recorded upstream (Host, path) through the reverse proxy: host-scoped rules match."""
    doc = json.loads((FIXTURES / "cache_loss.json").read_text())
    session = doc["sessions"][0]
    session["url"] = "wss://api.openai.com/backend-api/codex/responses"
    session["rules"]["match"] = [{"host": "api.openai.com", "path": "/backend-api/codex/responses"}]
    edited = tmp_path / "host.json"
    edited.write_text(json.dumps(doc))
    code, out, err = run(edited, "--check", "--keep", str(tmp_path / "work"))
    assert code == 0, out + err
    flows = read_recording(tmp_path / "work" / "flows.mitm")
    assert flows.sessions[0].url == "ws://api.openai.com/backend-api/codex/responses"


def test_other_rules_change_the_outcome(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("match:\n  - path: '*/responses'\nrecovery:\n  max_retries: 0\n")
    code, out, _ = run(FIXTURES / "cache_loss.json", "--check", "--rules", str(rules))
    assert code == 1
    assert ("turn 3: recorded replayed (upstream answered previous_response_not_found) | reproduced failed closed: "
            "upstream_retries_exhausted, close 1011") in out


# -- cut-short recordings -----------------------------------------------------------------------------------
def test_a_half_written_trace_reproduces_as_far_as_it_goes(drop_recording, tmp_path):
    lines = drop_recording.trace.read_text().splitlines(keepends=True)
    end3 = next(i for i, line in enumerate(lines) if '"event":"turn.end","turn":3' in line.replace(" ", ""))
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:end3]) + lines[end3][: len(lines[end3]) // 2])
    code, out, err = run(cut)
    assert code == 0, out + err
    assert [v for v, _ in rows(out)] == ["same", "same"]
    offset = sum(len(line.encode()) for line in lines[:end3])
    assert f"note: the recording stops: line {end3 + 1} (byte {offset}) is half-written: the trace stops there" in out
    assert "reproduced up to turn 2 (the last complete turn); turn 3 not reproduced: its outcome is not recorded" in out


def test_a_flow_file_cut_short_reproduces_as_far_as_it_goes(drop_recording, tmp_path):
    data = drop_recording.flows.read_bytes()
    third = data.find(b"response.create", data.find(b"now run TOOL2"))
    at = third + 40
    cut = tmp_path / "cut.mitm"
    cut.write_bytes(data[:at])
    code, out, err = run(cut)
    assert code == 0, out + err
    assert [v for v, _ in rows(out)] == ["same", "same"]
    assert f"note: the recording stops: the file ends at byte {at}, in the middle of flow 1 (from byte 0)" in out
    assert "reproduced up to turn 2 (the last complete turn)" in out
    for at in range(50, len(data), 1013):  # any byte: read as far as it goes, or a clear error
        cut.write_bytes(data[:at])
        try:
            recording = read_recording(cut)
        except RecordingError as e:
            assert "no Responses WebSocket session" in str(e)
            continue
        assert recording.stopped and f"ends at byte {at}" in recording.stopped


# -- bad input ----------------------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error(tmp_path):
    summary_trace = tmp_path / "summary.jsonl"
    summary_trace.write_text(json.dumps({"ts": 1, "session": "s", "event": "session.start", "url": "ws://h/r"}) + "\n"
                             + json.dumps({"ts": 2, "session": "s", "event": "turn.start", "turn": 1,
                                           "input": [{"type": "message", "text": "hi"}]}) + "\n")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01garbage")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad_rules = tmp_path / "bad.yaml"
    bad_rules.write_text("match:\n  - path: '*/responses'\nrecovery:\n  policy: sometimes\n")
    cases = [
        ((str(tmp_path / "missing.jsonl"),), "cannot read"),
        ((str(summary_trace),), "written with trace.bodies: summary, and reproducing needs the requests and outputs; "
                                "record one with `trace: {bodies: full}`"),
        ((str(junk),), "neither a replayguard trace, a fixture nor a mitmproxy flow file"),
        ((str(empty),), "is empty"),
        ((str(FIXTURES / "cache_loss.json"), "--rules", str(bad_rules)), "mitmdump did not start"),
        ((str(FIXTURES / "cache_loss.json"), "--against", "plain", "--policy", "strict"), "--policy applies"),
        ((str(FIXTURES / "cache_loss.json"), "--session", "nope"), "no session whose id starts with 'nope'"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert (f"{bad_rules}:4: recovery.policy: expected one of pair-aware, strict, got 'sometimes'"
            in cli(str(FIXTURES / "cache_loss.json"), "--rules", str(bad_rules)).stderr)


# -- fixtures: compact and redacted -------------------------------------------------------------------------------
def test_write_test_redacts_secrets_and_text(drop_recording, tmp_path):
    redacted, kept = tmp_path / "redacted.json", tmp_path / "kept.json"
    for target, extra in ((redacted, ()), (kept, ("--keep-text",))):
        code, out, _ = run(drop_recording.flows, "--write-test", str(target), *extra)
        assert code == 0 and f"wrote {target} (4 turns" in out
        assert "SECRET" not in target.read_text()
    text = redacted.read_text()
    doc = json.loads(text)
    (session,) = doc["sessions"]
    assert "please run" not in text and "file_a" not in text and "tool said" not in text
    first, second = session["turns"][0], session["turns"][1]
    original = "please run TOOL ls (my key is sk-proj-SECRETSECRET123456)"
    assert first["request"]["input"][0] == {"type": "message", "role": "user", "content": filler(original)}
    call = first["output"][0]
    assert call["type"] == "function_call" and call["name"] == "exec_command" and call["call_id"] == "call_1"
    assert json.loads(call["arguments"]).keys() == {"cmd"}  # JSON arguments keep their keys
    assert second["request"]["input"][0]["call_id"] == "call_1"
    assert second["request"]["previous_response_id"] == first["response_id"]
    assert session["headers"]["authorization"].startswith("Bearer [redacted sha256:")
    assert "response.function_call_arguments.delta*" in text  # event order, run-length coded
    kept_text = kept.read_text()
    assert "please run TOOL ls (my key is [redacted])" in kept_text and "file_a file_b" in kept_text
    assert len(text) < 40_000
    code, out, err = run(redacted, "--check")  # a redacted fixture reproduces the same
    assert code == 0, out + err


def test_redaction_keeps_the_structure():
    item = {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thinking hard"}],
            "encrypted_content": "gAAAA-opaque"}
    assert redact_text(item) == {"type": "reasoning", "id": "rs_1", "summary": [
        {"type": "summary_text", "text": filler("thinking hard")}], "encrypted_content": filler("gAAAA-opaque")}
    request = {"type": "response.create", "model": "gpt-5", "instructions": "be nice", "reasoning": {
        "effort": "high", "summary": "auto"}, "include": ["reasoning.encrypted_content"],
        "tools": [{"type": "function", "name": "shell", "description": "runs a command",
                   "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}]}
    out = redact_text(request)
    assert out["instructions"] == filler("be nice") and out["reasoning"] == request["reasoning"]
    assert out["include"] == request["include"] and out["model"] == "gpt-5"
    assert out["tools"][0]["description"] == filler("runs a command")
    assert out["tools"][0]["parameters"] == request["tools"][0]["parameters"]


# -- the model: upstream failures and injected faults --------------------------------------------------------
def r(event: str, **fields: Any) -> dict[str, Any]:
    return {"ts": 0, "session": "s1", "event": event, **fields}


def body(text: str, previous: str | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"type": "response.create", "model": "m", "input": [user(text)]}
    if previous:
        request["previous_response_id"] = previous
    return request


def test_failures_are_placed_and_injected_faults_left_to_the_rules():
    records = [
        r("session.start", url="ws://h/v1/responses", rules={"match": [{"path": "*"}]}),
        r("handshake", conn=1, purpose="open", ok=True, headers={"openai-beta": "x"}),
        r("turn.start", turn=1, body=body("a")),
        r("turn.end", turn=1, status="completed", response_id="resp_1", output_items=[], usage={"total_tokens": 3}),
        r("fault", phase="fired", kind="drop", turn=1, conn=1, detail="drop upstream TCP (rules line 3)"),
        r("upstream.lost", conn=1, how="upstream connection dropped", turn=None),
        r("turn.start", turn=2, body=body("b", "resp_1")),
        r("handshake", conn=2, purpose="recovery", ok=True),
        r("recovery", turn=2, trigger="upstream connection dropped", action="replay full input"),
        r("upstream.lost", conn=2, how="upstream closed", detail="close code 4001 bye", turn=2, events=0),
        r("upstream.closed", conn=2, code=4001, reason="bye"),
        r("handshake", conn=None, purpose="recovery", ok=False, status=503, injected=False),
        r("fail_close", turn=2, error={"error": {"code": "upstream_unavailable"}}, close_code=1011),
        r("turn.end", turn=2, status="aborted", output_items=[]),
        r("turn.start", turn=3, body=body("c")),
        r("fault", phase="applied", kind="error", turn=3, conn=3, detail="turn 3 answered with server_error"),
        r("upstream.lost", conn=3, how="upstream answered previous_response_not_found", turn=3, events=0,
          detail={"status": 400, "code": "previous_response_not_found", "message": "gone", "param": None}),
    ]
    session = session_from_records(records)
    t1, t2, t3 = session.turns
    assert [(f.kind, f.injected) for f in t1.idle] == [("drop", True)]
    assert [(f.kind, f.code, f.after) for f in t2.failures] == [("close", 4001, 0)]
    assert t2.handshakes == [{"status": None, "injected": False}, {"status": 503, "injected": False}]
    assert t2.outcome.describe() == ("replayed (upstream connection dropped), then failed closed: upstream_unavailable, "
                                     "close 1011")
    # The injected error is one failure (the rule's), not also an upstream one.
    assert [(f.kind, f.injected) for f in t3.failures] == [("error", True)]
    script = script_for([session])
    assert script.turns[(0, 1)].idle == []  # the rule drops it again, not the fake
    assert [a.cut.kind for a in script.turns[(0, 2)].answers] == ["close"]
    assert script.turns[(0, 2)].handshakes == [None, 503]
    plain = script_for([session], plain=True)  # no rules without replayguard: the fake does it
    assert [b.kind for b in plain.turns[(0, 1)].idle] == ["drop"]


# -- the fake upstream's scripted mode ------------------------------------------------------------------
def test_scripted_fake_answers_in_the_recorded_order_and_breaks_where_told():
    output = [{"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "abcdef"}]},
              {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": "hello world", "annotations": []}]}]
    order = ["response.created", "response.in_progress", "response.output_item.added",
             "response.reasoning_summary_part.added", "response.reasoning_summary_text.delta",
             "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
             "response.reasoning_summary_part.done", "response.output_item.done", "response.output_item.added",
             "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
             "response.output_text.delta", "response.output_text.done", "response.content_part.done",
             "response.output_item.done", "response.completed"]
    usage = {"input_tokens": 7, "output_tokens": 9, "total_tokens": 16}
    script = Script({
        (0, 1): ScriptedTurn(answers=[Answer(output=output, usage=usage, events=order)],
                             idle=[Break("error", error=CONNECTION_LIMIT_EVENT)]),
        (0, 2): ScriptedTurn(answers=[Answer(output=output, after=4, cut=Break("close", 4002))]),
        (0, 3): ScriptedTurn(handshakes=[None, 418]),
    })
    fake = FakeUpstream()
    fake.script = script
    script.turns[(0, 0)] = ScriptedTurn(idle=[Break("close", 4003)])
    with fake:
        with connect(fake.url + "/v1/responses") as ws:  # right after the connection opened (idle after turn 0)
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.protocol.close_rcvd.code == 4003
        script.begin(0, 1)
        with connect(fake.url + "/v1/responses") as ws:
            ws.send(json.dumps({"type": "response.create", "model": "m", "input": [user("x")]}))
            events = [json.loads(ws.recv(timeout=5)) for _ in order]
            assert [e["type"] for e in events] == order
            assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "hello world"
            assert "".join(e["delta"] for e in events if e["type"].endswith("summary_text.delta")) == "abcdef"
            assert events[-1]["response"]["output"] == output and events[-1]["response"]["usage"] == usage
            limit = json.loads(ws.recv(timeout=5))  # then, while idle, the connection age limit
            assert limit["error"]["code"] == "websocket_connection_limit_reached"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.protocol.close_rcvd.code == 1000
        assert script.wait_idle(0, 1, 1)
        script.begin(0, 2)
        with connect(fake.url + "/v1/responses") as ws:
            ws.send(json.dumps({"type": "response.create", "model": "m", "input": [user("y")]}))
            got = []
            with pytest.raises(ConnectionClosed):
                while True:
                    got.append(json.loads(ws.recv(timeout=5)))
            assert len(got) == 4 and ws.protocol.close_rcvd.code == 4002
        script.begin(0, 3)
        with connect(fake.url + "/v1/responses"):
            pass
        with pytest.raises(InvalidStatus) as refused:
            connect(fake.url + "/v1/responses")
        assert refused.value.response.status_code == 418
    assert [what for _, what in script.applied] == [
        "close 4003 while idle", "error websocket_connection_limit_reached while idle", "close 4002 after 4 events",
        "handshake refused with HTTP 418"]


def test_usual_events_match_the_unscripted_fake():
    """Without a recorded order the scripted answer streams what the fake's own model streams."""
    item = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "exec_command",
            "arguments": json.dumps({"cmd": "echo a"}), "status": "completed"}
    base = {"id": "resp_1", "status": "in_progress", "output": []}
    events = scripted_events(None, [item], base, dict(base, status="completed", output=[item]))
    fake = FakeUpstream()
    with fake:
        with connect(fake.url + "/v1/responses") as ws:
            ws.send(json.dumps({"type": "response.create", "model": "m", "input": [user("TOOL")]}))
            unscripted = []
            while not unscripted or unscripted[-1]["type"] != "response.completed":
                unscripted.append(json.loads(ws.recv(timeout=5)))
    assert [e["type"] for e in events] == [e["type"] for e in unscripted]
    assert [e.get("delta") for e in events] == [e.get("delta") for e in unscripted]


def test_fixture_files_hold_no_secret_and_no_text():
    for name, (_, source, _) in SCENARIOS.items():
        text = (FIXTURES / f"{name}.json").read_text()
        assert "SECRET" not in text and "please run" not in text and "hello" not in text
        doc = json.loads(text)
        assert doc["recorded_from"]["kind"] == {"flows": "flow file", "trace": "trace"}[source]
        assert doc["sessions"][0]["rules"]["recovery"]["policy"] == "pair-aware"
