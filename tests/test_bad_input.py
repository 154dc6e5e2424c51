"""Bad input from the client, end to end: each gets a clear outcome, nothing is dropped silently, and the proxy
keeps serving the session and other flows."""

from __future__ import annotations

import json

from conftest import Client, completed, user


def upstream_errors(fake) -> list[str]:
    return [e["error"]["message"] for _, e in list(fake.sent) if e["type"] == "error"]


def test_non_json_binary_and_unknown_types_reach_the_upstream_and_its_errors_come_back(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")
    bystander = Client(proxy.url + "/v1/responses")
    client.send("this is not json")
    assert client.recv()["error"]["message"] == "Invalid JSON."
    client.ws.send(b"\x00\x01binary")
    assert client.recv()["error"]["message"] == "Binary frames are not supported."
    client.send({"no_type": True})
    assert client.recv()["error"]["code"] == "unknown_event_type"
    client.send({"type": "response.bogus"})
    assert "response.bogus" in client.recv()["error"]["message"]
    # Everything the client sent reached the upstream, in order, unchanged.
    got = [m for c, m in fake.received if c == 1]
    assert got == [{"_raw": "this is not json"}, {"_binary": 8}, {"no_type": True}, {"type": "response.bogus"}]
    # The session and the other flow still work.
    assert completed(client.turn({"model": "m", "store": False, "input": [user("still ok")]}))["status"] == "completed"
    assert completed(bystander.turn({"model": "m", "store": False, "input": "hi"}))["status"] == "completed"


def test_previous_response_id_of_the_wrong_form_gets_the_upstreams_answer(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")
    events = client.turn({"model": "m", "store": False, "previous_response_id": "msg_123", "input": [user("x")]})
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "previous_response_not_found"
    assert "msg_123" in events[-1]["error"]["message"]
    assert not events[-1]["error"]["message"].startswith("replayguard")  # the upstream's own error, unchanged
    assert completed(client.turn({"model": "m", "store": False, "input": [user("fresh")]}))["status"] == "completed"


def test_response_create_with_unreadable_input_is_passed_through(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")
    events = client.turn({"model": "m", "store": False, "input": 42})
    assert events[-1]["type"] == "error" and events[-1]["error"]["param"] == "input"
    assert creates_input(fake) == [42]
    assert completed(client.turn({"model": "m", "store": False, "input": [user("ok")]}))["status"] == "completed"


def creates_input(fake) -> list:
    return [m.get("input") for _, m in fake.received if m.get("type") == "response.create"][:1]


def test_message_over_the_cap_closes_with_1009_and_other_flows_live_on(fake, mitm):
    proxy = mitm(fake, upstream={"max_message_size": 2**20})
    client = Client(proxy.url + "/v1/responses")
    bystander = Client(proxy.url + "/v1/responses")
    client.send({"type": "response.create", "model": "m", "store": False, "input": "x" * (2 * 2**20)})
    _, code, reason = client.until_closed()
    assert code == 1009, reason  # "message too big", the WebSocket code for exactly this
    assert not any(m.get("type") == "response.create" for c, m in fake.received if c == 1)
    assert completed(bystander.turn({"model": "m", "store": False, "input": "hi"}))["status"] == "completed"
    assert json.dumps(bystander.received).count("response.completed") == 1


def test_garbage_from_the_upstream_is_passed_through_and_the_session_goes_on(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    fake.send_raw_all('{"type": "response.output_text.delta", "delta": "trunc')  # truncated JSON
    fake.send_raw_all("not json at all")
    fake.send_raw_all(b"\xff\xfe\x00")
    fake.send_raw_all("[1, 2, 3]")
    assert client.ws.recv(timeout=5) == '{"type": "response.output_text.delta", "delta": "trunc'
    assert client.ws.recv(timeout=5) == "not json at all"
    assert client.ws.recv(timeout=5) == b"\xff\xfe\x00"
    assert client.ws.recv(timeout=5) == "[1, 2, 3]"
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"], "input": [user("b")]}))
    assert r2["output"][0]["content"][0]["text"] == "reply to: b"
    assert "Traceback" not in proxy.log
