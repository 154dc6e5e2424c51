"""replayguard.core.pairing: the call_id pairing rule, table-driven over every output/call pair."""

from __future__ import annotations

from typing import Any

import pytest

from replayguard.core.pairing import CALL_TYPES, OUTPUT_CALLS, Orphan, call_ids, find_orphans, is_tool_output


def call(kind: str, key: str) -> dict[str, Any]:
    """A call item of ``kind`` identified by ``key`` in the field the pairing rule reads."""
    if kind == "mcp_approval_request":
        return {"type": kind, "id": key, "name": "tool", "server_label": "srv", "arguments": "{}"}
    return {"type": kind, "call_id": key, "id": f"item_{key}"}


def output(kind: str, key: str) -> dict[str, Any]:
    """An output item of ``kind`` answering ``key`` in the field the pairing rule reads."""
    if kind == "mcp_approval_response":
        return {"type": kind, "approval_request_id": key, "approve": True}
    return {"type": kind, "call_id": key, "output": "ok"}


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text}


# Every (output type, call type) pair the upstream accepts: the table below must match OUTPUT_CALLS exactly.
PAIRS = [
    ("function_call_output", "function_call"),
    ("function_call_output", "local_shell_call"),
    ("custom_tool_call_output", "custom_tool_call"),
    ("local_shell_call_output", "local_shell_call"),
    ("tool_search_output", "tool_search_call"),
    ("computer_call_output", "computer_call"),
    ("shell_call_output", "shell_call"),
    ("apply_patch_call_output", "apply_patch_call"),
    ("mcp_approval_response", "mcp_approval_request"),
]
PAIR_IDS = [f"{o}<-{c}" for o, c in PAIRS]


def test_pair_table_matches_output_calls():
    declared = {(out, c) for out, (calls, _, _) in OUTPUT_CALLS.items() for c in calls}
    assert declared == set(PAIRS)
    assert CALL_TYPES == frozenset(c for _, c in PAIRS)
    # key fields: mcp approvals are keyed by the request's id, everything else by call_id
    assert OUTPUT_CALLS["mcp_approval_response"][1:] == ("approval_request_id", "id")
    for out, (_, out_key, call_key) in OUTPUT_CALLS.items():
        if out != "mcp_approval_response":
            assert (out_key, call_key) == ("call_id", "call_id"), out


@pytest.mark.parametrize(("out_kind", "call_kind"), PAIRS, ids=PAIR_IDS)
def test_call_then_output_is_paired(out_kind, call_kind):
    items = [user("hi"), call(call_kind, "k1"), output(out_kind, "k1")]
    assert find_orphans(items) == []


@pytest.mark.parametrize(("out_kind", "call_kind"), PAIRS, ids=PAIR_IDS)
def test_output_alone_is_an_orphan(out_kind, call_kind):
    items = [user("hi"), output(out_kind, "k1")]
    assert find_orphans(items) == [Orphan(1, out_kind, "k1")]


@pytest.mark.parametrize(("out_kind", "call_kind"), PAIRS, ids=PAIR_IDS)
def test_output_before_its_call_is_an_orphan(out_kind, call_kind):
    items = [output(out_kind, "k1"), call(call_kind, "k1")]
    assert find_orphans(items) == [Orphan(0, out_kind, "k1")]


@pytest.mark.parametrize(("out_kind", "call_kind"), PAIRS, ids=PAIR_IDS)
def test_output_with_a_different_key_is_an_orphan(out_kind, call_kind):
    items = [call(call_kind, "k1"), output(out_kind, "k2")]
    assert find_orphans(items) == [Orphan(1, out_kind, "k2")]


# Calls of the wrong type do not satisfy an output, even with the same key.
WRONG_CALL = [
    ("function_call_output", "custom_tool_call"),
    ("function_call_output", "tool_search_call"),
    ("function_call_output", "mcp_approval_request"),
    ("custom_tool_call_output", "function_call"),
    ("custom_tool_call_output", "local_shell_call"),
    ("local_shell_call_output", "function_call"),
    ("tool_search_output", "function_call"),
    ("computer_call_output", "function_call"),
    ("shell_call_output", "local_shell_call"),
    ("apply_patch_call_output", "custom_tool_call"),
    ("mcp_approval_response", "function_call"),
]


@pytest.mark.parametrize(("out_kind", "call_kind"), WRONG_CALL, ids=[f"{o}<-{c}" for o, c in WRONG_CALL])
def test_call_of_another_type_does_not_satisfy(out_kind, call_kind):
    items = [call(call_kind, "k1"), output(out_kind, "k1")]
    assert find_orphans(items) == [Orphan(1, out_kind, "k1")]


def test_mcp_approval_pairs_on_request_id_not_call_id():
    # the approval response names the request's id; a call_id on the request does not count
    request = {"type": "mcp_approval_request", "id": "mcpr_1", "call_id": "other"}
    assert find_orphans([request, {"type": "mcp_approval_response", "approval_request_id": "mcpr_1"}]) == []
    assert find_orphans([request, {"type": "mcp_approval_response", "approval_request_id": "other"}]) == [
        Orphan(1, "mcp_approval_response", "other")
    ]
    # and a function_call_output is not satisfied by the request's id
    assert find_orphans([request, {"type": "function_call_output", "call_id": "mcpr_1"}]) == [
        Orphan(1, "function_call_output", "mcpr_1")
    ]


def test_call_item_id_is_not_its_call_id():
    # function_call items carry both an item id (fc_...) and a call_id; only call_id pairs
    fc = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}"}
    assert find_orphans([fc, output("function_call_output", "call_1")]) == []
    assert find_orphans([fc, output("function_call_output", "fc_1")]) == [Orphan(1, "function_call_output", "fc_1")]


