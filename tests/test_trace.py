"""The chain trace (replayguard_trace): the records each core scenario writes, field by field, through a real
mitmdump; file permissions; crash-safe lines; no secret in any record."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from conftest import Client, completed, user
from replayguard.core.records import Bodies, read_records
from replayguard.core.redact import redact_headers, scrub, secret_values
from replayguard.proxy.tracing import SessionTrace, TraceFile, TraceWriter

TOKEN = "tok_KNOWN_SECRET_7f3a9c"
AUTH = {"Authorization": f"Bearer {TOKEN}", "OpenAI-Beta": "responses_websockets=2026-02-06",
        "Cookie": f"session={TOKEN}-cookie", "x-api-key": f"{TOKEN}-apikey"}


def traced(mitm, fake, tmp_path: Path, **sections: Any):
    path = tmp_path / "trace.jsonl"
    proxy = mitm(fake, args=["--set", f"replayguard_trace={path}"], **sections)
    return proxy, path


def records(path: Path, until: str | None = None, count: int = 1, timeout: float = 5) -> list[dict[str, Any]]:
    """The trace's records; waits until `count` records of event `until` are there."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        recs, bad = read_records(text.splitlines())
        assert not bad, f"broken trace lines {bad}:\n{text}"
        if until is None or sum(r["event"] == until for r in recs) >= count or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


def of(recs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [r for r in recs if r["event"] == event]


def assert_no_secret(path: Path, proxy: Any) -> None:
    text = path.read_text()
    assert TOKEN not in text
    assert TOKEN not in proxy.log


def tool_chain(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("please run TOOL ls")]}))
    call = next(i for i in r1["output"] if i["type"] == "function_call")
    return r1, call


def test_healthy_tool_chain_trace(fake, mitm, tmp_path):
    proxy, path = traced(mitm, fake, tmp_path)
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1, call = tool_chain(client)
    out = {"type": "function_call_output", "call_id": call["call_id"], "output": "file.txt"}
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"], "input": [out]}))
    client.close()
    recs = records(path, until="session.end")
    session = recs[0]["session"]
    assert all(r["session"] == session for r in recs)
    assert [r["event"] for r in recs] == ["session.start", "handshake", "turn.start", "turn.end", "turn.start",
                                         "turn.end", "upstream.closed", "session.end"]
    start = recs[0]
    assert start["url"] == f"ws://127.0.0.1:{fake.port}/v1/responses" and start["schema"] == 1
    hs = recs[1]
    assert hs["ok"] is True and hs["status"] == 101 and hs["purpose"] == "open" and hs["conn"] >= 1
    assert hs["headers"]["authorization"].startswith("Bearer [redacted sha256:")
    assert hs["headers"]["cookie"].startswith("[redacted sha256:")
    assert hs["headers"]["x-api-key"].startswith("[redacted sha256:")
    assert hs["headers"]["openai-beta"] == "responses_websockets=2026-02-06"
    assert hs["response_headers"]["x-codex-turn-state"] == "ts-1"
    assert "x-codex-turn-state" not in hs["headers"]  # what was sent, not what was learned
    closed = recs[6]
    assert closed["conn"] == hs["conn"] and closed["code"] == 1000  # replayguard closed it as the client left
    t1, e1, t2, e2 = recs[2:6]
    assert t1["turn"] == 1 and t1["model"] == "m" and t1["store"] is False and t1["previous_response_id"] is None
    assert t1["input"] == [{"type": "message", "role": "user", "text": "please run TOOL ls"}]
    assert t1["bytes"] > 0 and t1["conn"] == hs["conn"]
    assert e1["turn"] == 1 and e1["status"] == "completed" and e1["response_id"] == r1["id"]
    assert {"type": "function_call", "call_id": call["call_id"], "name": call["name"]}.items() <= e1["output"][-1].items()
    assert e1["usage"] == r1["usage"] and e1["ms"] >= 0
    assert t2["previous_response_id"] == r1["id"]
    assert t2["input"] == [{"type": "function_call_output", "call_id": call["call_id"], "text": "file.txt"}]
    assert e2["response_id"] == r2["id"] and e2["previous_response_id"] == r1["id"]
    end = recs[7]
    assert end["turns_completed"] == 2 and end["turns_failed"] == 0 and end["recoveries"] == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert_no_secret(path, proxy)


