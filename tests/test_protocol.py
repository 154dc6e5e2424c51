"""The turn protocol core against the model of the upstream, in process: each rule, and each defect it fixed."""

from __future__ import annotations

import json

from protocol_sim import FAST, Sim, user

from replayguard.core import events as ev
from replayguard.core import protocol as p
from replayguard.core.faults import FaultInjector, FaultKind, FaultRule
from replayguard.core.recovery import Trigger


def chain_turn(sim: Sim, text: str, previous: str | None = None, lane: str | None = None, **extra) -> dict:
    body = {"input": [user(text)], **extra}
    if previous:
        body["previous_response_id"] = previous
    if lane is not None:
        body["stream_id"] = lane
    sim.create(**body)
    sim.run_upstream()
    return sim.last_response(lane)


def tool_output(response: dict, text: str = "ok") -> list[dict]:
    calls = [i for i in response["output"] if i["type"] == "function_call"]
    return [{"type": "function_call_output", "call_id": c["call_id"], "output": text} for c in calls]


def test_a_plain_chain_goes_through_unchanged():
    sim = Sim().start()
    r1 = chain_turn(sim, "hi")
    r2 = chain_turn(sim, "again", r1["id"])
    creates = sim.creates_sent()
    assert [c["previous_response_id"] for _, c in creates[1:]] == [r1["id"]]
    assert r2["status"] == "completed" and len(sim.upstreams) == 1
    assert [type(r).__name__ for r in sim.records].count("TurnEnded") == 2


def test_tool_chain_survives_a_drop_and_the_replay_pairs_every_call():
    sim = Sim().start()
    r1 = chain_turn(sim, "please TOOL ls")
    sim.kill("drop")
    sim.create(previous_response_id=r1["id"], input=tool_output(r1))
    sim.run_upstream()
    r2 = sim.last_response()
    assert "tool said: ok" in json.dumps(r2["output"])
    conn, replay = sim.creates_sent()[-1]
    assert conn == 2 and "previous_response_id" not in replay
    assert [i["type"] for i in replay["input"]] == ["message", "function_call", "function_call_output"]
    recovered = sim.of(ev.Recovered)[-1]
    assert recovered.trigger is Trigger.DROPPED and recovered.sent and recovered.to_conn == 2


def test_an_incomplete_response_stays_in_the_chain():
    """Turn 1 ends incomplete (max_output_tokens); turn 2 continues it; the upstream drops; turn 3 is replayed with
    everything the upstream had, the incomplete response's output included."""
    sim = Sim().start()
    r1 = chain_turn(sim, "LONG story please", max_output_tokens=20)
    assert r1["status"] == "incomplete" and r1["incomplete_details"] == {"reason": "max_output_tokens"}
    r2 = chain_turn(sim, "go on", r1["id"])
    sim.kill("drop")
    r3 = chain_turn(sim, "and then?", r2["id"])
    assert r3["status"] == "completed" and sim.closed is None
    _, replay = sim.creates_sent()[-1]
    assert "first part of a long answer" in json.dumps(replay["input"]) and "go on" in json.dumps(replay["input"])
    assert sim.protocol.recoveries == 1


def test_a_failed_response_leaves_the_chain_replayable_from_its_parent():
    sim = Sim().start()
    r1 = chain_turn(sim, "hello")
    sim.create(previous_response_id=r1["id"], input=[user("FAIL now")])
    sim.run_upstream()
    assert sim.terminals()[-1]["type"] == "response.failed"
    sim.kill("drop")
    r2 = chain_turn(sim, "retry", r1["id"])  # the client retries from the last good response
    assert r2["status"] == "completed" and "previous_response_id" not in sim.creates_sent()[-1][1]


