"""Pathological JSON from either side (types where strings belong, lists where objects belong, deep nesting) is
opaque to replayguard: every piece that reads messages takes it without an exception; end to end, it is passed
through unchanged, the session goes on, and a healthy upstream is never declared dead for it."""

from __future__ import annotations

import json
from typing import Any

from conftest import Client, completed, user
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol_sim import Sim

from replayguard.core.messages import is_delta, parse
from replayguard.core.pairing import find_orphans
from replayguard.core.records import Bodies, record_of, summarize_items, turn_start_fields
from replayguard.core.render import render
from replayguard.tools.viewer import build_sessions

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
                    st.sampled_from(["function_call", "function_call_output", "message", "response.completed",
                                     "response.output_item.done", "error", "call_1", "resp_1", "mcp_approval_request",
                                     "local_shell_call_output"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(
                                                           ["type", "call_id", "id", "role", "content", "item",
                                                            "response", "output", "input", "previous_response_id",
                                                            "store", "approval_request_id", "error", "name"]), inner,
                                                           max_size=5)), max_leaves=20)
items = st.lists(st.one_of(values, st.fixed_dictionaries({"type": values, "call_id": values})), max_size=6)


@settings(max_examples=300, deadline=None)
@given(request_input=st.one_of(values, items), previous=values, events=st.lists(values, max_size=6),
       lane=st.one_of(st.none(), values))
def test_the_core_takes_any_json(request_input, previous, events, lane):
    """The protocol core fed any JSON from the client and the upstream: no exception, every record renders."""
    sim = Sim().start()
    request: dict[str, Any] = {"type": "response.create", "input": request_input, "store": False}
    if previous is not None:
        request["previous_response_id"] = previous
    if lane is not None:
        request["stream_id"] = lane
    raw = json.dumps(request)
    sim.send(raw)
    for event in events:  # anything at all from the client too
        sim.send(json.dumps(event))
        sim.send(json.dumps({"type": event, "input": event}))
    up = sim.current()
    assert up is not None
    for event in events:
        sim.feed(sim.protocol.upstream_message(up.id, json.dumps(event)))
    sim.feed(sim.protocol.upstream_message(up.id, json.dumps({"type": "response.created", "response": events[-1:]})))
    for record in sim.records:
        record_of(record, Bodies.FULL)
        record_of(record, Bodies.SUMMARY)
    for turn in sim.protocol.turns_in_flight():
        turn.full_input()
        find_orphans(turn.new_items)
    summarize_items(request_input, Bodies.SUMMARY)
    turn_start_fields(request, len(raw), Bodies.SUMMARY)
    earlier = [(True, raw.encode())] + [(False, json.dumps(e).encode()) for e in events]
    for content in earlier:
        render(content[1], earlier)
        is_delta(content[1].decode())


@settings(max_examples=200, deadline=None)
@given(records=st.lists(st.one_of(values, st.fixed_dictionaries(
    {"event": st.sampled_from(["turn.start", "turn.end", "recovery", "fault", "fail_close", "upstream.lost",
                               "handshake", "session.start", "upstream.closed"]),
     "turn": values, "input": values, "output": values, "previous_response_id": values, "response_id": values,
     "ts": st.floats(0, 10), "session": st.just("s")})), max_size=8))
def test_the_viewer_takes_any_trace(records):
    build_sessions([r for r in records if isinstance(r, dict) and isinstance(r.get("event"), str)])


def test_deep_nesting_is_not_json_to_us():
    deep = "[" * 100_000 + "]" * 100_000
    assert parse(deep) is None and parse('{"type": "x"}') == {"type": "x"} and parse(b"\xff") is None
    assert render(deep.encode(), []) is None


# -- end to end ------------------------------------------------------------------------------------
def test_pathological_messages_pass_through_and_the_session_goes_on(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")
    # From the client: input nested 100,000 deep, a list as a call_id, a dict as an item type, a list as the type.
    # Each reaches the upstream unchanged and the upstream's own error comes back (an error evicts its cache, so
    # these stand alone, without previous_response_id).
    deep = '{"type": "response.create", "input": ' + "[" * 100_000 + "]" * 100_000 + "}"
    for message in (deep,
                    {"type": "response.create", "model": "m", "store": False,
                     "input": [{"type": "function_call_output", "call_id": ["call_1"], "output": "x"}]},
                    {"type": "response.create", "model": "m", "store": False,
                     "input": [{"type": {"nested": "type"}, "call_id": "call_1"}]},
                    {"type": ["response.create"], "input": []}):
        client.send(message)
        assert client.recv()["type"] == "error"  # the upstream's own answer
    received = [m for _, m in fake.received[-4:]]
    assert received[0] == {"_raw": deep}
    assert received[1]["input"][0]["call_id"] == ["call_1"] and received[2]["input"][0]["type"] == {"nested": "type"}
    assert received[3]["type"] == ["response.create"]
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("please run TOOL ls")]}))
    # From the upstream: deeply nested garbage and odd types on a healthy connection; it is not declared dead.
    fake.send_raw_all("[" * 100_000 + "]" * 100_000)
    fake.send_raw_all(json.dumps({"type": {"weird": True}, "response": ["x"]}))
    assert client.ws.recv(timeout=5) == "[" * 100_000 + "]" * 100_000  # passed through to the client as it came
    assert client.recv() == {"type": {"weird": True}, "response": ["x"]}
    fc = next(i for i in r1["output"] if i["type"] == "function_call")
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [{"type": "function_call_output", "call_id": fc["call_id"], "output": "ok"}]}))
    assert r2["id"] and len(fake.handshakes) == 1  # the same healthy connection all along
    assert "Traceback" not in proxy.log and "internal error" not in proxy.log
    client.close()