def test_recovery_trace_after_idle_close(fake, mitm, tmp_path):
    proxy, path = traced(mitm, fake, tmp_path)
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1, call = tool_chain(client)
    fake.close_all(1011, "keepalive ping timeout")
    proxy.wait_log(r"lost while idle")
    out = {"type": "function_call_output", "call_id": call["call_id"], "output": "file.txt"}
    completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"], "input": [out]}))
    client.close()
    recs = records(path, until="session.end")
    lost = of(recs, "upstream.lost")
    assert len(lost) == 1 and lost[0]["turn"] is None and lost[0]["how"] == "upstream closed"
    assert "1011" in lost[0]["detail"]
    handshakes = of(recs, "handshake")
    assert [h["purpose"] for h in handshakes] == ["open", "recovery"]
    assert handshakes[1]["headers"]["x-codex-turn-state"] == "ts-1"
    (rec,) = of(recs, "recovery")
    assert rec["turn"] == 2 and rec["trigger"] == "upstream closed"
    assert rec["action"].startswith("replay") and rec["removed_previous_response_id"] == r1["id"]
    assert rec["from_conn"] == handshakes[0]["conn"] and rec["to_conn"] == handshakes[1]["conn"]
    assert [(i["type"], i.get("call_id")) for i in rec["input"]] == [
        ("message", None), ("function_call", call["call_id"]), ("function_call_output", call["call_id"])]
    assert rec["items"] == 3 and rec["bytes"] > 0
    assert of(recs, "turn.end")[-1]["status"] == "completed"
    assert of(recs, "session.end")[0]["recoveries"] == 1
    assert_no_secret(path, proxy)


def test_fail_close_trace_for_orphaned_output(fake, mitm, tmp_path):
    proxy, path = traced(mitm, fake, tmp_path)
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    fake.close_all()
    proxy.wait_log(r"lost while idle")
    ghost = {"type": "function_call_output", "call_id": "call_ghost", "output": "x"}
    client.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
                 "input": [ghost]})
    events, code, _ = client.until_closed()
    assert code == 1011
    recs = records(path, until="session.end")
    (fail,) = of(recs, "fail_close")
    assert fail["turn"] == 2 and fail["close_code"] == 1011
    assert fail["error"] == events[-1]  # exactly the event the client got
    assert "call_ghost" in fail["reason"]
    assert of(recs, "turn.end")[-1] == {**of(recs, "turn.end")[-1], "turn": 2, "status": "aborted",
                                        "reason": "failed closed"}
    assert of(recs, "session.end")[0]["reason"].startswith("failed closed")
    assert_no_secret(path, proxy)


def test_refused_first_handshake_is_traced(fake, mitm, tmp_path):
    proxy, path = traced(mitm, fake, tmp_path)
    fake.refuse_next(1, 401)
    try:
        Client(proxy.url + "/v1/responses", headers=AUTH)
    except Exception:
        pass
    recs = records(path, until="session.end")
    assert [r["event"] for r in recs] == ["session.start", "handshake", "session.end"]
    assert recs[1]["ok"] is False and recs[1]["status"] == 401
    assert "HTTP 401" in recs[2]["reason"]
    assert_no_secret(path, proxy)


def test_bodies_none_and_full(fake, mitm, tmp_path):
    proxy, path = traced(mitm, fake, tmp_path, trace={"bodies": "none"})
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    completed(client.turn({"model": "m", "store": False, "input": [user("private words")]}))
    client.close()
    recs = records(path, until="session.end")
    assert of(recs, "turn.start")[0]["input"] == [{"type": "message", "role": "user"}]
    assert "private words" not in path.read_text()

    proxy2, path2 = traced(mitm, fake, tmp_path / "full", trace={"bodies": "full"})
    client = Client(proxy2.url + "/v1/responses", headers=AUTH)
    r = completed(client.turn({"model": "m", "store": False, "input": [user("all of it")]}))
    client.close()
    recs = records(path2, until="session.end")
    assert of(recs, "turn.start")[0]["body"]["input"] == [user("all of it")]
    assert of(recs, "turn.end")[0]["output_items"] == r["output"]


