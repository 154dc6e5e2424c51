"""replayguard.core.chain: the replay state of Responses chains, fed the events a real upstream sends (no I/O)."""

from __future__ import annotations

import json
import weakref
from typing import Any

import pytest

from replayguard.core.chain import (
    Chain,
    ChainStore,
    Node,
    RequestError,
    ResponseRecord,
    Turn,
    TurnResult,
    materialize,
    normalize_input,
    resolves,
)

Item = dict[str, Any]
P = "principal-1"  # the credentials fingerprint of the client in these tests (one client across its flows)


# -- helpers -------------------------------------------------------------------------------------------
def user(text: str) -> Item:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def assistant(text: str, item_id: str | None = None) -> Item:
    return {
        "type": "message",
        "role": "assistant",
        "id": item_id or f"msg_{text}",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def reasoning(tag: str) -> Item:
    return {"type": "reasoning", "id": f"rs_{tag}", "summary": [], "encrypted_content": f"enc-{tag}"}


def fcall(call_id: str, name: str = "exec_command") -> Item:
    return {"type": "function_call", "id": f"fc_{call_id}", "call_id": call_id, "name": name, "arguments": "{}"}


def fout(call_id: str, out: str = "ok") -> Item:
    return {"type": "function_call_output", "call_id": call_id, "output": out}


def request(input: Any = None, previous: str | None = None, store: bool | None = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "response.create", "model": "gpt-5", "instructions": "be brief"}
    if store is not None:
        body["store"] = store
    if input is not None:
        body["input"] = input
    if previous is not None:
        body["previous_response_id"] = previous
    body.update(extra)
    return body


# The chain no longer tracks the turn in flight or the connection's cache (the protocol core does, per lane and per
# connection): these helpers stand in for it, the way the core uses the chain on one lane and one connection.
_turns: weakref.WeakKeyDictionary[Chain, Turn] = weakref.WeakKeyDictionary()
_cache: weakref.WeakKeyDictionary[Chain, str | None] = weakref.WeakKeyDictionary()


def begin(chain: Chain, body: dict[str, Any], raw: str | None = None) -> Turn:
    turn = chain.begin_turn(body, json.dumps(body) if raw is None else raw)
    _turns[chain] = turn
    return turn


def feed(chain: Chain, event: dict[str, Any], size: int | None = None) -> TurnResult | None:
    turn = _turns.get(chain)
    if turn is None:
        return None
    result = chain.on_event(turn, event, len(json.dumps(event)) if size is None else size)
    if result is not None:
        del _turns[chain]
        _cache[chain] = turn.response_id if result.ok else None
    return result


def cached(chain: Chain) -> str | None:
    return _cache.get(chain)


def needs_rewrite(chain: Chain, turn: Turn) -> bool:
    held = cached(chain)
    return not resolves(turn, [held] if held else [])


def connection_reset(chain: Chain) -> None:
    _cache[chain] = None


def in_flight(chain: Chain) -> Turn | None:
    return _turns.get(chain)


def abort(chain: Chain) -> Turn | None:
    turn = _turns.pop(chain, None)
    if turn is not None:
        chain.abort(turn)
        _cache[chain] = None
    return turn


def respond(
    chain: Chain,
    response_id: str | None,
    outputs: list[Item],
    terminal: str = "response.completed",
    via_done: bool = True,
    completed_output: list[Any] | None = None,
) -> TurnResult:
    """Feed the events of one response as the upstream streams them; return the terminal result."""
    seq = iter(range(1000))
    if response_id is not None:
        assert feed(chain, {"type": "response.created", "sequence_number": next(seq),
                            "response": {"id": response_id, "status": "in_progress", "output": []}}) is None
        assert feed(chain, {"type": "response.in_progress", "sequence_number": next(seq),
                            "response": {"id": response_id}}) is None
    if via_done:
        for index, item in enumerate(outputs):
            assert feed(chain, {"type": "response.output_item.added", "output_index": index,
                                "item": {**item, "status": "in_progress"}, "sequence_number": next(seq)}) is None
            assert feed(chain, {"type": "response.output_text.delta", "output_index": index, "delta": "x",
                                "sequence_number": next(seq)}) is None
            assert feed(chain, {"type": "response.output_item.done", "output_index": index, "item": item,
                                "sequence_number": next(seq)}) is None
    response: dict[str, Any] = {"status": terminal.split(".")[-1]}
    if response_id is not None:
        response["id"] = response_id
    response["output"] = completed_output if completed_output is not None else outputs
    if terminal == "error":
        event: dict[str, Any] = {"type": "error", "status": 500,
                                 "error": {"type": "server_error", "code": None, "message": "boom", "param": None}}
    else:
        event = {"type": terminal, "response": response, "sequence_number": next(seq)}
    result = feed(chain, event)
    assert result is not None, "a terminal event must end the turn"
    return result


def turn(chain: Chain, body: dict[str, Any], response_id: str | None, outputs: list[Item], **kw: Any) -> TurnResult:
    begin(chain, body)
    return respond(chain, response_id, outputs, **kw)


def new_chain(**kw: Any) -> Chain:
    return Chain(ChainStore(), **{"principal": P, **kw})


# -- input normalisation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, []),
        ("hello", [{"type": "message", "role": "user", "content": "hello"}]),
        ("", [{"type": "message", "role": "user", "content": ""}]),
        ([], []),
        ([{"type": "message", "role": "user", "content": "x"}], [{"type": "message", "role": "user", "content": "x"}]),
    ],
    ids=["none", "string", "empty-string", "empty-list", "list"],
)
def test_normalize_input(value, expected):
    assert normalize_input(value) == expected


