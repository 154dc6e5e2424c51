"""replayguard.core.recovery.decide() as a decision table, and the error events of replayguard.core.errors."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from replayguard.core import errors
from replayguard.core.recovery import (
    ROUTINE,
    Action,
    Decision,
    Policy,
    Situation,
    Trigger,
    decide,
    Refusal,
    handshake_failed,
)


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}


def fcall(call_id: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": "exec_command", "arguments": "{}"}


def fout(call_id: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": "ok"}


HISTORY = [user("q1"), {"type": "reasoning", "encrypted_content": "e"}, fcall("call_1")]

# Scenarios: the Situation fields that differ from a plain continuation on a dropped connection.
SCENARIOS: dict[str, dict[str, Any]] = {
    "no-previous-id": dict(previous_id=None, previous_stored=False, payload_input=[user("q")], replay=[user("q")]),
    "store-true-previous": dict(
        previous_id="resp_1", previous_stored=True, payload_input=[user("q2")], replay=[user("q1"), assistant("a"), user("q2")]
    ),
    "unknown-history": dict(previous_id="resp_unknown", previous_stored=False, payload_input=[user("q2")], replay=None),
    "text-replay": dict(
        previous_id="resp_1", previous_stored=False, payload_input=[user("q2")], replay=[user("q1"), assistant("a"), user("q2")]
    ),
    "tool-replay-self-consistent": dict(
        previous_id="resp_1", previous_stored=False, payload_input=[fout("call_1")], replay=[*HISTORY, fout("call_1")]
    ),
    "orphaned-function-call-output": dict(
        previous_id="resp_1", previous_stored=False, payload_input=[fout("call_9")],
        replay=[user("q1"), assistant("a"), fout("call_9")],
    ),
    "client-saw-output": dict(
        previous_id="resp_1", previous_stored=False, payload_input=[user("q2")],
        replay=[user("q1"), assistant("a"), user("q2")], client_saw_output=True,
    ),
    "retries-exhausted": dict(
        previous_id="resp_1", previous_stored=False, payload_input=[user("q2")],
        replay=[user("q1"), assistant("a"), user("q2")], attempts=1,
    ),
}

NOT_FOUND = (400, "invalid_request_error", "previous_response_not_found", "previous_response_id")
INTERRUPTED = (502, "server_error", "upstream_stream_interrupted", None)
EXHAUSTED = (502, "server_error", "upstream_retries_exhausted", None)
STRICT_CLOSE = "strict-close"  # no error event, close 1008 with the peer gateway's reason

# (scenario, policy) -> (action, error (status, type, code, param) | None | STRICT_CLOSE)
TABLE: list[tuple[str, Policy, Action, Any]] = [
    ("no-previous-id", Policy.PAIR_AWARE, Action.SEND, None),
    ("no-previous-id", Policy.STRICT, Action.SEND, None),
    ("store-true-previous", Policy.PAIR_AWARE, Action.SEND, None),
    ("store-true-previous", Policy.STRICT, Action.SEND, None),
    ("unknown-history", Policy.PAIR_AWARE, Action.FAIL, NOT_FOUND),
    ("unknown-history", Policy.STRICT, Action.FAIL, NOT_FOUND),
    ("text-replay", Policy.PAIR_AWARE, Action.REPLAY, None),
    ("text-replay", Policy.STRICT, Action.REPLAY, None),
    ("tool-replay-self-consistent", Policy.PAIR_AWARE, Action.REPLAY, None),
    ("tool-replay-self-consistent", Policy.STRICT, Action.FAIL, STRICT_CLOSE),
    ("orphaned-function-call-output", Policy.PAIR_AWARE, Action.FAIL, NOT_FOUND),
    ("orphaned-function-call-output", Policy.STRICT, Action.FAIL, STRICT_CLOSE),
    ("client-saw-output", Policy.PAIR_AWARE, Action.FAIL, INTERRUPTED),
    ("client-saw-output", Policy.STRICT, Action.FAIL, INTERRUPTED),
    ("retries-exhausted", Policy.PAIR_AWARE, Action.FAIL, EXHAUSTED),
    ("retries-exhausted", Policy.STRICT, Action.FAIL, EXHAUSTED),
]


def situation(
    trigger: Trigger = Trigger.CLOSED,
    policy: Policy = Policy.PAIR_AWARE,
    attempts: int = 0,
    max_retries: int = 1,
    previous_id: str | None = "resp_1",
    previous_stored: bool = False,
    payload_input: list[Any] | None = None,
    replay: list[Any] | None = None,
    client_saw_output: bool = False,
) -> Situation:
    return Situation(
        trigger=trigger,
        policy=policy,
        attempts=attempts,
        max_retries=max_retries,
        previous_id=previous_id,
        previous_stored=previous_stored,
        payload_input=payload_input if payload_input is not None else [user("q")],
        replay=replay,
        client_saw_output=client_saw_output,
    )


def assert_error_shape(event: dict[str, Any]) -> None:
    assert set(event) == {"type", "status", "error"}
    assert event["type"] == "error"
    assert set(event["error"]) == {"type", "code", "message", "param"}
    assert event["error"]["message"].startswith(errors.PREFIX)
    assert json.loads(json.dumps(event)) == event


@pytest.mark.parametrize(
    ("scenario", "policy", "action", "error"),
    TABLE,
    ids=[f"{policy.value}-{scenario}" for scenario, policy, _, _ in TABLE],
)
def test_decision_table(scenario, policy, action, error):
    s = situation(policy=policy, **SCENARIOS[scenario])
    d = decide(s)
    assert d.action is action, d.reason
    assert d.fails is (action is Action.FAIL)
    assert d.reason.startswith(Trigger.CLOSED.value)
    if action is not Action.FAIL:
        assert d.error is None
        return
    if error == STRICT_CLOSE:
        assert d.error is None  # the peer gateway closes without an event
        assert d.close_code == errors.CLOSE_POLICY == 1008
        assert d.close_reason == errors.STRICT_CLOSE_REASON
        assert "strict" in d.reason
        return
    status, type_, code, param = error
    assert_error_shape(d.error)
    assert d.error["status"] == status
    assert d.error["error"]["type"] == type_
    assert d.error["error"]["code"] == code
    assert d.error["error"]["param"] == param
    assert d.close_code == errors.CLOSE_INTERNAL == 1011
    assert d.close_reason.startswith(errors.PREFIX)
    assert len(d.close_reason.encode()) <= 123
    assert d.error["error"]["message"].startswith(errors.PREFIX + d.reason)


def test_every_scenario_and_policy_is_in_the_table():
    assert {(s, p) for s, p, _, _ in TABLE} == {(s, p) for s in SCENARIOS for p in Policy}


def test_orphan_message_names_the_call_id_and_index():
    d = decide(situation(**SCENARIOS["orphaned-function-call-output"]))
    msg = d.error["error"]["message"]
    assert "'call_9'" in msg and "function_call_output" in msg and "input item 2" in msg
    assert "resend the full input" in msg
    assert d.error["status"] == 400 and d.error["error"]["code"] == "previous_response_not_found"


@pytest.mark.parametrize(
    ("replay", "orphan"),
    [
        ([user("q"), fout("call_x")], ("function_call_output", "call_x")),
        ([{"type": "custom_tool_call_output", "call_id": "ct_1"}], ("custom_tool_call_output", "ct_1")),
        ([{"type": "mcp_approval_response", "approval_request_id": "mcpr_1"}], ("mcp_approval_response", "mcpr_1")),
        ([fcall("a"), fout("a"), fout("b")], ("function_call_output", "b")),
        ([fout("late"), fcall("late")], ("function_call_output", "late")),
    ],
    ids=["missing-call", "custom-tool", "mcp-approval", "second-of-two", "output-before-call"],
)
def test_orphans_fail_pair_aware_with_the_first_orphan_named(replay, orphan):
    d = decide(situation(payload_input=replay[-1:], replay=replay))
    assert d.action is Action.FAIL
    kind, call_id = orphan
    assert f"{kind} call_id {call_id!r}" in d.error["error"]["message"]
    assert d.error["error"]["code"] == "previous_response_not_found"


def test_unknown_history_message_names_the_previous_id():
    d = decide(situation(previous_id="resp_lost", replay=None))
    assert "'resp_lost'" in d.error["error"]["message"]
    assert d.error["status"] == 400 and d.error["error"]["param"] == "previous_response_id"


def test_client_saw_output_wins_over_everything():
    # even a request that could be resent unchanged must fail once the client saw part of the answer
    for trigger in Trigger:
        d = decide(situation(trigger=trigger, previous_id=None, replay=[user("q")], client_saw_output=True))
        assert d.action is Action.FAIL
        assert d.error["status"] == 502 and d.error["error"]["code"] == "upstream_stream_interrupted"
        assert "after part of the response reached the client" in d.error["error"]["message"]


COUNTED = [t for t in Trigger if t not in ROUTINE]


def test_routine_triggers():
    assert ROUTINE == {Trigger.ROTATION, Trigger.RESUME}


@pytest.mark.parametrize("trigger", COUNTED, ids=[t.name for t in COUNTED])
@pytest.mark.parametrize(("attempts", "max_retries"), [(1, 1), (2, 1), (0, 0), (3, 3)])
def test_attempts_at_max_retries_exhaust(trigger, attempts, max_retries):
    d = decide(situation(trigger=trigger, attempts=attempts, max_retries=max_retries,
                         replay=[user("q1"), user("q2")], previous_id=None))
    assert d.action is Action.FAIL
    assert d.error["status"] == 502 and d.error["error"]["type"] == "server_error"
    assert d.error["error"]["code"] == "upstream_retries_exhausted"
    assert f"{attempts} recovery attempt(s)" in d.reason and f"max retries {max_retries}" in d.reason
    assert d.close_code == 1011


@pytest.mark.parametrize("trigger", COUNTED, ids=[t.name for t in COUNTED])
def test_attempts_below_max_retries_recover(trigger):
    d = decide(situation(trigger=trigger, attempts=1, max_retries=2, replay=[user("q1"), user("q2")]))
    assert d.action is Action.REPLAY
    assert d.reason.startswith(trigger.value)


@pytest.mark.parametrize("trigger", sorted(ROUTINE, key=lambda t: t.name), ids=lambda t: t.name)
@pytest.mark.parametrize(
    ("scenario", "action"),
    [("text-replay", Action.REPLAY), ("no-previous-id", Action.SEND), ("store-true-previous", Action.SEND)],
)
def test_rotation_and_resume_do_not_count_against_retries(trigger, scenario, action):
    fields = {**SCENARIOS[scenario], "attempts": 5}
    d = decide(situation(trigger=trigger, max_retries=1, **fields))
    assert d.action is action
    d0 = decide(situation(trigger=trigger, max_retries=0, **fields))
    assert d0.action is action


def test_strict_fails_when_the_payload_alone_has_a_tool_output():
    # the new items carry the output, the history holds its call: strict still refuses
    d = decide(situation(policy=Policy.STRICT, payload_input=[fout("call_1")], replay=[*HISTORY, fout("call_1")]))
    assert d.action is Action.FAIL and d.error is None and d.close_code == 1008
    # an output only in the history (not in this turn's items) also counts
    d = decide(situation(policy=Policy.STRICT, payload_input=[user("next")],
                         replay=[*HISTORY, fout("call_1"), assistant("a"), user("next")]))
    assert d.action is Action.FAIL and d.close_code == 1008
    assert decide(replace(situation(payload_input=[user("next")], replay=[*HISTORY, fout("call_1"), user("next")]),
                          policy=Policy.PAIR_AWARE)).action is Action.REPLAY


def test_strict_refuses_only_continuations():
    # the peer's check guards continuations: a self-contained request with tool outputs goes out unchanged
    for policy in Policy:
        d = decide(situation(policy=policy, previous_id=None, payload_input=[*HISTORY, fout("call_1")],
                             replay=[*HISTORY, fout("call_1")]))
        assert d.action is Action.SEND
        d = decide(situation(policy=policy, previous_stored=True, payload_input=[fout("call_1")],
                             replay=[*HISTORY, fout("call_1")]))
        assert d.action is Action.SEND


def test_send_does_not_check_pairing():
    # a request that does not depend on the lost connection goes out unchanged: the upstream judges it
    d = decide(situation(previous_id=None, payload_input=[fout("nowhere")], replay=[fout("nowhere")]))
    assert d.action is Action.SEND
    d = decide(situation(previous_stored=True, payload_input=[fout("nowhere")], replay=None))
    assert d.action is Action.SEND


def test_long_reason_close_reason_is_truncated():
    d = decide(situation(previous_id="resp_" + "x" * 500, replay=None))
    assert d.action is Action.FAIL
    assert len(d.close_reason.encode()) <= 123 and d.close_reason.endswith("...")
    assert "x" * 500 in d.error["error"]["message"]  # the event keeps the whole message


# -- handshake_failed ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("trigger", "status", "detail", "expected"),
    [
        (Trigger.CLOSED, 503, "Service Unavailable", "HTTP 503"),
        (Trigger.DROPPED, 401, "unauthorized", "HTTP 401"),
        (Trigger.ROTATION, 429, "", "HTTP 429"),
        (Trigger.PING_TIMEOUT, None, "connection refused", "connection refused"),
        (Trigger.RESUME, None, "timed out after 10s", "timed out after 10s"),
    ],
    ids=["503", "401", "429-rotation", "refused", "timeout"],
)
def test_handshake_failed_without_an_upstream_error(trigger, status, detail, expected):
    """No error of the upstream's to pass on (no body, or not JSON): the upstream's status when it gave one (a 502
    when it could not be reached), replayguard's code."""
    d = handshake_failed(trigger, Refusal(detail, status))
    assert d.action is Action.FAIL and d.fails
    assert_error_shape(d.error)
    assert d.error["status"] == (status or 502)
    assert d.error["error"]["type"] == ("server_error" if (status or 502) >= 500 else "invalid_request_error")
    assert d.error["error"]["code"] == "upstream_unavailable"
    assert d.error["error"]["param"] is None
    msg = d.error["error"]["message"]
    assert f"reconnect handshake failed: {expected}" in msg and msg.startswith(errors.PREFIX + trigger.value)
    assert d.close_code == (1013 if status in (429, 503) else 1011) and len(d.close_reason.encode()) <= 123


