"""The model of the upstream (shared by the fake and the in-process protocol tests): its rules, and every event it
can send validated strictly against the openai SDK's own server-event types."""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest

from replayguard.tools.fake_upstream import FakeUpstream
from replayguard.tools.upstream_model import Model, refusal

from conftest import Client, completed, user


def send(conn, message: dict[str, Any]) -> None:
    conn.receive(json.dumps(message))


def every_kind_of_event() -> list[dict[str, Any]]:
    """Events of every type the model sends: text, tool calls, reasoning, incomplete, failed, queued, errors, and
    steering accepted, pending and failed, on lanes and off."""
    model = Model()
    conn = model.connect()
    out: list[dict[str, Any]] = []
    send(conn, {"type": "response.create", "model": "m", "store": False, "input": "please TOOL ls",
                "include": ["reasoning.encrypted_content"]})
    send(conn, {"type": "response.bogus"})
    out += conn.drain()
    send(conn, {"type": "response.create", "model": "m", "store": False, "input": "LONG x", "max_output_tokens": 20})
    out += conn.drain()
    send(conn, {"type": "response.create", "model": "m", "store": False, "input": "FAIL x"})
    out += conn.drain()
    send(conn, {"type": "response.create", "model": "m", "store": False, "previous_response_id": "resp_nope"})
    out += conn.drain()
    send(conn, {"type": "response.create", "stream_id": "a", "model": "m", "store": False, "input": "LONG hi a"})
    out += [conn.next_event("a")]
    send(conn, {"type": "response.create", "stream_id": "a", "model": "m", "store": False, "input": "queued one"})
    send(conn, {"type": "response.steer", "previous_response_id": out[-1]["response"]["id"], "input": "focus"})
    out += conn.drain()
    send(conn, {"type": "response.steer", "previous_response_id": "resp_nope", "input": "focus"})
    send(conn, {"type": "response.create", "stream_id": "t", "model": "m", "store": False, "input": "TOOL x"})
    while not out or out[-1].get("stream_id") != "t":  # up to the tool-call response's response.created
        out.append(conn.next_event("t"))
    send(conn, {"type": "response.steer", "previous_response_id": out[-1]["response"]["id"], "input": "also"})
    out += conn.drain()
    out.append(conn.limit_reached())
    return out


EXPECTED_TYPES = {
    "error", "response.completed", "response.content_part.added", "response.content_part.done", "response.created",
    "response.failed", "response.function_call_arguments.delta", "response.function_call_arguments.done",
    "response.in_progress", "response.incomplete", "response.output_item.added", "response.output_item.done",
    "response.output_text.delta", "response.output_text.done", "response.queued", "response.steer.accepted",
    "response.steer.failed", "response.steer.pending",
}


def sdk_types() -> dict[str, Any]:
    server_event = pytest.importorskip("openai.types.responses.responses_server_event",
                                       reason="the openai SDK is installed only on the mitmproxy 12 line")
    union = server_event.ResponsesServerEvent
    if typing.get_origin(union) is typing.Annotated:
        union = typing.get_args(union)[0]
    by_type = {}
    for cls in typing.get_args(union):
        for value in typing.get_args(cls.model_fields["type"].annotation):
            by_type[value] = cls
    return by_type


def strictly_valid(event: dict[str, Any], by_type: dict[str, Any]) -> None:
    cls = by_type[event["type"]]
    cls.model_validate(event, strict=True)
    extra = set(event) - set(cls.model_fields)
    assert not extra, f"{event['type']} carries fields the SDK does not know: {extra}"


def test_every_event_the_model_sends_is_what_the_sdk_expects():
    by_type = sdk_types()
    events = every_kind_of_event()
    assert {e["type"] for e in events} == EXPECTED_TYPES  # the list above is every type it can send
    for event in events:
        strictly_valid(event, by_type)


