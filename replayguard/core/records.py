"""Chain trace records: what the trace writes for every event that matters in a session, and how it is read back.

Records (``event`` field; every record also has ``ts`` (Unix seconds) and ``session`` (the mitmproxy flow id)):

- ``session.start``  url, client, rules (the rules the session runs with, as a rules.yaml document)
- ``handshake``      conn, url, purpose (open/reconnect/recovery), ok, status, ms, headers (redacted),
                     response_headers, peer and local (addresses), tls (version, cipher, sni); error, injected
- ``turn.start``     turn, conn, model, store, generate, previous_response_id, input (item summaries), bytes,
                     rewritten (the request was rebuilt from the chain state), body (with trace.bodies=full)
- ``turn.end``       turn, conn, status, response_id, previous_response_id, output (item summaries), usage, ms,
                     error (code, message, param) for a failed turn
- ``upstream.lost``  conn, how, detail, turn (the turn in flight, or null when idle), by_error (an upstream error
                     event finished it: swallowed, not forwarded), events (of that turn, seen before the loss)
- ``upstream.closed`` conn, code (null: dropped without a close frame), reason
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
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from . import events as ev
from .chain import TERMINAL
from .messages import parse
from .redact import redact_headers

SCHEMA = 1
MAX_ITEMS = 200  # item summaries kept of one request or replay (the first and last half), so records stay small
OMITTED = "…"  # the type of the summary standing for the items left out
FLOW_RECORD = "replayguard."  # a flow message whose JSON "type" starts so is a record replayguard kept in the flow
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
    """Summaries of the items, at most MAX_ITEMS of them: a full-history resend of thousands of items keeps its
    first and last ones and one ``{"type": "…", "omitted": N}`` between, so a record never grows with the message."""
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items[:4 * PREVIEW_CHARS]}]
    if not isinstance(items, list):
        return []
    if len(items) <= MAX_ITEMS:
        return [summarize_item(i, bodies) for i in items]
    half = MAX_ITEMS // 2
    return ([summarize_item(i, bodies) for i in items[:half]] + [{"type": OMITTED, "omitted": len(items) - 2 * half}]
            + [summarize_item(i, bodies) for i in items[-half:]])


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


def records_in_flow(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """The records replayguard kept among a flow's WebSocket messages (``injected``, JSON typed
    ``replayguard.<record>``), in order; the client's own messages are not records."""
    head = ('{"type": "' + FLOW_RECORD).encode()
    out = []
    for message in messages:
        if not getattr(message, "injected", False) or not message.content.startswith(head):
            continue
        record = parse(message.content)
        if isinstance(record, dict) and isinstance(record.get("event"), str):
            out.append(record)
    return out


@dataclass
class FlowTurn:
    """One turn as a flow's messages show it: the client's response.create and the upstream events after it."""

    number: int
    request: dict[str, Any]
    size: int  # bytes of the request as the client sent it
    started: float  # when the request passed the proxy
    index: int  # the request's position among the flow's messages
    before: list[str]  # the client's other messages since the previous request, as text
    event_types: list[Any] = field(default_factory=list)  # every upstream event of the turn, in order
    items: list[dict[str, Any]] = field(default_factory=list)  # its output items, as they were done
    response_id: str | None = None
    terminal: dict[str, Any] | None = None  # the event that ended the turn; None while it was in flight
    ended: float | None = None
    end_index: int | None = None  # the terminal event's position among the flow's messages

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """The output items: as they were done, else those the terminal event's response lists."""
        response = self.terminal.get("response") if self.terminal is not None else None
        listed = response.get("output") if isinstance(response, dict) else None
        return self.items or [i for i in listed or [] if isinstance(i, dict)]


def turns_in_flow(messages: Iterable[Any]) -> list[FlowTurn]:
    """A WebSocket flow's turns, from the messages the client really sent and received (replayguard's own records
    and other injected messages are not the client's). Upstream events outside a turn are not part of one."""
    turns: list[FlowTurn] = []
    turn: FlowTurn | None = None
    before: list[str] = []
    for index, message in enumerate(messages):
        if message.injected:
            continue
        obj = parse(message.content)
        if message.from_client:
            if isinstance(obj, dict) and obj.get("type") == "response.create":
                turn = FlowTurn(len(turns) + 1, obj, len(message.content), message.timestamp, index, before)
                turns.append(turn)
                before = []
            else:
                before.append(message.content.decode("utf-8", errors="replace"))
            continue
        if turn is None or not isinstance(obj, dict):
            continue
        kind = obj.get("type")
        turn.event_types.append(kind)
        if kind == "response.created" and isinstance(obj.get("response"), dict):
            turn.response_id = obj["response"].get("id")
        elif kind == "response.output_item.done" and isinstance(obj.get("item"), dict):
            turn.items.append(obj["item"])
        elif isinstance(kind, str) and kind in TERMINAL:
            response = obj.get("response")
            if isinstance(response, dict):
                turn.response_id = response.get("id") or turn.response_id
            turn.terminal, turn.ended, turn.end_index = obj, message.timestamp, index
            turn = None
    return turns


def read_records(lines: Iterable[str]) -> tuple[list[dict[str, Any]], list[int]]:
    """Parse trace lines; returns (records, numbers of lines that were not whole records)."""
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        record = parse(line)
        if isinstance(record, dict) and isinstance(record.get("event"), str):
            records.append(record)
        else:
            bad.append(number)
    return records, bad


