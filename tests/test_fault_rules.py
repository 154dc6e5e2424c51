"""The fault injector's decisions (sans-I/O) and the errors for bad fault rules."""

from __future__ import annotations

import random

import pytest

from replayguard.core.faults import FaultInjector, FaultKind, FaultRule, InjectedError, upstream_error
from replayguard.proxy.rules import RulesError, parse_rules


def fire_turns(injector: FaultInjector, turns: int) -> list[tuple[int, str]]:
    return [(f.after_turn, f.rule.kind.value) for n in range(turns + 1) for f in injector.turn_completed(n)]


def test_after_turn_fires_once_at_that_turn():
    injector = FaultInjector([FaultRule(FaultKind.DROP, after_turn=2), FaultRule(FaultKind.CLOSE, after_turn=0)])
    assert fire_turns(injector, 5) == [(0, "close"), (2, "drop")]
    assert injector.turn_completed(2) == []  # once per session


def test_times_repeats_and_probability_is_seeded():
    rule = FaultRule(FaultKind.DROP, probability=0.3, seed=11)
    rng = random.Random(11)
    expected = [(n, "drop") for n in range(1, 41) if rng.random() < 0.3]
    assert fire_turns(FaultInjector([rule]), 40) == expected and len(expected) > 3
    limited = FaultInjector([FaultRule(FaultKind.DROP, probability=1, times=2)])
    assert fire_turns(limited, 5) == [(1, "drop"), (2, "drop")]
    late = FaultInjector([FaultRule(FaultKind.DROP, probability=1, after_turn=3, times=1)])
    assert fire_turns(late, 5) == [(3, "drop")]


def test_armed_faults_are_one_shot():
    injector = FaultInjector([FaultRule(FaultKind.REFUSE, after_turn=1, status=429, count=2),
                              FaultRule(FaultKind.ERROR, after_turn=1, error=InjectedError.PREVIOUS_NOT_FOUND),
                              FaultRule(FaultKind.DELAY, after_turn=1, seconds=2.5)])
    assert injector.take_refusal() is None and injector.take_error("r") is None and injector.take_delay() == 0
    injector.turn_completed(1)
    assert [injector.take_refusal() for _ in range(3)] == [429, 429, None]
    error = injector.take_error("resp_1")
    assert error == upstream_error(InjectedError.PREVIOUS_NOT_FOUND, "resp_1")
    assert error["error"]["message"] == "Previous response with id 'resp_1' not found."
    assert error["status"] == 400 and error["error"]["param"] == "previous_response_id"
    assert injector.take_error("resp_1") is None
    assert injector.take_delay() == 2.5 and injector.take_delay() == 0


@pytest.mark.parametrize("kind,status,code", [
    (InjectedError.CONNECTION_LIMIT, 400, "websocket_connection_limit_reached"),
    (InjectedError.SERVER_ERROR, 500, "server_error"),
])
def test_injected_errors_have_the_upstream_shape(kind, status, code):
    event = upstream_error(kind)
    assert event["type"] == "error" and event["status"] == status and event["error"]["code"] == code
    assert set(event["error"]) == {"type", "code", "message", "param"}


MATCH = "match:\n  - path: '*/responses'\n"


@pytest.mark.parametrize("text,line,reason", [
    ("faults: drop\n", 3, "faults must be a list of fault rules"),
    ("faults:\n  - after_turn: 1\n", 4, "a fault rule needs kind: one of close, drop, blackhole, refuse, error, delay"),
    ("faults:\n  - kind: drop\n", 4, "fault drop: needs after_turn (a turn number) or probability (0..1)"),
    ("faults:\n  - kind: explode\n    after_turn: 1\n", 4, "faults.kind: expected one of close, drop"),
    ("faults:\n  - kind: drop\n    after_turn: -1\n", 5, "faults.after_turn: expected an integer >= 0, got -1"),
    ("faults:\n  - kind: drop\n    probability: 1.5\n", 5, "faults.probability: expected a number from 0 to 1, got 1.5"),
    ("faults:\n  - kind: close\n    after_turn: 1\n    code: 1005\n", 6, "close code 1005 cannot be sent"),
    ("faults:\n  - kind: close\n    after_turn: 1\n    code: 999\n", 6, "faults.code: expected an integer from 1000 to 4999"),
    ("faults:\n  - kind: refuse\n    after_turn: 1\n    status: 200\n", 6, "faults.status: expected an integer from 400 to 599"),
    ("faults:\n  - kind: error\n    after_turn: 1\n    error: teapot\n", 6,
     "faults.error: expected one of previous_response_not_found, websocket_connection_limit_reached, server_error"),
    ("faults:\n  - kind: drop\n    after_turn: 1\n    seconds: 2\n", 6, "faults.seconds applies to kind delay, not drop"),
    ("faults:\n  - kind: drop\n    after_turn: 1\n    host: ''\n", 6, "faults.host: expected a non-empty string"),
    ("faults:\n  - kind: drop\n    after_turn: 1\n    filter: '~zz'\n", 6, "faults.filter: invalid filter expression"),
    ("faults:\n  - kind: drop\n    after_turn: 1\n    every: 2\n", 6, "unknown key faults.every"),
    ("faults:\n  - kind: drop\n    after_turn: 1\n    kind: close\n", 6, "a fault rule: duplicate key 'kind'"),
    ("trace:\n  bodies: everything\n", 4, "trace.bodies: expected one of none, summary, full, got 'everything'"),
])
def test_bad_fault_rules_name_file_line_and_reason(text, line, reason):
    with pytest.raises(RulesError) as e:
        parse_rules(MATCH + text, "rules.yaml")
    assert e.value.line == line, str(e.value)
    assert reason in str(e.value) and str(e.value).startswith(f"rules.yaml:{line}: ")


def test_fault_scope_uses_the_flow_matchers():
    rules = parse_rules(MATCH + "faults:\n  - kind: drop\n    after_turn: 1\n    host: 'api.*'\n"
                        "  - kind: close\n    after_turn: 2\n", "rules.yaml")
    assert [f.kind for f in rules.faults_for("api.openai.com", "/v1/responses")] == [FaultKind.DROP, FaultKind.CLOSE]
    assert [f.kind for f in rules.faults_for("chatgpt.com", "/v1/responses")] == [FaultKind.CLOSE]
    assert rules.faults[0].line == 4 and parse_rules(MATCH, "r").faults == ()