@pytest.mark.parametrize("value", [42, {"type": "message"}, 1.5, True], ids=["int", "dict", "float", "bool"])
def test_normalize_input_rejects_other_types(value):
    with pytest.raises(RequestError, match="input must be a string or a list"):
        normalize_input(value)
    chain = new_chain()
    with pytest.raises(RequestError):
        begin(chain, request(value), "{}")
    assert in_flight(chain) is None


@pytest.mark.parametrize("previous", [123, ["resp_1"], {"id": "resp_1"}])
def test_previous_response_id_must_be_a_string(previous):
    with pytest.raises(RequestError, match="previous_response_id must be a string"):
        new_chain().begin_turn(request([user("x")], previous=previous), "{}")


def test_string_input_is_one_user_message_in_the_chain():
    chain = new_chain()
    result = turn(chain, request("hello"), "resp_1", [assistant("hi")])
    assert result.ok
    assert result.turn.new_items == [{"type": "message", "role": "user", "content": "hello"}]
    t2 = begin(chain, request("again", previous="resp_1"), "")
    assert t2.full_input() == [
        {"type": "message", "role": "user", "content": "hello"},
        assistant("hi"),
        {"type": "message", "role": "user", "content": "again"},
    ]
    assert t2.replay_request()["input"] == t2.full_input()


# -- a text chain ----------------------------------------------------------------------------------------
def test_three_turn_store_false_chain_builds_full_input():
    chain = new_chain()
    u1, u2, u3 = user("one"), user("two"), user("three")
    out1 = [reasoning("1"), assistant("a1")]
    out2 = [reasoning("2"), assistant("a2")]

    r1 = turn(chain, request([u1]), "resp_1", out1)
    assert r1.ok and r1.evicted_bytes == 0 and r1.evicted_records == 0
    assert r1.turn.number == 1 and r1.turn.status == "completed" and r1.turn.response_id == "resp_1"
    assert r1.turn.outputs == out1
    assert chain.head is not None and chain.head.response_id == "resp_1" and chain.head.complete
    assert materialize(chain.head.history) == [u1, *out1]
    assert cached(chain) == "resp_1"

    body2 = request([u2], previous="resp_1", tools=[{"type": "function", "name": "f"}], reasoning={"effort": "low"})
    t2 = begin(chain, body2, json.dumps(body2))
    assert t2.number == 2 and t2.base_known and not t2.base_store and not t2.client_sent_full
    assert t2.new_items == [u2]
    assert t2.full_input() == [u1, *out1, u2]
    assert not needs_rewrite(chain, t2)  # the upstream connection holds resp_1
    replay = t2.replay_request()
    assert "previous_response_id" not in replay
    assert replay["input"] == [u1, *out1, u2]
    assert {k: v for k, v in replay.items() if k != "input"} == {
        k: v for k, v in body2.items() if k not in ("input", "previous_response_id")
    }
    assert body2["previous_response_id"] == "resp_1" and body2["input"] == [u2]  # request not mutated
    r2 = respond(chain, "resp_2", out2)
    assert r2.ok and chain.head.response_id == "resp_2" and cached(chain) == "resp_2"

    t3 = begin(chain, request([u3], previous="resp_2"), "")
    assert t3.full_input() == [u1, *out1, u2, *out2, u3]
    assert t3.replay_request()["input"] == [u1, *out1, u2, *out2, u3]
    r3 = respond(chain, "resp_3", [assistant("a3")])
    assert materialize(chain.head.history) == [u1, *out1, u2, *out2, u3, assistant("a3")]
    assert chain.completed == 3 and chain.failed == 0
    assert len(chain.store) == 3 and chain.store.get("resp_1", P) is not None
    assert r3.turn.number == 3