def test_every_event_the_fake_sends_over_a_websocket_is_what_the_sdk_expects(fake):
    by_type = sdk_types()
    client = Client(fake.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("please TOOL ls")],
                                "include": ["reasoning.encrypted_content"]}))
    call = next(i for i in r1["output"] if i["type"] == "function_call")
    client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                 "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "x"}]})
    client.turn({"model": "m", "store": False, "input": [user("LONG")], "max_output_tokens": 20})
    client.turn({"model": "m", "store": False, "input": [user("FAIL")]})
    client.turn({"model": "m", "store": False, "previous_response_id": "resp_gone", "input": [user("x")]})
    client.close()
    sent = [e for _, e in fake.sent]
    assert {e["type"] for e in sent} >= {"response.incomplete", "response.failed", "error", "response.completed"}
    for event in sent:
        strictly_valid(event, by_type)


def test_the_cache_holds_the_last_response_of_each_lane_and_a_fork_continues_another_lane():
    conn = Model().connect()
    send(conn, {"type": "response.create", "stream_id": "a", "model": "m", "store": False, "input": "on a"})
    send(conn, {"type": "response.create", "stream_id": "b", "model": "m", "store": False, "input": "on b"})
    events = conn.drain()
    ra, rb = (next(e["response"]["id"] for e in events if e["type"] == "response.completed" and e["stream_id"] == lane)
              for lane in "ab")
    send(conn, {"type": "response.create", "stream_id": "c", "model": "m", "store": False, "previous_response_id": ra,
                "input": "fork of a"})
    send(conn, {"type": "response.create", "stream_id": "b", "model": "m", "store": False, "previous_response_id": rb,
                "input": "more b"})
    done = [e for e in conn.drain() if e["type"] == "response.completed"]
    assert {e["stream_id"] for e in done} == {"b", "c"}
    # Another connection holds none of them: store=false responses are connection-local.
    other = conn.model.connect()
    send(other, {"type": "response.create", "model": "m", "store": False, "previous_response_id": ra, "input": "x"})
    assert other.drain()[0]["error"]["code"] == "previous_response_not_found"


def test_stored_responses_are_the_same_credentials_only():
    model = Model()
    a = model.connect("key-a")
    send(a, {"type": "response.create", "model": "m", "store": True, "input": "remember"})
    rid = a.drain()[-1]["response"]["id"]
    again, other = model.connect("key-a"), model.connect("key-b")
    send(again, {"type": "response.create", "model": "m", "previous_response_id": rid, "input": "and?"})
    send(other, {"type": "response.create", "model": "m", "previous_response_id": rid, "input": "and?"})
    assert again.drain()[-1]["type"] == "response.completed"
    assert other.drain()[0]["error"]["code"] == "previous_response_not_found"


def test_a_second_create_on_the_default_lane_is_refused_while_one_streams_and_queued_on_a_named_lane():
    conn = Model().connect()
    send(conn, {"type": "response.create", "model": "m", "store": False, "input": "one"})
    send(conn, {"type": "response.create", "model": "m", "store": False, "input": "two"})
    send(conn, {"type": "response.create", "stream_id": "x", "model": "m", "store": False, "input": "three"})
    send(conn, {"type": "response.create", "stream_id": "x", "model": "m", "store": False, "input": "four"})
    events = conn.drain()
    assert [e["error"]["code"] for e in events if e["type"] == "error"] == ["conversation_already_has_active_response"]
    assert [e["stream_id"] for e in events if e["type"] == "response.queued"] == ["x"]
    assert len([e for e in events if e["type"] == "response.completed"]) == 3


@pytest.mark.parametrize("status", [401, 403, 429, 500, 503])
def test_refused_handshakes_answer_as_the_upstream_does(status):
    answer = refusal(status)
    body = json.loads(answer.body)["error"]
    assert answer.status == status and set(body) == {"type", "code", "message", "param"}
    headers = dict(answer.headers)
    assert headers["Content-Type"] == "application/json"
    assert ("Retry-After" in headers) is (status == 429)


def test_the_fake_refuses_handshakes_with_the_models_answer():
    with FakeUpstream() as fake:
        fake.refuse_next(1, 429)
        from websockets.exceptions import InvalidStatus
        with pytest.raises(InvalidStatus) as refused:
            Client(fake.url + "/v1/responses")
    response = refused.value.response
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    assert json.loads(response.body)["error"]["code"] == "rate_limit_exceeded"