def test_local_shell_call_output_keyed_by_id_as_in_the_api_schema():
    # The published schema gives local_shell_call_output an `id` ("the unique ID of the local shell tool call
    # generated by the model", i.e. the call's call_id) and no call_id field.
    ls = {"type": "local_shell_call", "id": "lsh_1", "call_id": "call_9", "action": {"type": "exec", "command": ["ls"]}}
    assert find_orphans([ls, {"type": "local_shell_call_output", "id": "call_9", "output": "{}"}]) == []
    assert find_orphans([{"type": "local_shell_call_output", "id": "call_9", "output": "{}"}, ls]) == [
        Orphan(0, "local_shell_call_output", "call_9")
    ]
    assert find_orphans([ls, {"type": "local_shell_call_output", "id": "call_8", "output": "{}"}]) == [
        Orphan(1, "local_shell_call_output", "call_8")
    ]


def test_parallel_calls_then_outputs_in_any_order():
    items = [
        user("weather in two cities"),
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "x"},
        call("function_call", "a"),
        call("function_call", "b"),
        call("custom_tool_call", "c"),
        output("function_call_output", "b"),
        output("custom_tool_call_output", "c"),
        output("function_call_output", "a"),
    ]
    assert find_orphans(items) == []


def test_parallel_calls_with_one_output_missing_its_call():
    items = [
        call("function_call", "a"),
        call("function_call", "b"),
        output("function_call_output", "a"),
        output("function_call_output", "b"),
        output("function_call_output", "c"),
        output("custom_tool_call_output", "a"),  # same key, but no custom_tool_call "a"
    ]
    assert find_orphans(items) == [
        Orphan(4, "function_call_output", "c"),
        Orphan(5, "custom_tool_call_output", "a"),
    ]


def test_every_orphan_is_reported_in_input_order_with_its_index():
    items = [output("function_call_output", "x"), user("u"), output("tool_search_output", "y")]
    assert find_orphans(items) == [Orphan(0, "function_call_output", "x"), Orphan(2, "tool_search_output", "y")]


def test_one_call_satisfies_several_outputs():
    # pairing is about order, not counting: a repeated output after its call is not an orphan
    items = [call("function_call", "a"), output("function_call_output", "a"), output("function_call_output", "a")]
    assert find_orphans(items) == []


def test_output_without_key_is_an_orphan():
    assert find_orphans([call("function_call", "a"), {"type": "function_call_output", "output": "x"}]) == [
        Orphan(1, "function_call_output", "None")
    ]


def test_call_with_a_non_string_key_satisfies_nothing():
    items = [{"type": "function_call", "call_id": 7}, {"type": "function_call_output", "call_id": 7}]
    assert find_orphans(items) == [Orphan(1, "function_call_output", "7")]


@pytest.mark.parametrize(
    "junk",
    [None, "function_call_output", 42, 1.5, ["function_call_output"], ("function_call_output", "a"), True],
    ids=["none", "str", "int", "float", "list", "tuple", "bool"],
)
def test_non_dict_items_are_ignored(junk):
    assert find_orphans([junk]) == []
    assert find_orphans([call("function_call", "a"), junk, output("function_call_output", "a")]) == []
    # indexes still count the ignored items
    assert find_orphans([junk, output("function_call_output", "z")]) == [Orphan(1, "function_call_output", "z")]


@pytest.mark.parametrize(
    "item",
    [
        user("hi"),
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x"}]},
        {"type": "reasoning", "summary": []},
        {"type": "web_search_call", "id": "ws_1"},
        {"type": "image_generation_call", "id": "ig_1"},
        {"type": "compaction", "encrypted_content": "x"},
        {"role": "user", "content": "no type"},
        {"type": None},
        {},
    ],
    ids=["user", "assistant", "reasoning", "web_search", "image_gen", "compaction", "untyped", "type-none", "empty"],
)
def test_items_that_are_neither_calls_nor_outputs(item):
    assert not is_tool_output(item)
    assert find_orphans([item]) == []


def test_find_orphans_accepts_any_iterable():
    gen = (i for i in [output("function_call_output", "g")])
    assert find_orphans(gen) == [Orphan(0, "function_call_output", "g")]
    assert find_orphans([]) == []


@pytest.mark.parametrize("kind", sorted(OUTPUT_CALLS))
def test_is_tool_output_true_for_every_output_type(kind):
    assert is_tool_output({"type": kind})
    assert is_tool_output(output(kind, "k"))


@pytest.mark.parametrize("kind", sorted(CALL_TYPES))
def test_is_tool_output_false_for_calls(kind):
    assert not is_tool_output(call(kind, "k"))


@pytest.mark.parametrize("value", [None, "function_call_output", ["function_call_output"], 3])
def test_is_tool_output_false_for_non_dicts(value):
    assert not is_tool_output(value)


def test_call_ids_lists_calls_and_outputs_in_order():
    items = [
        user("u"),
        call("function_call", "a"),
        {"type": "function_call_output", "call_id": "a"},
        {"type": "mcp_approval_request", "id": "m"},  # no call_id
        {"type": "function_call", "call_id": 5},  # not a string
        "junk",
        call("custom_tool_call", "c"),
    ]
    assert call_ids(items) == ["a", "a", "c"]


def test_orphan_is_frozen():
    o = Orphan(0, "function_call_output", "a")
    with pytest.raises(AttributeError):
        o.index = 1  # type: ignore[misc]