def test_tool_round_trip_chain():
    chain = new_chain()
    turn(chain, request([user("ls")]), "resp_1", [reasoning("1"), fcall("call_a"), fcall("call_b")])
    t2 = begin(chain, request([fout("call_a"), fout("call_b")], previous="resp_1"), "")
    assert t2.full_input() == [user("ls"), reasoning("1"), fcall("call_a"), fcall("call_b"),
                               fout("call_a"), fout("call_b")]


def test_outputs_come_from_output_item_done_in_order_not_from_completed():
    chain = new_chain()
    done_order = [reasoning("1"), fcall("c1"), assistant("a")]
    # response.completed lists them differently: the streamed .done order wins when it exists
    result = turn(chain, request([user("q")]), "resp_1", done_order,
                  completed_output=[assistant("a"), fcall("c1"), reasoning("1"), assistant("extra")])
    assert result.turn.outputs == done_order
    assert materialize(chain.head.history) == [user("q"), *done_order]


def test_output_item_added_and_non_dict_done_items_are_not_outputs():
    chain = new_chain()
    begin(chain, request([user("q")]), "")
    feed(chain, {"type": "response.created", "response": {"id": "resp_1"}})
    feed(chain, {"type": "response.output_item.added", "item": assistant("partial")})
    feed(chain, {"type": "response.output_item.done", "item": "not a dict"})
    feed(chain, {"type": "response.output_item.done"})
    feed(chain, {"type": "response.output_item.done", "item": assistant("real")})
    result = feed(chain, {"type": "response.completed", "response": {"id": "resp_1", "output": []}})
    assert result is not None and result.ok
    assert result.turn.outputs == [assistant("real")]


def test_completed_without_output_item_done_uses_response_output():
    chain = new_chain()
    outputs = [reasoning("1"), assistant("a")]
    result = turn(chain, request([user("q")]), "resp_1", [], via_done=False,
                  completed_output=[outputs[0], "junk", outputs[1], None])
    assert result.ok
    assert result.turn.outputs == outputs  # non-dict entries dropped
    assert result.turn.output_size > 0
    assert materialize(chain.head.history) == [user("q"), *outputs]


def test_completed_carries_the_id_when_created_was_not_seen():
    chain = new_chain()
    begin(chain, request([user("q")]), "")
    result = feed(chain, {"type": "response.completed", "response": {"id": "resp_late", "output": [assistant("a")]}})
    assert result is not None and result.ok
    assert chain.head.response_id == "resp_late" and cached(chain) == "resp_late"


def test_completed_without_any_response_id_is_not_ok():
    chain = new_chain()
    begin(chain, request([user("q")]), "")
    result = feed(chain, {"type": "response.completed", "response": {"output": [assistant("a")]}})
    assert result is not None and not result.ok
    assert chain.head is None and len(chain.store) == 0 and chain.failed == 1


# -- warm-ups --------------------------------------------------------------------------------------------
def test_generate_false_warm_up_then_continuation_on_the_warm_up_id():
    chain = new_chain()
    warm = request([], generate=False)
    result = turn(chain, warm, "resp_warm", [])
    assert result.ok and result.turn.generate is False
    assert chain.head.response_id == "resp_warm" and chain.head.complete
    assert chain.head.history is not None and chain.head.history.length == 0
    assert cached(chain) == "resp_warm"

    t = begin(chain, request([user("go")], previous="resp_warm"), "")
    assert t.generate is True and t.base_known
    assert t.full_input() == [user("go")]
    assert not needs_rewrite(chain, t)
    connection_reset(chain)
    assert needs_rewrite(chain, t)
    replay = t.replay_request()
    assert replay["input"] == [user("go")] and "previous_response_id" not in replay and "generate" not in replay
    respond(chain, "resp_1", [assistant("done")])
    assert materialize(chain.head.history) == [user("go"), assistant("done")]