def test_handshake_refused_with_the_upstreams_error_passes_it_on():
    body = json.dumps({"error": {"type": "requests", "code": "rate_limit_exceeded", "param": None,
                                 "message": "Rate limit reached. Please try again in 7s."}}).encode()
    refusal = Refusal("upstream answered HTTP 429", 429, body, "application/json; charset=utf-8",
                      (("Retry-After", "7"), ("x-ratelimit-remaining-requests", "0"), ("Set-Cookie", "secret=1"),
                       ("x-request-id", "req_1")))
    d = handshake_failed(Trigger.DROPPED, refusal)
    error = d.error["error"]
    assert d.error["status"] == 429 and error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert error["message"].endswith("HTTP 429: Rate limit reached. Please try again in 7s.")
    assert error["headers"] == {"retry-after": "7", "x-ratelimit-remaining-requests": "0", "x-request-id": "req_1"}
    assert d.close_code == 1013
    not_json = handshake_failed(Trigger.DROPPED, Refusal("x", 429, b"<html>", "text/html", (("Retry-After", "3"),)))
    assert not_json.error["error"]["code"] == "upstream_unavailable" and not_json.error["error"]["headers"] == {
        "retry-after": "3"}


def test_decision_fails_property():
    assert not Decision(Action.SEND, "r").fails
    assert not Decision(Action.REPLAY, "r").fails
    assert Decision(Action.FAIL, "r").fails
    assert Decision(Action.SEND, "r").close_code == 1011


