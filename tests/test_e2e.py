"""End to end: a real mitmdump running addon.py, real WebSocket clients, and the faithful fake upstream.

Each test asserts what the client received and what the upstream actually received.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from conftest import Client, completed, user
from test_trace import of, records
from replayguard.tools.harness import Mitmdump
from replayguard.tools.fake_upstream import FakeUpstream  # noqa: E402

AUTH = {"Authorization": "Bearer sk-test-SECRET", "OpenAI-Beta": "responses_websockets=2026-02-06", "session_id": "s-1"}


def creates(fake: Any, conn: int | None = None) -> list[dict[str, Any]]:
    """response.create messages the upstream received (on one connection, or all)."""
    return [m for c, m in list(fake.received) if m.get("type") == "response.create" and (conn is None or c == conn)]


def no_tool_call_errors(fake: Any) -> bool:
    return not any("No tool call found" in json.dumps(e) for _, e in list(fake.sent) if e.get("type") == "error")


def tool_turns(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """Turn 1 asks for a tool call; returns (response 1, its function_call item)."""
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("please run TOOL ls")]}))
    call = next(i for i in r1["output"] if i["type"] == "function_call")
    return r1, call


def output_for(call: dict[str, Any], text: str = "file.txt") -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call["call_id"], "output": text}


def lose_idle_upstream(fake: Any, proxy: Any) -> None:
    """The upstream closes an idle connection (1011, as upstreams do) and the proxy notices."""
    fake.close_all(1011, "keepalive ping timeout")
    proxy.wait_log(r"lost while idle")


# -- healthy path ---------------------------------------------------------------------------------
def test_healthy_chain_passes_through_unchanged(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    assert client.ws.response.headers["x-codex-turn-state"] == "ts-1"  # upstream's handshake header reached the client
    sent = [
        {"type": "response.create", "model": "m", "store": False, "input": [user("hello")]},
    ]
    r1 = completed(client.turn(sent[0]))
    sent.append({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
                 "input": [user("again")]})
    r2 = completed(client.turn(sent[1]))
    sent.append({"type": "response.create", "model": "m", "store": False, "previous_response_id": r2["id"],
                 "input": [user("third")]})
    r3 = completed(client.turn(sent[2]))
    assert r3["output"][0]["content"][0]["text"] == "reply to: third"
    # The upstream saw exactly what the client sent, on one connection.
    assert [m for _, m in fake.received] == sent
    assert {c for c, _ in fake.received} == {1}
    assert len(fake.handshakes) == 1
    headers = fake.handshakes[0]["headers"]
    assert headers["authorization"] == "Bearer sk-test-SECRET"
    assert headers["openai-beta"] == "responses_websockets=2026-02-06"
    assert headers["session_id"] == "s-1"
    assert "x-replayguard-session" not in headers
    # Every upstream event reached the client, in order, unchanged.
    assert client.received == [e for _, e in fake.sent]
    client.close()


# -- upstream dies between turns ------------------------------------------------------------------
def test_idle_close_then_text_continuation_is_replayed(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    lose_idle_upstream(fake, proxy)
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [user("again")]}))
    assert r2["output"][0]["content"][0]["text"] == "reply to: again"
    replay = creates(fake, 2)
    assert len(replay) == 1 and "previous_response_id" not in replay[0]
    assert replay[0]["input"] == [user("hello"), r1["output"][0], user("again")]
    # Sticky routing: the reconnect carried the turn state the upstream returned.
    assert fake.handshakes[1]["headers"]["x-codex-turn-state"] == "ts-1"
    assert fake.handshakes[1]["headers"]["authorization"] == "Bearer sk-test-SECRET"
    assert not any(e["type"] == "error" for e in client.received)
    client.close()


def test_idle_close_after_tool_call_replays_function_call_output(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1, call = tool_turns(client)
    lose_idle_upstream(fake, proxy)
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [output_for(call)]}))
    assert r2["output"][0]["content"][0]["text"] == "tool said: file.txt"
    replay = creates(fake, 2)[0]
    kinds = [(i["type"], i.get("call_id")) for i in replay["input"]]
    assert kinds == [("message", None), ("function_call", call["call_id"]), ("function_call_output", call["call_id"])]
    assert no_tool_call_errors(fake)
    assert "turn 2" in proxy.wait_log(r"flow \S+ turn 2: upstream closed.*-> replay").group(0)
    client.close()


def test_tcp_drop_then_continuation(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")
    r1, call = tool_turns(client)
    fake.drop_all()
    proxy.wait_log(r"lost while idle \(upstream connection dropped")
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [output_for(call, "ok")]}))
    assert r2["output"][0]["content"][0]["text"] == "tool said: ok"
    assert "previous_response_id" not in creates(fake, 2)[0]
    assert no_tool_call_errors(fake)


def test_silent_upstream_detected_by_ping_within_timeout(fake, mitm):
    proxy = mitm(fake, upstream={"ping_idle": 0, "ping_timeout": 1})
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    fake.blackhole_all()
    started = time.monotonic()
    client.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
                 "input": [user("still there?")]})
    first = client.recv(timeout=10)
    elapsed = time.monotonic() - started
    assert first["type"] == "response.created"
    print(f"silent upstream: first event of the recovered turn after {elapsed:.2f}s (ping timeout 1s)")
    # The ping found it (the log below), not the first-event timeout: no wall-clock cap, which a busy machine breaks.
    while client.recv()["type"] != "response.completed":
        pass
    assert creates(fake, 1)[-1]["input"] == [user("hello")]  # the silent connection never got turn 2
    assert creates(fake, 2)[0]["input"][-1] == user("still there?")
    proxy.wait_log(r"turn 2: no pong within ping timeout")


def test_upstream_silent_after_turn_sent_caught_by_first_event_timeout(fake, mitm):
    proxy = mitm(fake, upstream={"first_event_timeout": 1.5})
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    fake.silent_next_requests = 1
    started = time.monotonic()
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [user("again")]}, timeout=15))
    elapsed = time.monotonic() - started
    print(f"first event timeout: turn completed after {elapsed:.2f}s (first_event_timeout 1.5s)")
    assert elapsed >= 1.5  # not before the timeout (how much after depends on the machine's load)
    proxy.wait_log(r"turn 2: no event within first event timeout")
    assert r2["output"][0]["content"][0]["text"] == "reply to: again"
    # The silent connection got the original continuation; the fresh one the replay.
    assert creates(fake, 1)[-1]["previous_response_id"] == r1["id"]
    assert "previous_response_id" not in creates(fake, 2)[0]
    proxy.wait_log(r"turn 2: no event within first event timeout")


def test_refused_reconnect_fails_closed_with_error_event(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    lose_idle_upstream(fake, proxy)
    fake.refuse_next(5, 503)
    started = time.monotonic()
    client.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
                 "input": [user("again")]})
    events, code, reason = client.until_closed(timeout=10)
    print(f"refused reconnect: error event and close after {time.monotonic() - started:.2f}s")
    assert len(events) == 1
    err = events[0]
    # The upstream's own status and message (its body names no code: replayguard's stands in), and the close code
    # that says "try again later".
    assert err["type"] == "error" and err["status"] == 503
    assert err["error"]["type"] == "server_error" and err["error"]["code"] == "upstream_unavailable"
    assert "HTTP 503" in err["error"]["message"] and "The server is overloaded" in err["error"]["message"]
    assert code == 1013 and "503" in reason
    assert len(creates(fake)) == 1  # nothing unsafe was written upstream
    proxy.wait_log(r"turn 2: .*failed closed")


def test_first_handshake_refused_is_http_error_with_json_body(fake, mitm):
    proxy = mitm(fake)
    fake.refuse_next(1, 401, b'{"error": {"message": "bad key", "type": "invalid_request_error", "code": "invalid_api_key"}}')
    with pytest.raises(InvalidStatus) as info:
        Client(proxy.url + "/v1/responses")
    response = info.value.response
    assert response.status_code == 401
    assert json.loads(response.body)["error"]["code"] == "invalid_api_key"


def test_unreachable_upstream_is_502_with_json_body(fake, mitm):
    # connection_strategy=lazy: otherwise mitmproxy itself drops the client before any hook runs.
    proxy = mitm(fake, args=["--set", "connection_strategy=lazy"])
    fake.stop()
    with pytest.raises(InvalidStatus) as info:
        Client(proxy.url + "/v1/responses")
    response = info.value.response
    assert response.status_code == 502
    body = json.loads(response.body)
    assert body["error"]["code"] == "upstream_handshake_failed"


def test_previous_response_not_found_is_recovered_before_client_sees_it(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")
    r1, call = tool_turns(client)
    fake.forget_responses()  # the upstream loses its connection cache (e.g. routed to another host)
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [output_for(call)]}))
    assert r2["output"][0]["content"][0]["text"] == "tool said: file.txt"
    assert not any(e["type"] == "error" for e in client.received)  # swallowed and recovered
    upstream_errors = [e for _, e in fake.sent if e["type"] == "error"]
    assert [e["error"]["code"] for e in upstream_errors] == ["previous_response_not_found"]
    assert "previous_response_id" not in creates(fake, 2)[0]
    proxy.wait_log(r"turn 2: upstream answered previous_response_not_found -> replay")


def test_client_reconnecting_with_old_id_is_resumed_from_chain_state(fake, mitm):
    proxy = mitm(fake)
    first = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1, call = tool_turns(first)
    first.close()
    assert fake.wait_for(lambda: fake.open_connections() == 0)
    second = Client(proxy.url + "/v1/responses", headers=AUTH)  # the same client (its key) on a new connection
    r2 = completed(second.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [output_for(call)]}))
    assert r2["output"][0]["content"][0]["text"] == "tool said: file.txt"
    resumed = creates(fake, 2)[0]
    assert "previous_response_id" not in resumed
    assert [i["type"] for i in resumed["input"]] == ["message", "function_call", "function_call_output"]
    assert no_tool_call_errors(fake)
    proxy.wait_log(r"is not on this upstream connection -> replayed full input \(3 items\)")


def test_orphaned_output_fails_closed_naming_call_id(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    lose_idle_upstream(fake, proxy)
    client.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
                 "input": [{"type": "function_call_output", "call_id": "call_ghost", "output": "x"}]})
    events, code, _ = client.until_closed()
    assert [e["type"] for e in events] == ["error"]
    err = events[0]
    assert err["status"] == 400 and err["error"]["code"] == "previous_response_not_found"
    assert "call_ghost" in err["error"]["message"]
    assert code == 1011
    assert len(fake.handshakes) == 1 and len(creates(fake)) == 1  # never wrote the unsafe replay


def test_strict_policy_reproduces_peer_fail_close(fake, mitm):
    proxy = mitm(fake, recovery={"policy": "strict"})
    client = Client(proxy.url + "/v1/responses")
    r1, call = tool_turns(client)
    lose_idle_upstream(fake, proxy)
    client.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
                 "input": [output_for(call)]})
    events, code, reason = client.until_closed()
    assert events == []  # like the peer gateway: no JSON error before the close
    assert code == 1008
    assert reason == "upstream continuation connection is unavailable; please restart the conversation"
    assert len(fake.handshakes) == 1 and len(creates(fake)) == 1  # no new dial, no upstream write


def test_strict_policy_still_replays_text_only_chains(fake, mitm):
    proxy = mitm(fake, recovery={"policy": "strict"})
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    lose_idle_upstream(fake, proxy)
    completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"], "input": [user("b")]}))


def test_connection_limit_while_idle_reconnects_next_turn(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")
    r1, call = tool_turns(client)
    fake.send_connection_limit_all()
    proxy.wait_log(r"upstream connection limit reached while idle")
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [output_for(call)]}))
    assert r2["status"] == "completed"
    assert not any(e["type"] == "error" for e in client.received)
    assert "previous_response_id" not in creates(fake, 2)[0]


def test_idle_connection_older_than_rotation_age_is_replaced(fake, mitm):
    proxy = mitm(fake, upstream={"rotation_age": 1})
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    time.sleep(1.2)
    completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"], "input": [user("b")]}))
    assert len(fake.handshakes) == 2
    assert "previous_response_id" not in creates(fake, 2)[0]
    assert fake.wait_for(lambda: fake.open_connections() == 1)  # the old one was closed


def test_store_true_continuation_keeps_previous_response_id_after_reconnect(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": True, "input": [user("hello")]}))
    lose_idle_upstream(fake, proxy)
    completed(client.turn({"model": "m", "store": True, "previous_response_id": r1["id"], "input": [user("b")]}))
    assert creates(fake, 2)[0]["previous_response_id"] == r1["id"]  # stored server-side: no rewrite needed


def test_regular_proxy_mode_with_connect(fake, mitm):
    proxy = mitm(mode="regular")
    client = Client(f"ws://127.0.0.1:{fake.port}/v1/responses", proxy=f"http://127.0.0.1:{proxy.port}")
    r1, call = tool_turns(client)
    lose_idle_upstream(fake, proxy)
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [output_for(call)]}))
    assert r2["output"][0]["content"][0]["text"] == "tool said: file.txt"
    assert len(fake.handshakes) == 2
    assert no_tool_call_errors(fake)


def test_unmatched_websocket_passes_through_untouched(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/realtime")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    fake.close_all(1011)
    # Not a Responses session: mitmproxy's own relay closes the client with the upstream.
    _, code, _ = client.until_closed(timeout=5)
    assert code is not None
    assert r1["id"].startswith("resp_")
    after_start = proxy.log.split("rules from")[-1].replace("replayguard_rules", "")
    assert "replayguard" not in "\n".join(l for l in after_start.splitlines() if "writing chain trace" not in l)


def test_bad_rules_file_stops_startup(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("match:\n  - path: '*/responses'\nupstream:\n  ping_idle: soon\n")
    proc = Mitmdump(tmp_path, ["--set", f"replayguard_rules={rules}"], None)
    result = subprocess.run(proc.command(), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1
    assert f"{rules}:4: upstream.ping_idle: expected a number >= 0, got 'soon'" in result.stdout + result.stderr


def test_twenty_sessions_five_turns_through_flaky_upstream_lose_no_turn(fake, mitm):
    proxy = mitm(fake)
    fake.close_after_responses = 2
    failures: list[str] = []
    done: list[int] = []

    def session(n: int) -> None:
        try:
            client = Client(proxy.url + "/v1/responses")
            prev = None
            for t in range(5):
                request: dict[str, Any] = {"model": "m", "store": False, "input": [user(f"s{n} t{t}")]}
                if t == 2:
                    request["input"] = [user(f"s{n} TOOL")]
                if prev is not None:
                    request["previous_response_id"] = prev["id"]
                    if prev["output"][-1]["type"] == "function_call":
                        request["input"] = [output_for(prev["output"][-1], f"out{n}")]
                prev = completed(client.turn(request, timeout=20))
                done.append(n)
            client.close()
        except Exception as e:  # collected and asserted below
            failures.append(f"session {n}: {e!r}")

    threads = [threading.Thread(target=session, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    assert len(done) == 100
    assert no_tool_call_errors(fake)
    assert len(fake.handshakes) > 20  # the upstream really did close under them


def test_upstream_dies_mid_response_fails_closed_with_retryable_error(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    fake.drop_after_events = 4  # created, in_progress, output_item.added, content_part.added, then cut
    client.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
                 "input": [user("a longer answer please")]})
    events, code, _ = client.until_closed()
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    err = events[-1]
    assert err["type"] == "error" and err["status"] == 502
    assert err["error"]["type"] == "server_error" and err["error"]["code"] == "upstream_stream_interrupted"
    assert code == 1011
    assert len(creates(fake)) == 2  # the partial turn was not silently resent (the client saw part of it)


def test_background_keepalive_finds_dead_idle_connection_before_next_turn(fake, mitm):
    proxy = mitm(fake, upstream={"keepalive_interval": 0.5, "ping_timeout": 0.5, "ping_idle": 60})
    client = Client(proxy.url + "/v1/responses")
    r1, call = tool_turns(client)
    fake.blackhole_all()
    proxy.wait_log(r"lost while idle \(no pong within ping timeout: keepalive", timeout=5)
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [output_for(call)]}))
    # No ping on the turn itself (the loss was already known): the replay's trigger is the keepalive's finding.
    recovery = of(records(proxy.tmp / "trace.jsonl", until="recovery"), "recovery")[-1]
    assert recovery["trigger"] == "no pong within ping timeout" and recovery["turn"] == 2
    assert proxy.log.count("no pong within ping timeout") == 2  # the keepalive's loss and the replay, nothing more
    assert r2["output"][0]["content"][0]["text"] == "tool said: file.txt"
    assert "previous_response_id" not in creates(fake, 2)[0]


def test_regular_mode_tls_upstream_honours_ssl_insecure(tmp_path, mitm):
    from tls import self_signed_context

    import ssl

    with FakeUpstream(ssl_context=self_signed_context(tmp_path)) as upstream:
        for insecure in (False, True):
            proxy = mitm(mode="regular", args=["--set", f"ssl_insecure={str(insecure).lower()}"])
            ca = ssl.create_default_context(cafile=str(proxy.tmp / "conf" / "mitmproxy-ca-cert.pem"))
            # The threaded test client reads in a thread of its own while it writes the first request; TLS 1.3's
            # session tickets, read then, race that write in OpenSSL (a rare hang). TLS 1.2 sends none after the
            # handshake; what this test checks is the upstream side.
            ca.maximum_version = ssl.TLSVersion.TLSv1_2
            url = f"wss://localhost:{upstream.port}/v1/responses"
            if not insecure:
                # Verification is on by default: the self-signed upstream is refused, as a JSON HTTP error.
                with pytest.raises(InvalidStatus) as info:
                    Client(url, proxy=f"http://127.0.0.1:{proxy.port}", ssl=ca)
                assert info.value.response.status_code == 502
                assert "CERTIFICATE_VERIFY_FAILED" in json.loads(info.value.response.body)["error"]["message"]
                continue
            client = Client(url, proxy=f"http://127.0.0.1:{proxy.port}", ssl=ca, headers=AUTH)
            r1, call = tool_turns(client)
            lose_idle_upstream(upstream, proxy)
            r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                        "input": [output_for(call)]}))
            assert r2["output"][0]["content"][0]["text"] == "tool said: file.txt"
            assert [h["headers"]["authorization"] for h in upstream.handshakes] == ["Bearer sk-test-SECRET"] * 2
            client.close()


def test_large_messages_pass_and_replay(fake, mitm):
    """A 17 MiB input (over websockets' 1 MiB default and the 16 MiB seen with inline images) survives a replay."""
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")
    big = "x" * (17 * 2**20)
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("image " + big)]}, timeout=60))
    lose_idle_upstream(fake, proxy)
    completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"], "input": [user("b")]},
                          timeout=60))
    replay = creates(fake, 2)[0]
    assert replay["input"][0]["content"] == "image " + big
    assert replay["input"][1] == r1["output"][0]