def test_codex_turn_pattern_warm_up_chained_on_previous_then_empty_input():
    """Codex: turn 2 warms up on resp_1 with no items, then chains the real request on the warm-up."""
    chain = new_chain()
    turn(chain, request([user("q1")]), "resp_1", [assistant("a1")])
    hist1 = chain.head.history
    turn(chain, request([], previous="resp_1", generate=False), "resp_w2", [])
    assert chain.head.response_id == "resp_w2"
    assert chain.head.history is hist1  # no items: the warm-up shares resp_1's node
    t = begin(chain, request([user("q2")], previous="resp_w2"), "")
    assert t.full_input() == [user("q1"), assistant("a1"), user("q2")]
    respond(chain, "resp_2", [assistant("a2")])
    t = begin(chain, request([], previous="resp_2"), "")
    assert t.full_input() == [user("q1"), assistant("a1"), user("q2"), assistant("a2")]


# -- a client that resends its full history ------------------------------------------------------------
def test_full_history_without_previous_id_is_recognised_as_prefix():
    chain = new_chain()
    u1, a1, u2 = user("one"), assistant("a1"), user("two")
    turn(chain, request([u1]), "resp_1", [a1])
    hist = chain.head.history
    full = [u1, a1, u2]
    body = request(full)
    t = begin(chain, body, json.dumps(body))
    assert t.client_sent_full is True
    assert t.previous_id is None
    assert t.new_items == [u2]  # only the delta is stored
    assert t.base is hist  # on top of the known history, not a copy
    assert t.full_input() == full
    assert t.replay_request() == body  # identical to what the client sent (no previous id to drop)
    assert not needs_rewrite(chain, t)
    respond(chain, "resp_2", [assistant("a2")])
    assert chain.head.history.parent is hist
    assert chain.head.history.items == (u2, assistant("a2"))


def test_full_history_equal_to_the_known_history_has_no_new_items():
    chain = new_chain()
    turn(chain, request([user("one")]), "resp_1", [assistant("a1")])
    t = begin(chain, request([user("one"), assistant("a1")]), "")
    assert t.client_sent_full and t.new_items == []
    assert t.full_input() == [user("one"), assistant("a1")]


@pytest.mark.parametrize(
    "sent",
    [
        [user("ONE"), assistant("a1"), user("two")],  # the first item differs
        [user("one"), assistant("other"), user("two")],  # an output differs
        [user("one")],  # shorter than the history
        [assistant("a1"), user("one"), user("two")],  # reordered
        [user("two")],  # a new conversation
    ],
    ids=["first-differs", "output-differs", "shorter", "reordered", "new-conversation"],
)
def test_input_that_does_not_start_with_the_history_is_taken_whole(sent):
    chain = new_chain()
    turn(chain, request([user("one")]), "resp_1", [assistant("a1")])
    t = begin(chain, request(sent), "")
    assert t.client_sent_full is False
    assert t.base is None and t.base_known
    assert t.new_items == sent and t.full_input() == sent


def test_no_prefix_detection_without_a_head():
    t = new_chain().begin_turn(request([user("one")]), "")
    assert not t.client_sent_full and t.base is None and t.full_input() == [user("one")]


# -- store=true and needs_rewrite ----------------------------------------------------------------------------
def test_store_true_previous_marks_base_store_and_never_needs_rewrite():
    chain = new_chain()
    result = turn(chain, request([user("q")], store=True), "resp_1", [assistant("a")])
    assert result.turn.store is True and chain.head.store is True
    t = begin(chain, request([user("q2")], previous="resp_1", store=True), "")
    assert t.base_store is True
    assert not needs_rewrite(chain, t)
    connection_reset(chain)
    assert not needs_rewrite(chain, t)  # stored server-side: any connection resolves it
    other = Chain(chain.store, principal=P)  # another flow, empty connection cache
    assert not needs_rewrite(other, begin(other, request([user("q2")], previous="resp_1"), ""))


@pytest.mark.parametrize(("store_field", "expected"), [(None, True), (True, True), (False, False)],
                         ids=["default", "true", "false"])
def test_store_defaults_to_true(store_field, expected):
    chain = new_chain()
    turn(chain, request([user("q")], store=store_field), "resp_1", [assistant("a")])
    assert chain.head.store is expected
    t = begin(chain, request([user("q2")], previous="resp_1"), "")
    assert t.base_store is expected
    connection_reset(chain)
    assert needs_rewrite(chain, t) is (not expected)


