"""Property-based tests of the core: for random chains, a replay the core decides to send is one the upstream's
validator accepts, and a fail-close on pairing is one the validator would really reject."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from replayguard.core.chain import Chain, ChainStore
from replayguard.tools.fake_upstream import RequestFailed, validate
from replayguard.core.recovery import Action, Policy, Situation, Trigger, decide

# One client step: what the client sends after the last response.
STEP = st.sampled_from(["text", "tool", "tool2", "warmup", "fail", "bogus-output"])


def model_output(kind: str, ids: Any, reasoning: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if reasoning:
        out.append({"type": "reasoning", "id": f"rs_{next(ids)}", "summary": [], "encrypted_content": "enc"})
    if kind in ("tool", "tool2"):
        for _ in range(1 if kind == "tool" else 2):
            n = next(ids)
            out.append({"type": "function_call", "id": f"fc_{n}", "call_id": f"call_{n}", "name": "exec_command",
                        "arguments": "{}"})
    else:
        out.append({"type": "message", "id": f"msg_{next(ids)}", "role": "assistant",
                    "content": [{"type": "output_text", "text": "a"}]})
    return out


def run_turn(chain: Chain, request: dict[str, Any], output: list[dict[str, Any]], rid: str, ok: bool) -> None:
    turn = chain.begin_turn(request, "{}")
    chain.on_event(turn, {"type": "response.created", "response": {"id": rid}}, 10)
    for item in output:
        chain.on_event(turn, {"type": "response.output_item.done", "item": item}, 10)
    if ok:
        chain.on_event(turn, {"type": "response.completed", "response": {"id": rid, "output": output}}, 10)
    else:
        chain.on_event(turn, {"type": "response.failed", "response": {"id": rid}}, 10)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(STEP, st.booleans()), min_size=1, max_size=12), policy=st.sampled_from(list(Policy)),
       final=STEP)
def test_replay_decisions_agree_with_the_upstream_validator(steps, policy, final):
    chain = Chain(ChainStore())
    ids = itertools.count(1)
    last_id: str | None = None
    pending: list[str] = []  # call_ids of the last response that still need outputs

    def next_input(kind: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = [
            {"type": "function_call_output", "call_id": c, "output": "ok"} for c in pending
        ]
        if kind == "bogus-output":
            items.append({"type": "function_call_output", "call_id": f"call_ghost{next(ids)}", "output": "x"})
        elif kind != "warmup" and not pending:
            items.append({"type": "message", "role": "user", "content": "q"})
        return items

    for kind, reasoning in steps:
        if kind == "bogus-output":
            kind = "text"  # a real client never sends a ghost output on a turn that succeeds
        request: dict[str, Any] = {"type": "response.create", "store": False, "input": next_input(kind)}
        if kind == "warmup":
            request["generate"] = False
            request["input"] = [] if not pending else request["input"]
        if last_id is not None:
            request["previous_response_id"] = last_id
        ok = kind != "fail"
        output = [] if kind == "warmup" else model_output(kind, ids, reasoning)
        rid = f"resp_{next(ids)}"
        run_turn(chain, request, output, rid, ok)
        if ok:
            last_id = rid
            pending = [i["call_id"] for i in output if i["type"] == "function_call"]

    # The upstream dies; the client continues the chain.
    request = {"type": "response.create", "store": False, "input": next_input(final)}
    if last_id is not None:
        request["previous_response_id"] = last_id
    turn = chain.begin_turn(request, "{}")
    decision = decide(Situation(
        trigger=Trigger.CLOSED, policy=policy, attempts=0, max_retries=1, previous_id=turn.previous_id,
        previous_stored=turn.base_store, payload_input=turn.new_items, replay=turn.full_input(),
        client_saw_output=False,
    ))
    replay = turn.full_input()
    assert replay is not None  # every response of this chain was seen
    event(f"{policy.value}: {decision.action.name}")
    if policy is Policy.PAIR_AWARE and final != "bogus-output" and last_id is not None:
        # A well-behaved client's chain is always replayable: anything else is a bug in the kept state.
        assert decision.action is Action.REPLAY, decision.reason
    if decision.action is Action.REPLAY:
        validate(turn.replay_request()["input"], store=False)  # the upstream accepts what we would send
    elif decision.action is Action.SEND:
        assert turn.previous_id is None
    else:
        if policy is Policy.STRICT and decision.error is None:
            assert any(i.get("type") == "function_call_output" for i in replay)
        else:
            try:
                validate(replay, store=False)
            except RequestFailed as e:
                assert "No tool call found" in e.event["error"]["message"]
            else:
                raise AssertionError(f"failed closed on a replay the upstream accepts: {decision.reason}")
