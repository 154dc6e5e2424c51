"""Chain trace records: what the trace writes for every event that matters in a session, and how it is read back.

Records (``event`` field; every record also has ``ts`` (Unix seconds) and ``session`` (the mitmproxy flow id)):

- ``session.start``  url, client
- ``handshake``      conn, url, purpose (open/reconnect/recovery), ok, status, ms, headers (redacted),
                     response_headers, error
- ``turn.start``     turn, conn, model, store, generate, previous_response_id, input (item summaries), bytes,
                     rewritten (the request was rebuilt from the chain state), body (with trace.bodies=full)
- ``turn.end``       turn, conn, status, response_id, previous_response_id, output (item summaries), usage, ms,
                     error (code, message, param) for a failed turn
- ``upstream.lost``  conn, how, detail, turn (the turn in flight, or null when idle)
- ``recovery``       turn, trigger, action, from_conn, to_conn, removed_previous_response_id, items, bytes,
                     input (summaries of the input sent)
- ``fail_close``     turn, reason, error (the event sent to the client), close_code, close_reason
- ``fault``          phase, kind, detail, turn, conn, injected (always true). phase ``fired``: the rule fired after
                     completed turn ``turn`` (rule_line names it in rules.yaml); phase ``applied``: an armed fault
                     (error, delay) hit turn ``turn``
- ``session.end``    turns_completed, turns_failed, recoveries, reason

An item summary is ``{"type", "role"?, "call_id"?, "name"?, "text"?}``: the structure a chain is debugged by,
without the payloads (``text`` is a short preview, only with trace.bodies=summary or full).

Secrets never reach a trace: header values of Authorization, cookies and anything named like a key or token
are replaced by a fingerprint, and every line is scrubbed of the session's own secret values and of anything
shaped like an API key or bearer token before it is written.
"""

from __future__ import annotations

import enum
import json
from typing import Any, Iterable, Mapping

SCHEMA = 1
PREVIEW_CHARS = 80


class Bodies(str, enum.Enum):
    NONE = "none"  # structure only: item kinds, roles, call_ids, tool names
    SUMMARY = "summary"  # plus a short text preview of each item
    FULL = "full"  # plus the whole request body and the whole output items


# -- summaries -------------------------------------------------------------------------------------
def _preview(item: Mapping[str, Any]) -> str | None:
    for key in ("content", "output", "arguments", "input", "summary", "text"):
        value = item.get(key)
        if isinstance(value, str):
            text = value
        elif isinstance(value, list):
            texts = []
            for part in value:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif isinstance(part, str):
                    texts.append(part)
            text = " ".join(texts)
        else:
            continue
        if text:
            text = " ".join(text.split())
            return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"
    return None


def summarize_item(item: Any, bodies: Bodies = Bodies.NONE) -> dict[str, Any]:
    """The structure of one input or output item: what the pairing and the chain are debugged by."""
    if not isinstance(item, Mapping):
        return {"type": f"<{type(item).__name__}>"}
    out: dict[str, Any] = {"type": item.get("type", "message" if "role" in item else None)}
    for key in ("role", "call_id", "name", "id" if item.get("type") == "mcp_approval_request" else ""):
        if key and isinstance(item.get(key), str):
            out[key] = item[key]
    if item.get("type") == "mcp_approval_response" and isinstance(item.get("approval_request_id"), str):
        out["call_id"] = item["approval_request_id"]
    if item.get("type") == "local_shell_call_output" and "call_id" not in out and isinstance(item.get("id"), str):
        out["call_id"] = item["id"]
    if bodies is not Bodies.NONE:
        preview = _preview(item)
        if preview is not None:
            out["text"] = preview
    return out


def summarize_items(items: Any, bodies: Bodies = Bodies.NONE) -> list[dict[str, Any]]:
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    if not isinstance(items, list):
        return []
    return [summarize_item(i, bodies) for i in items]


def turn_start_fields(request: Mapping[str, Any], size: int, bodies: Bodies) -> dict[str, Any]:
    """What a response.create asks for, as trace fields."""
    fields: dict[str, Any] = {
        "model": request.get("model"),
        "store": request.get("store", True) is not False,
        "generate": request.get("generate", True) is not False,
        "previous_response_id": request.get("previous_response_id"),
        "input": summarize_items(request.get("input"), bodies),
        "bytes": size,
    }
    if bodies is Bodies.FULL:
        fields["body"] = dict(request)
    return fields


def error_fields(event: Mapping[str, Any]) -> dict[str, Any]:
    error = event.get("error")
    if not isinstance(error, Mapping):
        return {"status": event.get("status")}
    return {"status": event.get("status"), "code": error.get("code"), "message": error.get("message"),
            "param": error.get("param")}


def read_records(lines: Iterable[str]) -> tuple[list[dict[str, Any]], list[int]]:
    """Parse trace lines; returns (records, numbers of lines that were not whole records)."""
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(number)
            continue
        if isinstance(record, dict) and isinstance(record.get("event"), str):
            records.append(record)
        else:
            bad.append(number)
    return records, bad