def test_needs_rewrite_only_when_previous_is_not_the_cached_response():
    chain = new_chain()
    turn(chain, request([user("q1")]), "resp_1", [assistant("a1")])
    turn(chain, request([user("q2")], previous="resp_1"), "resp_2", [assistant("a2")])
    assert cached(chain) == "resp_2"
    assert not needs_rewrite(chain, begin(chain, request([user("fresh")]), ""))  # no previous id
    assert not needs_rewrite(chain, begin(chain, request([user("q3")], previous="resp_2"), ""))
    # a branch from an older response of the same chain is not in the connection's cache
    older = begin(chain, request([user("q3")], previous="resp_1"), "")
    assert needs_rewrite(chain, older)
    assert older.full_input() == [user("q1"), assistant("a1"), user("q3")]
    t = begin(chain, request([user("q3")], previous="resp_2"), "")
    connection_reset(chain)
    assert cached(chain) is None
    assert needs_rewrite(chain, t)


def test_an_incomplete_response_joins_the_chain():
    """The upstream keeps an incomplete response (max_output_tokens, steered) with the output it got to: a client
    may continue it, so a replay must carry it."""
    chain = new_chain()
    turn(chain, request([user("q1")]), "resp_1", [assistant("a1")])
    result = turn(chain, request([user("q2")], previous="resp_1"), "resp_cut", [assistant("partial")],
                  terminal="response.incomplete")
    assert result.ok and result.turn.status == "response.incomplete"
    assert chain.head.response_id == "resp_cut" and cached(chain) == "resp_cut"
    assert chain.completed == 1 and chain.failed == 0  # not completed, not failed either
    after = begin(chain, request([user("q3")], previous="resp_cut"), "")
    assert after.full_input() == [user("q1"), assistant("a1"), user("q2"), assistant("partial"), user("q3")]


@pytest.mark.parametrize("terminal", ["response.failed", "error"])
def test_failed_turn_does_not_advance_head_and_clears_the_cache(terminal):
    chain = new_chain()
    turn(chain, request([user("q1")]), "resp_1", [assistant("a1")])
    head = chain.head
    result = turn(chain, request([user("q2")], previous="resp_1"), "resp_bad", [assistant("partial")],
                  terminal=terminal)
    assert not result.ok and result.evicted_bytes == 0
    assert result.turn.status == terminal
    assert in_flight(chain) is None
    assert chain.head is head and chain.head.response_id == "resp_1"
    assert chain.store.get("resp_bad", P) is None and len(chain.store) == 1
    assert cached(chain) is None  # the upstream evicts the referenced response after an error
    assert chain.completed == 1 and chain.failed == 1
    # the client's retry of the same continuation needs a rewrite, and its history is intact
    retry = begin(chain, request([user("q2")], previous="resp_1"), "")
    assert needs_rewrite(chain, retry)
    assert retry.full_input() == [user("q1"), assistant("a1"), user("q2")]
    respond(chain, "resp_2", [assistant("a2")])
    assert materialize(chain.head.history) == [user("q1"), assistant("a1"), user("q2"), assistant("a2")]


def test_abort_turn():
    chain = new_chain()
    assert abort(chain) is None
    turn(chain, request([user("q1")]), "resp_1", [assistant("a1")])
    t = begin(chain, request([user("q2")], previous="resp_1"), "")
    assert abort(chain) is t
    assert t.status == "aborted" and in_flight(chain) is None and cached(chain) is None and chain.failed == 1
    assert chain.head.response_id == "resp_1"
    assert feed(chain, {"type": "response.completed", "response": {"id": "resp_x"}}, 10) is None


def test_events_without_a_turn_are_ignored():
    chain = new_chain()
    for event in ({"type": "response.created", "response": {"id": "r"}},
                  {"type": "response.output_item.done", "item": assistant("a")},
                  {"type": "response.completed", "response": {"id": "r"}},
                  {"type": "error"}):
        assert feed(chain, event, 1) is None
    assert chain.head is None and chain.completed == 0 and chain.failed == 0


# -- unknown history -------------------------------------------------------------------------------------
def test_unknown_previous_response_id():
    chain = new_chain()
    t = begin(chain, request([user("q")], previous="resp_never_seen"), "")
    assert t.base_known is False and t.base is None and t.base_store is False
    assert t.full_input() is None
    assert needs_rewrite(chain, t)
    with pytest.raises(RequestError, match="not known"):
        t.replay_request()
    # the upstream answers it (its own connection had it): the record is kept but not replayable
    result = respond(chain, "resp_1", [assistant("a")])
    assert result.ok and result.evicted_bytes == 0
    assert chain.head.response_id == "resp_1" and chain.head.complete is False and chain.head.history is None
    t2 = begin(chain, request([user("q2")], previous="resp_1"), "")
    assert t2.base_known is False and t2.full_input() is None
    # an incomplete head disables prefix detection: a full resend is taken whole
    t3 = begin(chain, request([user("q"), assistant("a"), user("q3")]), "")
    assert not t3.client_sent_full and t3.full_input() == [user("q"), assistant("a"), user("q3")]