def test_client_leaving_mid_response_stops_the_upstream(fake, mitm):
    """Unlike a gateway that drains the upstream after the client left, the upstream connection is closed."""
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")
    completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    fake.response_delay = 1.5
    client.send({"type": "response.create", "model": "m", "store": False, "input": [user("long job")]})
    assert fake.wait_for(lambda: len(creates(fake)) == 2)
    client.ws.socket.shutdown(socket.SHUT_RDWR)  # the client vanishes (no closing handshake)
    assert fake.wait_for(lambda: fake.open_connections() == 0, timeout=1.0)
    time.sleep(1.0)
    assert sum(1 for _, e in fake.sent if e["type"] == "response.completed") == 1  # the second never finished
    proxy.wait_log(r"client left mid-turn; upstream response stopped")


@pytest.mark.parametrize("flag,lost", [
    ("--close-after-responses", r"lost while idle \(upstream closed"),
    ("--drop-after-responses", r"lost while idle \(upstream connection dropped"),
    ("--blackhole-after-responses", None),  # found by the preflight ping of the next turn
])
def test_fake_upstream_command_serves_a_chain_through_mitmdump(mitm, flag, lost):
    """`python -m replayguard fake-upstream` is the same fake, runnable offline by users, with its faults."""
    import re
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "replayguard", "fake-upstream", "--port", "0", flag, "1"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"ws://127\.0\.0\.1:(\d+)", line).group(1))
        proxy = mitm(args=["--mode", f"reverse:http://127.0.0.1:{port}"], mode="custom",
                     upstream={"ping_idle": 0, "ping_timeout": 0.5})
        client = Client(proxy.url + "/v1/responses")
        r1, call = tool_turns(client)
        if lost:
            proxy.wait_log(lost)
        r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                    "input": [output_for(call)]}))
        assert r2["output"][0]["content"][0]["text"] == "tool said: file.txt"
        proxy.wait_log(r"turn 2: .* -> replay")
        if lost is None:
            proxy.wait_log(r"turn 2: no pong within ping timeout")
        client.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