def test_an_error_answering_another_message_does_not_end_the_turn():
    """The client sends an event the upstream rejects while a response streams: the error is forwarded, the
    response goes on and ends with its own terminal event, which is recorded; a create held meanwhile is released
    only then."""
    sim = Sim().start()
    r1 = chain_turn(sim, "hi")
    sim.create(previous_response_id=r1["id"], input=[user("second")])
    sim.deliver()  # response.created: the turn is streaming
    sim.send({"type": "response.bogus"})
    sim.create(previous_response_id="resp_later", input=[user("third")])  # held: the lane is busy
    while sim.client[-1]["type"] != "error":
        sim.deliver()  # the upstream answers the bogus event in the order it read it
    assert sim.client[-1]["error"]["code"] == "unknown_event_type"
    assert sim.client[-2]["type"] == "response.in_progress"  # the response goes on around it
    assert len(sim.creates_sent()) == 2  # the held create was not released by that error
    assert sim.protocol.turns_in_flight()[0].number == 2
    sim.run_upstream()
    ended = sim.of(ev.TurnEnded)
    assert [e.turn.number for e in ended][:2] == [1, 2] and ended[1].event["type"] == "response.completed"
    assert len(sim.creates_sent()) == 3  # released at the real end


def test_an_upstream_death_after_such_an_error_reaches_the_client():
    """The worst case of the old protocol: the error made it think the turn was over, the loss looked idle, and the
    client waited forever. Now the turn is still in flight: the client gets an error event and a non-1000 close."""
    sim = Sim().start()
    sim.create(input=[user("hello")])
    sim.deliver()
    sim.deliver()
    sim.send({"type": "response.bogus"})
    sim.deliver()  # the error for the bogus event
    assert sim.client[-1]["error"]["code"] == "unknown_event_type"
    sim.kill("drop")
    assert sim.closed is not None and sim.closed[0] != 1000
    assert sim.client[-1]["type"] == "error" and sim.client[-1]["error"]["code"] == "upstream_stream_interrupted"


def test_a_refused_recovery_passes_on_the_upstreams_status_code_and_retry_after():
    sim = Sim().start()
    r1 = chain_turn(sim, "hi")
    sim.kill("drop")
    sim.model.refuse_next(1, 429)
    sim.create(previous_response_id=r1["id"], input=[user("again")])
    error = sim.client[-1]
    assert error["type"] == "error" and error["status"] == 429
    assert error["error"]["code"] == "rate_limit_exceeded" and error["error"]["type"] == "requests"
    assert "Rate limit reached" in error["error"]["message"] and error["error"]["headers"] == {"retry-after": "7"}
    assert sim.closed is not None and sim.closed[0] == 1013


def test_a_client_that_left_during_a_recovery_handshake_costs_no_request():
    sim = Sim(auto_open=False)
    sim.start()
    sim.feed_one(sim.complete_open)
    r1 = chain_turn(sim, "hi")
    sim.kill("drop")
    sim.create(previous_response_id=r1["id"], input=[user("again")])
    assert sim.opening  # the recovery handshake is in progress
    sent_before = len(sim.creates_sent())
    sim.leave()
    sim.feed_one(sim.complete_open)  # the handshake completes after the client left
    sim.settle()
    assert len(sim.creates_sent()) == sent_before and not sim.sent_after_gone
    assert not any(up.open for up in sim.upstreams.values())  # the fresh connection is closed unused


def test_lanes_run_side_by_side():
    sim = Sim().start()
    sim.create(stream_id="a", input=[user("hello a")])
    sim.create(stream_id="b", input=[user("hello b")])
    assert len(sim.creates_sent()) == 2  # b is not held behind a
    sim.run_upstream()
    kinds = [(e["type"], e["stream_id"]) for e in sim.client]
    assert kinds.index(("response.created", "b")) < kinds.index(("response.completed", "a"))
    assert kinds.index(("response.output_item.added", "b")) < kinds.index(("response.output_item.done", "a"))
    assert sim.last_response("a")["status"] == sim.last_response("b")["status"] == "completed"


def test_each_lanes_chain_is_replayed_on_its_own_forks_included():
    sim = Sim().start()
    ra = chain_turn(sim, "TOOL on a", lane="a")
    rb = chain_turn(sim, "talk on b", lane="b")
    sim.kill("close")
    # a continues with its tool output; c forks a's response on a new lane; b continues its own
    sim.create(stream_id="a", previous_response_id=ra["id"], input=tool_output(ra, "a-out"))
    sim.create(stream_id="c", previous_response_id=ra["id"], input=tool_output(ra, "c-out"))
    sim.create(stream_id="b", previous_response_id=rb["id"], input=[user("more b")])
    sim.run_upstream()
    for lane in "abc":
        assert sim.last_response(lane)["status"] == "completed", lane
    replays = {c["stream_id"]: c for _, c in sim.creates_sent()[2:]}
    assert all("previous_response_id" not in c for c in replays.values())
    assert "talk on b" not in json.dumps(replays["a"]) and "TOOL on a" not in json.dumps(replays["b"])
    assert "TOOL on a" in json.dumps(replays["c"]) and "c-out" in json.dumps(replays["c"])


