"""The turn protocol through a real mitmdump, against the fake upstream that runs the model of the upstream: lanes,
steering, incomplete responses, errors that answer another message, a refused recovery, a client that leaves during
a recovery, and fault rules that hit the same turns in every session. Each fixed defect has its in-process test in
tests/test_protocol.py; these show the wiring does what the core says."""

from __future__ import annotations

import json
import re
import time
from typing import Any, Callable

from conftest import BASE_RULES, Client, completed, user

AUTH = {"Authorization": "Bearer sk-SECRET-protocol"}


def read_until(client: Client, done: Callable[[dict[str, Any]], bool], timeout: float = 10) -> list[dict[str, Any]]:
    events = []
    deadline = time.monotonic() + timeout
    while True:
        event = client.recv(max(0.01, deadline - time.monotonic()))
        events.append(event)
        if done(event):
            return events


def ended(lane: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("stream_id") == lane and e["type"] in ("response.completed", "response.incomplete",
                                                                    "response.failed")


def creates(fake, conn: int | None = None) -> list[dict[str, Any]]:
    return [m for c, m in list(fake.received) if m.get("type") == "response.create" and (conn is None or c == conn)]


def create(lane: str | None = None, **body: Any) -> dict[str, Any]:
    message = {"type": "response.create", "model": "m", "store": False, **body}
    if lane is not None:
        message["stream_id"] = lane
    return message


def test_lanes_run_side_by_side_and_each_lane_is_replayed_on_its_own(fake, mitm):
    proxy = mitm(fake)
    fake.reply_deltas, fake.delta_interval = 20, 0.01  # responses long enough to overlap
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    client.send(create("a", input=[user("talk on a")]))
    client.send(create("b", input=[user("talk on b")]))
    events = read_until(client, ended("a"))
    events += read_until(client, ended("b")) if not any(ended("b")(e) for e in events) else []
    kinds = [(e["type"], e.get("stream_id")) for e in events]
    # b streamed while a did (through plain mitmdump they overlap too; replayguard no longer serialises them)
    assert kinds.index(("response.created", "b")) < kinds.index(("response.completed", "a"))
    rb = next(e["response"] for e in events if ended("b")(e))
    ra0 = next(e["response"] for e in events if ended("a")(e))
    fake.delta_interval = 0
    client.send(create("a", previous_response_id=ra0["id"], input=[user("please TOOL on a")]))
    ra = read_until(client, ended("a"))[-1]["response"]
    fake.drop_all()
    proxy.wait_log(r"lost while idle")
    call = next(i for i in ra["output"] if i["type"] == "function_call")
    output = [{"type": "function_call_output", "call_id": call["call_id"], "output": "done"}]
    client.send(create("a", previous_response_id=ra["id"], input=output))
    client.send(create("c", previous_response_id=ra["id"], input=output))  # a fork of a's response on a new lane
    client.send(create("b", previous_response_id=rb["id"], input=[user("more b")]))
    done = []
    while len(done) < 3:
        done += [e for e in read_until(client, lambda e: e["type"] in ("response.completed", "error"))
                 if e["type"] in ("response.completed", "error")]
    assert {e["type"] for e in done} == {"response.completed"} and {e["stream_id"] for e in done} == {"a", "b", "c"}
    replays = {c["stream_id"]: c for c in creates(fake, 2)}
    assert set(replays) == {"a", "b", "c"} and all("previous_response_id" not in c for c in replays.values())
    assert "talk on b" not in json.dumps(replays["a"]) and "TOOL on a" not in json.dumps(replays["b"])
    assert "TOOL on a" in json.dumps(replays["c"])
    client.close()


def test_a_loss_after_steering_replays_what_the_upstream_had(fake, mitm):
    proxy = mitm(fake)
    fake.delta_interval = 0.02
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    client.send(create(input=[user("LONG essay please")]))
    created = read_until(client, lambda e: e["type"] == "response.created")[-1]
    client.send({"type": "response.steer", "previous_response_id": created["response"]["id"],
                 "input": "make it shorter"})
    events = read_until(client, lambda e: e["type"] == "response.completed", timeout=20)
    kinds = [e["type"] for e in events]
    assert "response.steer.accepted" in kinds and "response.incomplete" in kinds and kinds.count("response.created") == 1
    successor = events[-1]["response"]
    fake.delta_interval = 0
    fake.drop_all()
    proxy.wait_log(r"lost while idle")
    r3 = completed(client.turn({"model": "m", "store": False, "previous_response_id": successor["id"],
                                "input": [user("thanks")]}))
    assert r3["status"] == "completed"
    replay = creates(fake, 2)[-1]
    assert "previous_response_id" not in replay and "make it shorter" in json.dumps(replay["input"])
    client.close()


def test_an_incomplete_response_stays_in_the_chain(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    events = client.turn({"model": "m", "store": False, "input": [user("LONG please")], "max_output_tokens": 20})
    assert events[-1]["type"] == "response.incomplete"
    r1 = events[-1]["response"]
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [user("go on")]}))
    fake.drop_all()
    proxy.wait_log(r"lost while idle")
    completed(client.turn({"model": "m", "store": False, "previous_response_id": r2["id"], "input": [user("more")]}))
    assert "first part of a long answer" in json.dumps(creates(fake, 2)[-1]["input"])
    client.close()