# -- errors.py -----------------------------------------------------------------------------------------
def test_error_event_shape():
    e = errors.error_event(418, "t", "c", "msg", "p")
    assert e == {"type": "error", "status": 418, "error": {"type": "t", "code": "c", "message": "replayguard: msg", "param": "p"}}
    assert errors.error_event(400, "t", None, "m") == {
        "type": "error", "status": 400, "error": {"type": "t", "code": None, "message": "replayguard: m", "param": None}
    }


def test_not_found_and_server_error():
    nf = errors.not_found("gone")
    assert_error_shape(nf)
    assert nf["status"] == 400 and nf["error"] == {
        "type": "invalid_request_error", "code": "previous_response_not_found",
        "message": "replayguard: gone", "param": "previous_response_id",
    }
    se = errors.server_error("upstream_unavailable", "down")
    assert_error_shape(se)
    assert se["status"] == 502 and se["error"] == {
        "type": "server_error", "code": "upstream_unavailable", "message": "replayguard: down", "param": None,
    }


@pytest.mark.parametrize(("status", "kind"), [(502, "server_error"), (500, "server_error"), (400, "invalid_request_error"),
                                              (404, "invalid_request_error")])
def test_http_error_body(status, kind):
    body = json.loads(errors.http_error_body(status, "upstream_handshake_failed", "no route"))
    assert body == {"error": {"type": kind, "code": "upstream_handshake_failed", "message": "replayguard: no route",
                              "param": None}}


@pytest.mark.parametrize(
    ("text", "unchanged"),
    [
        ("", True),
        ("short reason", True),
        ("a" * 123, True),
        ("€" * 41, True),  # exactly 123 bytes
        ("a" * 124, False),
        ("a" * 1000, False),
        ("€" * 42, False),  # 126 bytes
        ("a" + "€" * 50, False),  # the cut at 120 bytes falls inside a character
        ("ab" + "😀" * 40, False),  # 4-byte characters
    ],
    ids=["empty", "short", "123-ascii", "123-utf8", "124-ascii", "long", "126-utf8", "mid-char", "emoji"],
)
def test_close_reason_fits_123_bytes(text, unchanged):
    out = errors.close_reason(text)
    raw = out.encode("utf-8")  # must be valid text
    assert len(raw) <= 123
    if unchanged:
        assert out == text
    else:
        assert out.endswith("...")
        assert text.startswith(out[:-3])
        assert len(raw) >= 117  # truncated, not emptied