# -- ChainStore --------------------------------------------------------------------------------------------
def record(rid: str) -> ResponseRecord:
    return ResponseRecord(rid, None, store=False)


def test_chain_store_lru_bound_and_evicted_counter():
    store = ChainStore(max_records=2)
    assert store.put(record("a")) == 0
    assert store.put(record("b")) == 0
    assert store.get("a") is not None  # a becomes most recently used
    assert store.put(record("c")) == 1  # evicts b, the least recently used
    assert store.get("b") is None
    assert store.get("a") is not None and store.get("c") is not None
    assert len(store) == 2 and store.evicted == 1
    assert store.put(record("d")) == 1  # evicts a (c was used after it)
    assert store.get("a") is None and store.evicted == 2
    store.put(record("c"))  # re-putting an id replaces it without eviction
    assert len(store) == 2 and store.evicted == 2
    store.clear()
    assert len(store) == 0 and store.get("c") is None


def test_chain_reports_store_evictions_and_keeps_its_head():
    store = ChainStore(max_records=1)
    a, b = Chain(store, principal=P), Chain(store, principal=P)
    r1 = turn(a, request([user("qa")]), "resp_a", [assistant("xa")])
    assert r1.evicted_records == 0
    r2 = turn(b, request([user("qb")]), "resp_b", [assistant("xb")])
    assert r2.evicted_records == 1 and store.evicted == 1
    assert store.get("resp_a", P) is None
    # flow a still continues from its own head
    t = begin(a, request([user("qa2")], previous="resp_a"), "")
    assert t.base_known and t.full_input() == [user("qa"), assistant("xa"), user("qa2")]
    # but another flow cannot resume resp_a any more
    c = Chain(store, principal=P)
    assert begin(c, request([user("qa2")], previous="resp_a"), "").full_input() is None


def test_second_chain_sharing_the_store_resumes_by_response_id():
    store = ChainStore()
    first = Chain(store, principal=P)
    turn(first, request([user("q1")]), "resp_1", [reasoning("1"), fcall("call_1")])
    turn(first, request([fout("call_1")], previous="resp_1"), "resp_2", [assistant("done")])
    expected = [user("q1"), reasoning("1"), fcall("call_1"), fout("call_1"), assistant("done")]

    second = Chain(store, principal=P)  # the client reconnected: a new flow
    assert second.head is None and cached(second) is None
    t = begin(second, request([user("q3")], previous="resp_2"), "")
    assert t.base_known and t.base is first.head.history
    assert t.full_input() == [*expected, user("q3")]
    assert needs_rewrite(second, t)  # the new upstream connection does not hold resp_2
    assert t.replay_request()["input"] == [*expected, user("q3")]
    respond(second, "resp_3", [assistant("a3")])
    assert cached(second) == "resp_3"
    assert second.head.history.parent is first.head.history
    # an older response of the first flow is resumable too
    t_old = Chain(store, principal=P).begin_turn(request([user("x")], previous="resp_1"), "")
    assert t_old.full_input() == [user("q1"), reasoning("1"), fcall("call_1"), user("x")]


def test_a_chain_resumes_only_for_the_principal_that_made_it():
    store = ChainStore()
    first = Chain(store, principal="alice")
    turn(first, request([user("secret")]), "resp_1", [assistant("noted")])
    other = Chain(store, principal="mallory")
    t = begin(other, request([user("what was it?")], previous="resp_1"), "")
    assert not t.base_known and t.full_input() is None  # as if the id were unknown: nothing of alice's
    assert "resp_1" not in other.response_ids  # and not adopted (retired on alice's schedule, not mallory's)
    assert store.get("resp_1", "mallory") is None and store.get("resp_1") is None  # anonymous is a principal too
    again = Chain(store, principal="alice")
    assert begin(again, request([user("go on")], previous="resp_1"), "").full_input() == [
        user("secret"), assistant("noted"), user("go on")]


def test_a_session_without_credentials_is_a_principal_of_its_own():
    """Nothing says two sessions without credentials are the same client: neither resumes the other's chain."""
    store = ChainStore()
    first = Chain(store)
    turn(first, request([user("secret")]), "resp_1", [assistant("noted")])
    assert begin(first, request([user("more")], previous="resp_1"), "").base_known  # its own chain: as always
    for other in (Chain(store), Chain(store, principal="")):
        assert begin(other, request([user("what was it?")], previous="resp_1"), "").full_input() is None
    assert store.get("resp_1") is None and store.get("resp_1", first.principal) is not None