def test_an_error_answering_another_message_leaves_the_turn_in_flight(fake, mitm):
    proxy = mitm(fake)
    fake.reply_deltas, fake.delta_interval = 30, 0.02
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    client.send(create(input=[user("first")]))
    read_until(client, lambda e: e["type"] == "response.created")
    client.send(create(input=[user("second")]))  # held: the lane is busy
    client.send({"type": "response.bogus"})  # the upstream rejects it at once, while the first response streams
    events = read_until(client, lambda e: e["type"] == "response.completed", timeout=20)
    assert any(e["type"] == "error" and e["error"]["code"] == "unknown_event_type" for e in events)
    second = read_until(client, lambda e: e["type"] in ("response.completed", "error"), timeout=20)
    assert second[-1]["type"] == "response.completed"  # released at the real end: no active-response error
    assert not any("already_has_active_response" in json.dumps(e) for e in events + second)
    # And when the upstream dies while such a turn streams, the client is told: never a silent wait.
    client.send(create(previous_response_id=second[-1]["response"]["id"], input=[user("third")]))
    read_until(client, lambda e: e["type"] == "response.output_text.delta")
    client.send({"type": "response.bogus"})
    read_until(client, lambda e: e["type"] == "error")
    fake.drop_all()
    tail, code, _ = client.until_closed(timeout=10)
    assert code == 1011 and tail[-1]["error"]["code"] == "upstream_stream_interrupted"


def test_a_refused_recovery_passes_on_the_upstreams_answer(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hi")]}))
    fake.drop_all()
    proxy.wait_log(r"lost while idle")
    fake.refuse_next(1, 429)
    client.send(create(previous_response_id=r1["id"], input=[user("again")]))
    events, code, _ = client.until_closed()
    error = events[-1]
    assert error["status"] == 429 and error["error"]["code"] == "rate_limit_exceeded"
    assert error["error"]["type"] == "requests" and "Rate limit reached" in error["error"]["message"]
    assert error["error"]["headers"]["retry-after"] == "7"
    assert code == 1013


def test_a_client_that_left_during_a_recovery_costs_no_request(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses", headers=AUTH)
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("a long conversation")]}))
    fake.drop_all()
    proxy.wait_log(r"lost while idle")
    fake.handshake_delay = 1.0  # the recovery handshake takes a while
    client.send(create(previous_response_id=r1["id"], input=[user("again")]))
    assert fake.wait_for(lambda: fake.handshakes_begun == 2)  # the recovery's handshake is under way
    client.close()
    proxy.wait_log(r"client left mid-turn")
    assert fake.wait_for(lambda: len(fake.handshakes) == 2, timeout=10)  # it completed after the client left ...
    assert fake.wait_for(lambda: fake.open_connections() == 0)  # ... and the fresh connection was closed unused
    assert len(creates(fake)) == 1  # the replay (the whole conversation, paid input) was never sent


def test_probability_faults_hit_the_same_turns_in_every_session(fake, mitm):
    rules = json.loads(json.dumps(BASE_RULES))
    rules["faults"] = [{"kind": "close", "probability": 0.4, "seed": 11}]
    proxy = mitm(fake, rules=rules)
    clients = [Client(proxy.url + "/v1/responses", headers=AUTH) for _ in range(2)]
    previous: list[str | None] = [None, None]
    for n in range(8):  # the two sessions' turns interleave
        for i, client in enumerate(clients):
            body: dict[str, Any] = {"model": "m", "store": False, "input": [user(f"turn {n}")]}
            if previous[i]:
                body["previous_response_id"] = previous[i]
            previous[i] = completed(client.turn(body))["id"]
            time.sleep(0.05)
    fired: dict[str, list[str]] = {}
    for flow, turn in re.findall(r"flow (\S+): injected fault after turn (\d+)", proxy.log):
        fired.setdefault(flow, []).append(turn)
    assert len(fired) == 2 and list(fired.values())[0] == list(fired.values())[1] and list(fired.values())[0]