def test_two_lanes_in_flight_when_the_upstream_dies_are_both_recovered():
    sim = Sim().start()
    sim.create(stream_id="a", input=[user("hello a")])
    sim.create(stream_id="b", input=[user("hello b")])
    sim.kill("drop")
    sim.run_upstream()
    assert sim.last_response("a")["status"] == sim.last_response("b")["status"] == "completed"
    assert sorted(r.turn.lane for r in sim.of(ev.Recovered)) == ["a", "b"]


def test_steered_input_and_the_automatic_successor_are_part_of_the_chain():
    sim = Sim().start()
    sim.create(input=[user("LONG essay")])
    created = sim.deliver()
    sim.send({"type": "response.steer", "previous_response_id": created["response"]["id"],
              "input": "shorter please"})
    sim.run_upstream()
    kinds = [e["type"] for e in sim.client]
    assert "response.steer.accepted" in kinds and kinds.count("response.created") == 2
    steered = [e for e in sim.client if e["type"] == "response.incomplete"][0]["response"]
    successor = sim.last_response()
    assert steered["incomplete_details"]["reason"] == "steered" and successor["previous_response_id"] == steered["id"]
    assert [t.turn.automatic for t in sim.of(ev.TurnStarted)] == [False, True]
    sim.kill("drop")
    r3 = chain_turn(sim, "thanks", successor["id"])
    assert r3["status"] == "completed"
    _, replay = sim.creates_sent()[-1]
    assert "shorter please" in json.dumps(replay["input"])  # what the upstream had, the steered input included


def test_a_successor_expected_when_the_upstream_dies_is_replayed():
    sim = Sim().start()
    sim.create(input=[user("LONG essay")])
    created = sim.deliver()
    sim.send({"type": "response.steer", "previous_response_id": created["response"]["id"], "input": "shorter"})
    while not any(e["type"] == "response.incomplete" for e in sim.client):
        sim.deliver()
    sim.kill("drop")  # the successor had not started
    sim.run_upstream()
    successor = sim.last_response()
    assert successor["status"] == "completed" and sim.closed is None
    _, replay = sim.creates_sent()[-1]
    assert "shorter" in json.dumps(replay["input"]) and "first part of a long answer" in json.dumps(replay["input"])


def test_steering_held_for_tool_output_is_prepended_to_the_continuation():
    sim = Sim().start()
    sim.create(input=[user("TOOL please")])
    created = sim.deliver()
    sim.send({"type": "response.steer", "previous_response_id": created["response"]["id"], "input": "also X"})
    sim.run_upstream()
    assert any(e["type"] == "response.steer.pending" for e in sim.client)
    done = [e for e in sim.client if e["type"] == "response.completed"][-1]["response"]
    assert done["id"] == created["response"]["id"]
    sim.kill("drop")
    sim.create(previous_response_id=done["id"], input=tool_output(done))
    sim.run_upstream()
    assert sim.last_response()["status"] == "completed"
    _, replay = sim.creates_sent()[-1]
    kinds = [i.get("type", "message") for i in replay["input"]]
    assert kinds == ["message", "function_call", "message", "function_call_output"]  # steer before the output


def test_a_silent_upstream_is_found_by_the_first_event_timeout_and_recovered():
    sim = Sim().start()
    r1 = chain_turn(sim, "hi")
    sim.kill("silence")
    sim.create(previous_response_id=r1["id"], input=[user("again")])
    sim.advance(FAST.first_event_timeout + 0.1)
    sim.run_upstream()
    assert sim.last_response()["status"] == "completed"
    assert sim.of(ev.Recovered)[-1].trigger is Trigger.FIRST_EVENT_TIMEOUT