# -- session events as records ----------------------------------------------------------------------
Record = tuple[str, dict[str, Any]]  # (event name, fields)


def record_of(event: ev.Event, bodies: Bodies = Bodies.SUMMARY) -> Record | None:
    """The trace record for a session event (None for events the trace does not keep)."""
    build = _BUILDERS.get(type(event))
    return build(event, bodies) if build is not None else None


def _session_started(e: ev.SessionStarted, bodies: Bodies) -> Record:
    fields: dict[str, Any] = {"schema": SCHEMA, "url": e.url, "client": e.client}
    if e.rules is not None:
        fields["rules"] = e.rules
    return "session.start", fields


def _handshake(e: ev.Handshake, bodies: Bodies) -> Record:
    fields: dict[str, Any] = {"conn": e.conn, "url": e.url, "purpose": e.purpose, "ok": e.ok, "status": e.status,
                              "ms": e.ms, "headers": redact_headers(e.headers)}
    if e.ok:
        fields["response_headers"] = redact_headers(e.response_headers or ())
        fields["peer"] = list(e.peer) if e.peer else None
        fields["local"] = list(e.local) if e.local else None
        if e.tls is not None:
            fields["tls"] = e.tls
    else:
        fields["error"] = e.error
        fields["injected"] = e.injected
    return "handshake", fields


def _turn_started(e: ev.TurnStarted, bodies: Bodies) -> Record:
    return "turn.start", {"turn": e.turn.number, "conn": e.conn, **turn_start_fields(e.turn.request, e.size, bodies)}


def _turn_ended(e: ev.TurnEnded, bodies: Bodies) -> Record:
    turn = e.turn
    fields: dict[str, Any] = {"turn": turn.number, "conn": e.conn, "status": turn.status,
                              "response_id": turn.response_id, "previous_response_id": turn.previous_id,
                              "output": summarize_items(turn.outputs, bodies), "ms": e.ms}
    event = e.event
    response = event.get("response") if event is not None else None
    if isinstance(response, dict) and isinstance(response.get("usage"), dict):
        fields["usage"] = response["usage"]
    if event is not None and event.get("type") == "error":
        fields["error"] = error_fields(event)
    if e.reason is not None:
        fields["reason"] = e.reason
    if bodies is Bodies.FULL and turn.outputs:
        fields["output_items"] = turn.outputs
    return "turn.end", fields


def _upstream_lost(e: ev.UpstreamLost, bodies: Bodies) -> Record:
    fields = {"conn": e.conn, "how": e.how, "detail": e.detail, "turn": e.turn, "by_error": e.by_error}
    if e.events is not None:
        fields["events"] = e.events
    return "upstream.lost", fields


def _upstream_closed(e: ev.UpstreamClosed, bodies: Bodies) -> Record:
    return "upstream.closed", {"conn": e.conn, "code": e.code, "reason": e.reason}


def _recovered(e: ev.Recovered, bodies: Bodies) -> Record:
    turn, body = e.turn, e.body
    fields: dict[str, Any] = {
        "turn": turn.number, "trigger": e.trigger, "action": e.decision.action, "from_conn": e.from_conn,
        "to_conn": e.to_conn, "removed_previous_response_id": turn.previous_id if body is not None else None,
        "items": len(body["input"]) if body is not None else len(turn.new_items), "bytes": e.size,
        "attempt": turn.attempts,
    }
    if body is not None:
        fields["input"] = summarize_items(body["input"])
        if bodies is Bodies.FULL:
            fields["body"] = body
    return "recovery", fields


def _failed_closed(e: ev.FailedClosed, bodies: Bodies) -> Record:
    d = e.decision
    return "fail_close", {"turn": e.turn.number if e.turn is not None else None, "reason": d.reason,
                          "error": d.error, "close_code": d.close_code, "close_reason": d.close_reason}


def _fault_fired(e: ev.FaultFired, bodies: Bodies) -> Record:
    rule = e.fired.rule
    return "fault", {"phase": "fired", "kind": rule.kind, "detail": rule.describe(), "turn": e.fired.after_turn,
                     "conn": e.conn, "rule_line": rule.line, "origin": rule.origin, "injected": True}


def _fault_applied(e: ev.FaultApplied, bodies: Bodies) -> Record | None:
    if e.kind == "refuse":
        return None  # the refused handshake's own record says injected
    return "fault", {"phase": "applied", "kind": e.kind, "detail": e.detail, "turn": e.turn, "conn": e.conn,
                     "injected": True}


def _session_ended(e: ev.SessionEnded, bodies: Bodies) -> Record:
    return "session.end", {"turns_completed": e.completed, "turns_failed": e.failed, "recoveries": e.recoveries,
                           "reason": e.reason}


_BUILDERS: dict[type, Callable[[Any, Bodies], Record | None]] = {
    ev.SessionStarted: _session_started,
    ev.Handshake: _handshake,
    ev.TurnStarted: _turn_started,
    ev.TurnEnded: _turn_ended,
    ev.UpstreamLost: _upstream_lost,
    ev.UpstreamClosed: _upstream_closed,
    ev.Recovered: _recovered,
    ev.FailedClosed: _failed_closed,
    ev.FaultFired: _fault_fired,
    ev.FaultApplied: _fault_applied,
    ev.SessionEnded: _session_ended,
}