def test_principal_fingerprints_are_keyed_and_cover_organisation_and_project():
    from replayguard.core.redact import principal

    key = b"k" * 32
    base = [("Authorization", "Bearer sk-a"), ("OpenAI-Beta", "x")]
    assert principal(base, key) == principal([("authorization", "Bearer sk-a")], key)  # names are case-insensitive
    assert principal(base, key) != principal([("Authorization", "Bearer sk-b")], key)
    assert principal(base, key) != principal(base + [("OpenAI-Organization", "org-2")], key)
    assert principal(base, key) != principal(base + [("OpenAI-Project", "proj-2")], key)
    assert principal(base, key) != principal(base, b"another process's key")
    assert "sk-a" not in principal(base, key) and principal([("OpenAI-Beta", "x")], key) == ""


# -- max_chain_bytes -------------------------------------------------------------------------------------
def test_max_chain_bytes_evicts_the_history():
    chain = new_chain(max_chain_bytes=3000)
    r1 = turn(chain, request([user("q1")]), "resp_1", [assistant("a1")])
    assert r1.ok and r1.evicted_bytes == 0 and chain.head.complete
    small_total = chain.head.history.total_size
    assert 0 < small_total < 3000
    big = user("x" * 4000)
    r2 = turn(chain, request([big], previous="resp_1"), "resp_2", [assistant("a2")])
    assert r2.ok  # the turn itself completed; only its history is dropped
    assert r2.evicted_bytes > 3000
    rec = chain.store.get("resp_2", P)
    assert rec is chain.head and rec.complete is False and rec.history is None
    t3 = begin(chain, request([user("q3")], previous="resp_2"), "")
    assert t3.base_known is False and t3.full_input() is None
    with pytest.raises(RequestError):
        t3.replay_request()
    r3 = respond(chain, "resp_3", [assistant("a3")])
    assert r3.evicted_bytes == 0 and chain.head.complete is False  # stays unknown, nothing more to evict
    # resp_1 is still replayable
    assert begin(chain, request([user("b")], previous="resp_1"), "").full_input() == [
        user("q1"), assistant("a1"), user("b")
    ]


def test_history_size_counts_the_request_and_the_outputs():
    chain = new_chain()
    body = request([user("q1")])
    raw = json.dumps(body)
    begin(chain, body, raw)
    done = {"type": "response.output_item.done", "item": assistant("a1")}
    feed(chain, done, 500)
    feed(chain, {"type": "response.completed", "response": {"id": "resp_1"}}, 77)
    node = chain.head.history
    assert node.size == len(raw) + 500 and node.total_size == len(raw) + 500
    # a full resend: the known prefix is not counted again, only the new items (as JSON) and the outputs
    body2 = request([user("q1"), assistant("a1"), user("q2")])
    t2 = begin(chain, body2, json.dumps(body2))
    assert t2.client_sent_full
    feed(chain, {"type": "response.output_item.done", "item": assistant("a2")}, 300)
    feed(chain, {"type": "response.completed", "response": {"id": "resp_2"}}, 77)
    node2 = chain.head.history
    assert node2.parent is node
    assert node2.size == len(json.dumps([user("q2")])) + 300
    assert node2.total_size == node.total_size + node2.size


def test_full_history_resends_are_not_counted_twice():
    """A client that resends its whole history every turn must not have the prefix counted again each time."""
    limit = 60_000
    chain = new_chain(max_chain_bytes=limit)
    history: list[Item] = []
    for n in range(12):
        sent = [*history, user(f"{n}" * 1000)]
        body = request(sent)
        result = turn(chain, body, f"resp_{n}", [assistant(f"{n}" * 1000, item_id=f"msg_{n}")])
        assert result.ok
        assert result.evicted_bytes == 0, f"turn {n}: history of {len(json.dumps(sent))} bytes evicted"
        if n:
            assert result.turn.client_sent_full
        history = materialize(chain.head.history)
    assert len(history) == 24
    assert chain.head.complete
    assert chain.head.history.total_size < limit
    assert len(json.dumps(history)) < chain.head.history.total_size * 2


