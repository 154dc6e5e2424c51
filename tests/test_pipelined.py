"""A second response.create sent while one is in flight on its lane: it waits for the first (the upstream runs one
response at a time per lane), nothing is dropped or sent twice, and the chain state stays right."""

from __future__ import annotations

from typing import Any

from conftest import TERMINAL, Client, completed, user


def read_turns(client: Client, count: int) -> list[list[dict[str, Any]]]:
    turns: list[list[dict[str, Any]]] = [[]]
    while True:
        event = client.recv()
        turns[-1].append(event)
        if event["type"] in TERMINAL:
            if len(turns) == count:
                return turns
            turns.append([])


def creates(fake: Any) -> list[tuple[int, dict[str, Any]]]:
    return [(c, m) for c, m in list(fake.received) if m.get("type") == "response.create"]


def test_two_pipelined_creates_complete_in_order_and_the_state_follows(fake, mitm):
    proxy = mitm(fake)
    fake.response_delay = 0.3  # the first is surely in flight when the second arrives
    client = Client(proxy.url + "/v1/responses")
    a = {"type": "response.create", "model": "m", "store": False, "input": [user("first")]}
    b = {"type": "response.create", "model": "m", "store": False, "input": [user("second")]}
    client.send(a)
    client.send(b)
    # A later message that is not a create goes upstream at once (a steer must reach the response in flight): only
    # creates wait for their lane.
    client.send({"type": "response.processed"})
    first, second = read_turns(client, 2)
    ra, rb = completed(first), completed(second)
    assert ra["output"][0]["content"][0]["text"] == "reply to: first"
    assert rb["output"][0]["content"][0]["text"] == "reply to: second"
    # Every event of A came before every event of B, each tagged with its own response id.
    assert {e["response"]["id"] for e in first if "response" in e} == {ra["id"]}
    assert {e["response"]["id"] for e in second if "response" in e} == {rb["id"]}
    assert [m for _, m in fake.received] == [a, {"type": "response.processed"}, b]
    fake.response_delay = 0
    # The chain state attributed B's output to B: a continuation of B survives an upstream close.
    fake.close_all()
    proxy.wait_log(r"lost while idle")
    rc = completed(client.turn({"model": "m", "store": False, "previous_response_id": rb["id"],
                                "input": [user("third")]}))
    assert rc["output"][0]["content"][0]["text"] == "reply to: third"
    replay = creates(fake)[-1][1]
    assert replay["input"] == [user("second"), rb["output"][0], user("third")]
    client.close()


def test_pipelined_create_waits_for_a_recovered_turn(fake, mitm):
    proxy = mitm(fake, upstream={"first_event_timeout": 0.8})
    client = Client(proxy.url + "/v1/responses")
    fake.silent_next_requests = 1  # the first turn is swallowed by a silent connection
    a = {"type": "response.create", "model": "m", "store": False, "input": [user("first")]}
    b = {"type": "response.create", "model": "m", "store": False, "input": [user("second")]}
    client.send(a)
    client.send(b)
    first, second = read_turns(client, 2)
    assert completed(first)["output"][0]["content"][0]["text"] == "reply to: first"
    assert completed(second)["output"][0]["content"][0]["text"] == "reply to: second"
    # Connection 1 went silent on A and never saw B; connection 2 got A (resent) and then B.
    assert [(c, m["input"][0]["content"]) for c, m in creates(fake)] == [(1, "first"), (2, "first"), (2, "second")]
    proxy.wait_log(r"turn 1: no event within first event timeout.*-> resend")
    client.close()


def test_pipelined_create_after_a_fail_close_is_not_sent(fake, mitm):
    proxy = mitm(fake, upstream={"first_event_timeout": 0.5})
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hi")]}))
    fake.drop_after_events = 3  # turn 2 breaks after part of it reached the client: fail closed
    client.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
                 "input": [user("two")]})
    client.send({"type": "response.create", "model": "m", "store": False, "input": [user("three")]})
    events, code, _ = client.until_closed()
    assert code == 1011 and events[-1]["error"]["code"] == "upstream_stream_interrupted"
    assert "three" not in str(creates(fake))  # the client was told the session ended; nothing half-sent