def test_a_preflight_ping_finds_a_dead_idle_connection():
    sim = Sim().start()
    r1 = chain_turn(sim, "hi")
    sim.kill("silence")
    sim.advance(FAST.ping_idle + 1)
    sim.create(previous_response_id=r1["id"], input=[user("again")])
    assert not sim.creates_sent()[1:]  # held until the ping answers
    sim.advance(FAST.ping_timeout + 0.1)
    sim.run_upstream()
    assert sim.last_response()["status"] == "completed"
    assert sim.of(ev.Recovered)[-1].trigger is Trigger.PING_TIMEOUT


def test_probability_faults_hit_the_same_turns_in_every_session():
    rule = FaultRule(FaultKind.DROP, probability=0.5, seed=7)
    hits = []
    for _ in range(3):
        injector = FaultInjector([rule])
        hits.append([n for n in range(1, 30) if injector.turn_completed(n)])
    assert hits[0] == hits[1] == hits[2] and hits[0]


def test_fail_closed_gives_every_lane_in_flight_its_error_then_closes():
    sim = Sim().start()
    ra = chain_turn(sim, "hi a", lane="a")
    sim.create(stream_id="a", previous_response_id=ra["id"], input=[user("more a")])
    sim.create(stream_id="b", input=[user("hi b")])
    sim.deliver("a")  # a's response reached the client: it cannot be replayed
    sim.kill("drop")
    errors = [e for e in sim.client if e["type"] == "error"]
    assert sorted(e["stream_id"] for e in errors) == ["a", "b"]
    assert sim.closed is not None and sim.closed[0] == 1011 and sim.finished


def test_nothing_is_sent_upstream_after_the_client_left():
    sim = Sim().start()
    sim.create(input=[user("hello")])
    sim.leave()
    sim.run_upstream()
    assert sim.finished and not sim.sent_after_gone
    assert [e.reason for e in sim.of(ev.TurnEnded)] == [ev.CLIENT_LEFT]
    assert isinstance(sim.records[-1], ev.SessionEnded)


def test_connection_numbers_are_per_session():
    a, b = Sim().start(), Sim().start()
    assert [c.id for c in (a.protocol.current, b.protocol.current)] == [1, 1]


def test_commands_are_plain_data():
    sim = Sim()
    commands = sim.protocol.start("ws://x", "", None)
    assert [type(c) for c in commands] == [p.Emit, p.OpenUpstream]


def test_a_turn_waiting_on_a_keepalive_ping_goes_when_it_is_answered():
    """A continuation after ping_idle while the keepalive's own ping is out waits for that ping, and goes on its
    pong."""
    sim = Sim(p.Settings(ping_idle=3, ping_timeout=1, keepalive_interval=3, first_event_timeout=2)).start()
    r1 = chain_turn(sim, "hi")
    sim.current().paused = True  # the pong is late: the keepalive's ping is out
    sim.advance(3.5)
    assert any(conn == 1 for _, conn, _ in sim.pings)
    sim.create(previous_response_id=r1["id"], input=[user("again")])
    assert len(sim.creates_sent()) == 1  # waiting on the ping
    sim.current().paused = False
    sim.pings.clear()
    sim.feed(sim.protocol.ping_result(1, True, "keepalive"))
    sim.run_upstream()
    assert sim.last_response()["status"] == "completed" and len(sim.upstreams) == 1


def test_a_client_that_answers_no_ping_during_a_turn_is_told_why_before_the_close():
    sim = Sim().start()
    r1 = chain_turn(sim, "hi")
    sim.create(previous_response_id=r1["id"], input=[user("more")])
    sim.feed(sim.protocol.client_unresponsive(1.5))
    error = sim.client[-1]
    assert error["type"] == "error" and error["status"] == 503, error
    assert error["error"]["code"] == "replayguard_client_unresponsive" and "1.5s" in error["error"]["message"]
    assert sim.closed is not None and sim.closed[0] == 1011 and sim.finished
    assert [e.reason for e in sim.of(ev.TurnEnded)][-1] == ev.FAILED_CLOSED


def test_an_idle_client_that_answers_no_ping_is_closed_without_an_event():
    sim = Sim().start()
    chain_turn(sim, "hi")
    seen = len(sim.client)
    sim.feed(sim.protocol.client_unresponsive(1.5))
    assert len(sim.client) == seen  # no turn to tell about
    assert sim.closed == (1011, "client did not answer pings") and sim.finished
    assert isinstance(sim.records[-1], ev.SessionEnded)