# -- Node sharing ----------------------------------------------------------------------------------------
def test_turns_share_history_nodes_instead_of_copying():
    chain = new_chain()
    turn(chain, request([user("q1")]), "resp_1", [assistant("a1")])
    n1 = chain.head.history
    t2 = begin(chain, request([user("q2")], previous="resp_1"), "")
    assert t2.base is n1  # the turn points at the history, it does not copy it
    respond(chain, "resp_2", [assistant("a2")])
    n2 = chain.head.history
    assert n2.parent is n1
    assert n2.items == (user("q2"), assistant("a2"))  # only this turn's items
    assert n1.length == 2 and n2.length == 4
    assert n2.total_size == n1.total_size + n2.size
    # two branches from the same response share the parent node
    turn(chain, request([user("b")], previous="resp_1"), "resp_b", [assistant("ab")])
    nb = chain.head.history
    assert nb.parent is n1 and nb is not n2
    assert materialize(n2) == [user("q1"), assistant("a1"), user("q2"), assistant("a2")]
    assert materialize(nb) == [user("q1"), assistant("a1"), user("b"), assistant("ab")]
    assert chain.store.get("resp_1", P).history is n1


def test_node_extend():
    root = Node.extend(None, [user("a")], 10)
    assert root is not None and root.parent is None and root.items == (user("a"),)
    assert (root.size, root.total_size, root.length) == (10, 10, 1)
    assert Node.extend(root, [], 5) is root  # nothing new: the same node
    empty = Node.extend(None, [], 3)
    assert empty is not None and empty.length == 0 and materialize(empty) == []
    child = Node.extend(root, [user("b"), user("c")], 7)
    assert child.parent is root and (child.size, child.total_size, child.length) == (7, 17, 3)
    assert child.materialize() == [user("a"), user("b"), user("c")]
    assert materialize(None) == []


def test_turn_numbers_count_up():
    chain = new_chain()
    numbers = [begin(chain, request([user(str(i))]), "").number for i in range(4)]
    assert numbers == [1, 2, 3, 4]


# -- resume TTL: the state of an ended session is freed -----------------------------------------------
def test_retired_records_are_freed_after_the_deadline_only():
    store = ChainStore()
    chain = Chain(store, principal=P)
    turn(chain, request([user("a")]), "resp_1", [assistant("x")])
    turn(chain, request([user("b")], previous="resp_1"), "resp_2", [assistant("y")])
    assert chain.response_ids == ["resp_1", "resp_2"]
    store.retire(chain.response_ids, deadline=100.0)
    assert store.retired == 2 and store.sweep(99.9) == 0 and len(store) == 2
    assert store.sweep(100.0) == 2 and len(store) == 0 and store.expired == 2
    assert store.get("resp_2", P) is None


def test_a_resumed_chain_is_adopted_and_not_freed():
    store = ChainStore()
    old = Chain(store, principal=P)
    turn(old, request([user("a")]), "resp_1", [assistant("x")])
    turn(old, request([user("b")], previous="resp_1"), "resp_2", [assistant("y")])
    store.retire(old.response_ids, deadline=10.0)
    new = Chain(store, principal=P)  # the client reconnected with its last id before the TTL ran out
    t = begin(new, request([user("c")], previous="resp_2"), "{}")
    assert t.base_known and new.response_ids == ["resp_2"]
    assert store.sweep(11.0) == 1  # resp_1 is freed; resp_2 was adopted
    assert store.get("resp_2", P) is not None and store.get("resp_1", P) is None
    # The adopted record's history (including resp_1's turn) is still whole: replay needs it.
    assert [i["content"][0]["text"] for i in t.full_input() if i.get("role") == "user"] == ["a", "b", "c"]


def test_freed_chain_releases_its_history_nodes():
    import gc
    import weakref

    store = ChainStore()
    chain = Chain(store, principal=P)
    for n in range(5):
        turn(chain, request([user(str(n))], previous=f"resp_{n}" if n else None), f"resp_{n + 1}", [assistant("ok")])
    assert chain.head is not None and chain.head.history is not None
    node = weakref.ref(chain.head.history)
    first = weakref.ref(store.get("resp_1", P).history)
    ids = chain.response_ids
    del chain
    gc.collect()
    assert node() is not None  # still resumable
    store.retire(ids, deadline=0.0)
    store.sweep(0.0)
    gc.collect()
    assert node() is None and first() is None and len(store) == 0


def test_lru_eviction_forgets_the_deadline_too():
    store = ChainStore(max_records=1)
    chain = Chain(store, principal=P)
    turn(chain, request([user("a")]), "resp_1", [assistant("x")])
    store.retire(["resp_1", "resp_unknown"], deadline=5.0)
    assert store.retired == 1
    turn(chain, request([user("b")], previous="resp_1"), "resp_2", [assistant("y")])
    assert store.retired == 0 and len(store) == 1