# -- the writer itself ------------------------------------------------------------------------------
def test_writer_is_private_and_survives_a_half_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"event":"session.start","session":"a"}\n{"event":"turn.st')  # a crash mid-line
    os.chmod(path, 0o644)
    writer = TraceWriter(path)
    writer.write("a", "session.end", reason="x")
    writer.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    recs, bad = read_records(path.read_text().splitlines())
    assert [r["event"] for r in recs] == ["session.start", "session.end"] and bad == [2]


def test_writer_directory_gets_a_file_per_run(tmp_path):
    writer = TraceWriter(str(tmp_path / "traces") + "/")
    writer.write("s", "session.start")
    writer.close()
    (file,) = (tmp_path / "traces").iterdir()
    assert file.name.startswith("replayguard-") and file.suffix == ".jsonl"
    assert stat.S_IMODE(os.stat(tmp_path / "traces").st_mode) & 0o077 == 0


def test_session_trace_scrubs_its_secrets_everywhere(tmp_path):
    writer = TraceWriter(tmp_path / "t.jsonl")
    headers = [("Authorization", f"Bearer {TOKEN}"), ("Cookie", f"a=1; sid={TOKEN}x")]
    trace = SessionTrace(TraceFile(writer), "s", secret_values(headers), Bodies.FULL)
    trace.record("turn.end", error={"message": f"Incorrect API key provided: {TOKEN}"}, note=f"cookie {TOKEN}x")
    writer.close()
    text = (tmp_path / "t.jsonl").read_text()
    assert TOKEN not in text and text.count("[redacted]") == 2


def test_redaction_helpers():
    h = redact_headers([("Authorization", "Bearer abc12345"), ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
                        ("OpenAI-Beta", "x"), ("x-codex-turn-state", "ts-9"), ("X-Goog-Api-Key", "k1234567")])
    assert h["authorization"].startswith("Bearer [redacted sha256:") and "abc12345" not in h["authorization"]
    assert "dXNlcjpwYXNz" not in h["proxy-authorization"]
    assert h["openai-beta"] == "x" and h["x-codex-turn-state"] == "ts-9"
    assert "k1234567" not in h["x-goog-api-key"]
    # The same secret always gets the same fingerprint (sessions can be told apart, keys cannot be read).
    assert redact_headers([("Authorization", "Bearer abc12345")]) == {"authorization": h["authorization"]}
    assert scrub("key sk-proj-AbCdEfGh12345 and Bearer zzzzzzzzzz9") == "key [redacted] and Bearer [redacted]"
    assert secret_values([("Authorization", "Bearer abcdef")])[0] == "Bearer abcdef"
    assert json.loads(json.dumps(h))  # plain JSON


def test_key_in_the_url_never_reaches_trace_or_log(fake, mitm, tmp_path):
    proxy, path = traced(mitm, fake, tmp_path)
    client = Client(proxy.url + "/v1/responses?api-version=1&api-key=qk_SECRET_4242", headers=AUTH)
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hi")]}))
    fake.close_all()
    proxy.wait_log(r"lost while idle")
    fake.refuse_next(1, 503)
    client.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
                 "input": [user("again")]})
    events, code, _ = client.until_closed()
    assert code == 1013 and "HTTP 503" in events[-1]["error"]["message"]
    assert fake.handshakes[0]["path"].endswith("api-key=qk_SECRET_4242")  # the upstream still gets it
    recs = records(path, until="session.end")
    assert of(recs, "session.start")[0]["url"].endswith("/v1/responses?api-version=1&api-key=[redacted]")
    assert "qk_SECRET_4242" not in json.dumps(events)
    assert_no_secret(path, proxy)  # and conftest checks every log line and trace for SECRET


def test_mid_response_loss_trace(fake, mitm, tmp_path):
    proxy, path = traced(mitm, fake, tmp_path)
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    fake.drop_after_events = 4
    client.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
                 "input": [user("long")]})
    events, code, _ = client.until_closed()
    recs = records(path, until="session.end")
    (lost,) = of(recs, "upstream.lost")
    assert lost["turn"] == 2 and lost["how"] == "upstream connection dropped"
    (fail,) = of(recs, "fail_close")
    assert fail["error"]["error"]["code"] == "upstream_stream_interrupted" and fail["close_code"] == code == 1011
    assert fail["error"] == events[-1]
    assert not of(recs, "recovery")  # part of the turn reached the client: never silently resent
    end = of(recs, "turn.end")[-1]
    assert end["turn"] == 2 and end["status"] == "aborted"


def test_rotation_trace(fake, mitm, tmp_path):
    proxy, path = traced(mitm, fake, tmp_path, upstream={"rotation_age": 1})
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    time.sleep(1.2)
    completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"], "input": [user("b")]}))
    client.close()
    recs = records(path, until="session.end")
    (lost,) = of(recs, "upstream.lost")
    assert lost["how"] == "connection rotated before its age limit" and lost["turn"] == 2
    (rec,) = of(recs, "recovery")
    assert rec["trigger"] == "connection rotated before its age limit" and rec["removed_previous_response_id"] == r1["id"]
    assert [h["purpose"] for h in of(recs, "handshake")] == ["open", "recovery"]


def test_client_leaving_mid_turn_trace(fake, mitm, tmp_path):
    proxy, path = traced(mitm, fake, tmp_path)
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    fake.response_delay = 1.0
    client.send({"type": "response.create", "model": "m", "store": False, "input": [user("long job")]})
    assert fake.wait_for(lambda: sum(m.get("type") == "response.create" for _, m in fake.received) == 2)
    client.close()
    recs = records(path, until="session.end")
    end = of(recs, "turn.end")[-1]
    assert end["turn"] == 2 and end["status"] == "aborted" and end["reason"] == "client left mid-turn"
    assert of(recs, "session.end")[0]["turns_completed"] == 1
