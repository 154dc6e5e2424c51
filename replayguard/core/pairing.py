"""The call_id pairing rule the upstream enforces on an input list.

Every ``*_output`` item must follow the ``*_call`` item it answers (same call_id). A replay that breaks
this rule is rejected by the upstream with "No tool call found for function call output with call_id X.",
so replayguard checks it before it ever writes a replay upstream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

# output item type -> (call item types that satisfy it, key field on the output, key field on the call)
OUTPUT_CALLS: dict[str, tuple[frozenset[str], str, str]] = {
    "function_call_output": (frozenset({"function_call", "local_shell_call"}), "call_id", "call_id"),
    "custom_tool_call_output": (frozenset({"custom_tool_call"}), "call_id", "call_id"),
    "local_shell_call_output": (frozenset({"local_shell_call"}), "call_id", "call_id"),
    "tool_search_output": (frozenset({"tool_search_call"}), "call_id", "call_id"),
    "computer_call_output": (frozenset({"computer_call"}), "call_id", "call_id"),
    "shell_call_output": (frozenset({"shell_call"}), "call_id", "call_id"),
    "apply_patch_call_output": (frozenset({"apply_patch_call"}), "call_id", "call_id"),
    "mcp_approval_response": (frozenset({"mcp_approval_request"}), "approval_request_id", "id"),
}

CALL_TYPES: frozenset[str] = frozenset().union(*(calls for calls, _, _ in OUTPUT_CALLS.values()))


@dataclass(frozen=True, slots=True)
class Orphan:
    """An output item whose call is not earlier in the input."""

    index: int
    item_type: str
    call_id: str


def is_tool_output(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("type"), str) and item["type"] in OUTPUT_CALLS


def find_orphans(items: Iterable[Any]) -> list[Orphan]:
    """Return every output item in ``items`` that has no matching call before it."""
    seen: dict[str, set[str]] = {}  # call item type -> keys seen so far
    orphans: list[Orphan] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if not isinstance(kind, str):  # whatever the upstream makes of it, it is no call and no output
            continue
        if kind in CALL_TYPES:
            key = item.get("id") if kind == "mcp_approval_request" else item.get("call_id")
            if isinstance(key, str):
                seen.setdefault(kind, set()).add(key)
            continue
        rule = OUTPUT_CALLS.get(kind)
        if rule is None:
            continue
        call_types, out_key, _ = rule
        key = item.get(out_key)
        if key is None and kind == "local_shell_call_output":
            key = item.get("id")  # the API schema puts the call's call_id in this output's "id" field
        if not isinstance(key, str) or not any(key in seen.get(t, ()) for t in call_types):
            orphans.append(Orphan(index, kind, str(key)))
    return orphans


def call_ids(items: Iterable[Any]) -> list[str]:
    """call_ids of tool calls and outputs in ``items`` (for logs and traces)."""
    out = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("call_id"), str):
            out.append(item["call_id"])
    return out
