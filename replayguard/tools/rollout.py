"""Codex CLI's own session files (``$CODEX_HOME/sessions/YYYY/MM/DD/rollout-*.jsonl``) read as Responses turns, so
`replayguard trace` and `reproduce` show and run them like replayguard's own recordings.

What Codex 0.171 writes, as measured offline against the fake upstream (README, "Codex session files"): one JSON
object a line, ``{timestamp, ordinal, type, payload}``, with ``metadata`` beside the payload of a ``response_item``.
The file keeps Codex's *history*, not its requests: every item once (messages, reasoning, ``function_call`` and
``function_call_output`` with call_ids), ``metadata.history_sequence`` numbering them and
``metadata.sampled_through_sequence`` naming the history a model output was sampled from; one
``token_usage_record`` per completed response (its ``response_id`` and usage); and ``event_msg`` lines, of which
only ``task_complete`` carries a failure: Codex's last error once it gave up (``error.message``: the upstream's
error event as JSON, or "stream disconnected before completion: ...", or "unexpected status N ..." with
``codex_error_info.http_connection_failed``). Reconnects, retries, stream errors and the fallback to HTTPS are not
kept; a response that broke off leaves the items Codex had received (and no usage record), and the retry's items
are sampled through them.

So requests are rebuilt as Codex sends them on WebSocket (observed on the wire): chained with
``previous_response_id`` on the previous response of the connection, the history since then as input; after a
response that broke off or an error, and for a task after a finished one (``codex exec resume`` appends to the same
file), on a new connection, with the whole history and no ``previous_response_id``.
Each such connection is a session of its own (``<session id>#N``), as a flow file would show it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..core.messages import parse
from ..core.pairing import OUTPUT_CALLS
from ..core.records import Bodies, error_fields, summarize_item, summarize_items

KIND = "codex rollout"
LINE_TYPES = frozenset({"session_meta", "turn_context", "world_state", "response_item", "event_msg",
                        "token_usage_record"})
_ROLLOUT_ONLY = ("internal_chat_message_metadata_passthrough",)  # item fields Codex keeps but never sends
HOW_TO_RECORD = ("to record how the upstream failed, run Codex through replayguard with a trace "
                 "(`trace: {bodies: full}` in rules.yaml and `--set replayguard_trace=FILE`) or save its flows "
                 "(`mitmdump -w FILE`)")


class RolloutError(Exception):
    """Not a Codex rollout, or nothing in it."""


def looks_like_rollout(first: Any) -> bool:
    """The first JSON line of a file is a Codex rollout line."""
    return _is_line(first) and first.get("type") in LINE_TYPES


def _is_line(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("type"), str) and "payload" in obj and "timestamp" in obj


# -- the model ---------------------------------------------------------------------------------------
@dataclass
class Request:
    """One response.create Codex sent, as the rollout shows it."""

    connection: int  # 1, 2, ...: a new one after each failure
    number: int  # within its connection
    input: list[dict[str, Any]]
    previous_response_id: str | None
    started: float
    sampled_through: int | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    response_id: str | None = None
    usage: dict[str, Any] | None = None
    status: str = "in flight"  # completed | connection lost | error | refused | in flight
    ended: float | None = None
    error_event: dict[str, Any] | None = None  # the upstream's error event, as Codex kept it
    error_text: str | None = None  # Codex's last error, as it kept it (when it is no error event)
    http_status: int | None = None  # codex_error_info.http_connection_failed
    gap: float | None = None  # seconds from the last kept output of a broken response to Codex's retry

    @property
    def done(self) -> bool:
        return self.status != "in flight"


@dataclass
class Rollout:
    path: str
    session_id: str
    cli_version: str | None = None
    originator: str | None = None
    provider: str | None = None
    model: str | None = None
    requests: list[Request] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stopped: str | None = None  # where a cut file stops
    started: float = 0.0
    ended: float = 0.0

    @property
    def connections(self) -> list[list[Request]]:
        out: dict[int, list[Request]] = {}
        for request in self.requests:
            out.setdefault(request.connection, []).append(request)
        return list(out.values())

    def session(self, connection: int) -> str:
        return f"{self.session_id}#{connection}"

    @property
    def label(self) -> str:
        who = " ".join(filter(None, [self.originator, self.cli_version]))
        return f"{KIND}{' (' + who + ')' if who else ''}{', provider ' + self.provider if self.provider else ''}"


def _ts(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def is_output(item: dict[str, Any]) -> bool:
    """A model output (an assistant message, reasoning, a tool call, ...), not something Codex adds to the input."""
    kind = item.get("type")
    if kind == "message":
        return item.get("role") == "assistant"
    return isinstance(kind, str) and kind not in OUTPUT_CALLS and not kind.endswith("_output")


def _wire(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in _ROLLOUT_ONLY}


# -- reading ------------------------------------------------------------------------------------------
def read_rollout(path: str | Path, text: str | None = None) -> Rollout:
    p = Path(path)
    if text is None:
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise RolloutError(f"cannot read {p}: {e.strerror or e}") from None
    lines = text.splitlines()
    last = len(lines)
    while last and not lines[last - 1].strip():
        last -= 1
    rollout = Rollout(str(p), p.stem)
    # Without usage records (written with the history metadata since Codex 0.171, or an older Codex) a completed
    # response cannot be told from one that broke off.
    reader = _Reader(rollout, expect_usage=any('"token_usage_record"' in line or '"sampled_through_sequence"' in line
                                               for line in lines))
    unknown: dict[str, int] = {}
    for number, line in enumerate(lines[:last], 1):
        if not line.strip():
            continue
        obj = parse(line)
        if not _is_line(obj):
            if number == last:
                rollout.stopped = f"line {number} is half-written: the rollout stops there"
            else:
                rollout.warnings.append(f"skipped line {number}: not a whole rollout line")
            continue
        if obj["type"] not in LINE_TYPES:
            unknown[obj["type"]] = unknown.get(obj["type"], 0) + 1
        reader.feed(obj)
    reader.finish()
    for kind, count in unknown.items():
        rollout.warnings.append(f"{count} line(s) of type {kind!r} were not read (unknown to this reader)")
    if not rollout.requests:
        raise RolloutError(f"{p}: a Codex rollout with no model request in it (nothing was sent, or the file is cut "
                           f"before the first response)")
    return rollout


class _Reader:
    """Turns the rollout's lines, in order, into requests (see the module docstring)."""

    def __init__(self, rollout: Rollout, expect_usage: bool) -> None:
        self.r = rollout
        self.expect_usage = expect_usage
        self.history: list[dict[str, Any]] = []  # every item so far, as sent
        self.pending: list[dict[str, Any]] = []  # input items since the last request was sent
        self.current: Request | None = None  # the request whose outputs are being read
        self.connection = 0
        self.chain: Request | None = None  # the last completed request of the current connection
        self.last_ts = 0.0
        self.pending_ts: float | None = None  # when the last input item was added: the request went after it
        self.task_done = False  # a task_complete came since the last task_started

    def feed(self, line: dict[str, Any]) -> None:
        ts = _ts(line.get("timestamp")) or self.last_ts
        self.last_ts = ts
        if not self.r.started:
            self.r.started = ts
        self.r.ended = ts
        kind, payload = line["type"], line.get("payload")
        if not isinstance(payload, dict):
            return
        if kind == "session_meta":
            self.r.session_id = str(payload.get("id") or payload.get("session_id") or self.r.session_id)
            self.r.cli_version = payload.get("cli_version") or self.r.cli_version
            self.r.originator = payload.get("originator") or self.r.originator
            self.r.provider = payload.get("model_provider") or self.r.provider
        elif kind == "turn_context":
            self.r.model = payload.get("model") if isinstance(payload.get("model"), str) else self.r.model
        elif kind == "response_item":
            self._item(payload, line.get("metadata") if isinstance(line.get("metadata"), dict) else {}, ts)
        elif kind == "token_usage_record":
            request = self.current if self.current is not None and not self.current.done else self._send(ts, None)
            request.response_id = payload.get("response_id") if isinstance(payload.get("response_id"), str) else None
            request.usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else None
            request.status, request.ended = "completed", ts
            self.chain = request if request.response_id else None
        elif kind == "event_msg" and payload.get("type") == "task_complete":
            if isinstance(payload.get("error"), dict):
                self._failed(payload["error"], ts)
            self.task_done = True
        elif kind == "event_msg" and payload.get("type") == "task_started":
            if self.task_done and self.r.requests:  # a task after a finished one (`codex exec resume`): Codex
                self._reconnect()  # opens a new connection and sends its whole history
            self.task_done = False

    def _item(self, payload: dict[str, Any], metadata: dict[str, Any], ts: float) -> None:
        item = _wire(payload)
        through = metadata.get("sampled_through_sequence")
        through = through if isinstance(through, int) else None
        if is_output(item):
            current = self.current
            new_sample = current is None or current.done or (
                through is not None and current.sampled_through is not None and through != current.sampled_through
            ) or (through is None and bool(self.pending))
            if new_sample:
                if current is not None and not current.done:
                    if self.expect_usage:
                        self._broke_off(current, ts)
                    else:
                        current.status, self.chain = "completed", None
                self.current = self._send(ts, through)
            assert self.current is not None
            self.current.outputs.append(item)
            self.current.ended = ts
        else:
            self.pending.append(item)
            self.pending_ts = ts
        self.history.append(item)

    def _send(self, ts: float, through: int | None) -> Request:
        """The request that was sent before ``ts``: on the connection's chain, or the whole history on a new one."""
        if self.connection == 0:
            self.connection = 1
        on = [r for r in self.r.requests if r.connection == self.connection]
        chain = self.chain
        if chain is not None and chain.connection == self.connection:
            items, previous = list(self.pending), chain.response_id
        else:
            items, previous = list(self.history), None
        started = self.pending_ts if self.pending_ts is not None else ts  # a retry: when its answer began
        request = Request(self.connection, len(on) + 1, items, previous, started, through)
        self.pending, self.pending_ts = [], None
        self.r.requests.append(request)
        return request

    def _reconnect(self) -> None:
        self.connection += 1
        self.chain = None

    def _broke_off(self, request: Request, ts: float) -> None:
        request.status = "connection lost"
        request.gap = round(ts - (request.ended or request.started), 3)
        self._reconnect()

    def _failed(self, error: dict[str, Any], ts: float) -> None:
        """Codex gave up on the request in flight: its last error, as it kept it."""
        request = self.current if self.current is not None and not self.current.done else None
        if request is None:
            if not self.pending:
                self.r.warnings.append(f"Codex's last error came with no request left unanswered: "
                                       f"{str(error.get('message'))[:200]}")
                return
            request = self._send(ts, None)
        message = error.get("message")
        event = parse(message) if isinstance(message, str) and message.lstrip().startswith("{") else None
        info = error.get("codex_error_info")
        failed = info.get("http_connection_failed") if isinstance(info, dict) else None
        if isinstance(event, dict) and event.get("type") == "error":
            request.status, request.error_event = "error", event
        elif isinstance(failed, dict) and isinstance(failed.get("http_status_code"), int):
            request.status, request.http_status = "refused", failed["http_status_code"]
            request.error_text = " ".join(str(message).split())
        else:
            request.status, request.error_text = "connection lost", " ".join(str(message).split())
        request.ended = ts
        self.current = None
        self._reconnect()

    def finish(self) -> None:
        if self.current is not None and not self.current.done:
            if self.expect_usage:
                self.r.stopped = self.r.stopped or "the rollout ends while a response was streaming"
            else:
                self.current.status = "completed"
        if not self.expect_usage and self.r.requests:
            self.r.warnings.append("no token_usage_record lines (an older Codex?): response ids, usage and which "
                                   "responses broke off are not known; every request is shown with its whole history")


# -- as trace records ------------------------------------------------------------------------------------
def _ms(request: Request) -> float | None:
    return round((request.ended - request.started) * 1000, 1) if request.ended is not None else None


def kept_events(outputs: list[dict[str, Any]]) -> list[str]:
    """The events a client had received when it had these output items whole (the usual order)."""
    from .fake_upstream import usual_event_types  # the order the fake streams, and scripts, an answer in

    return usual_event_types(outputs)[:-1]


def records(rollout: Rollout) -> list[dict[str, Any]]:
    """The rollout as chain trace records (one session per connection), with the whole requests and outputs."""
    out: list[dict[str, Any]] = []
    for requests in rollout.connections:
        first = requests[0]
        session = rollout.session(first.connection)
        start_ts = first.started
        out.append({"ts": start_ts, "session": session, "event": "session.start", "url": "",
                    "source": rollout.label, "connection": first.connection})
        if first.status == "refused":
            out.append({"ts": start_ts, "session": session, "event": "handshake", "conn": None, "purpose": "open",
                        "ok": False, "status": first.http_status, "error": first.error_text})
        for request in requests:
            body: dict[str, Any] = {"type": "response.create", "model": rollout.model, "store": False,
                                    "input": request.input}
            if request.previous_response_id:
                body["previous_response_id"] = request.previous_response_id
            out.append({"ts": request.started, "session": session, "event": "turn.start", "turn": request.number,
                        "conn": None, "model": rollout.model, "store": False, "generate": True,
                        "previous_response_id": request.previous_response_id,
                        "input": summarize_items(request.input, Bodies.SUMMARY),
                        "bytes": len(json.dumps(body)), "body": body})
            if request.status == "in flight":
                continue
            end: dict[str, Any] = {
                "ts": request.ended, "session": session, "event": "turn.end", "turn": request.number, "conn": None,
                "status": request.status, "response_id": request.response_id,
                "previous_response_id": request.previous_response_id,
                "output": [summarize_item(i, Bodies.SUMMARY) for i in request.outputs],
                "output_items": request.outputs, "usage": request.usage, "ms": _ms(request)}
            if request.error_event is not None:
                end["error"], end["error_event"] = error_fields(request.error_event), request.error_event
            elif request.error_text is not None:
                end["error"] = {"status": request.http_status, "code": None, "message": request.error_text}
            if request.status == "connection lost":
                end["event_types"] = kept_events(request.outputs) if request.outputs else []
                kept = len(request.outputs)
                detail = (f"Codex kept {kept} output item{'s' if kept != 1 else ''}"
                          + (f", then retried {request.gap:g} s later" if request.gap is not None else "")
                          + "; the rollout does not say how (close, drop or silence)")
                noticed = (request.ended or request.started) + (request.gap or 0)  # by Codex's retry
                out.append({"ts": noticed, "session": session, "event": "upstream.lost", "conn": None,
                            "how": request.error_text or "the response broke off", "detail": detail,
                            "turn": request.number, "events": len(end["event_types"]), "by_error": False,
                            "by": "client"})
            out.append(end)
        last = requests[-1]
        reconnected = last.status in ("connection lost", "error", "refused")
        out.append({"ts": last.ended or last.started, "session": session, "event": "session.end",
                    "turns_completed": sum(r.status == "completed" for r in requests),
                    "turns_failed": sum(r.status not in ("completed", "in flight") for r in requests),
                    "reason": "Codex gave up or reconnected after a failure" if reconnected else
                    ("the rollout ends mid-response" if last.status == "in flight" else "the rollout ends")})
    return out


def notes(rollout: Rollout) -> list[str]:
    """What reproducing this rollout cannot know, and how to record it."""
    out = ["a Codex rollout keeps Codex's history, not its requests: each request is rebuilt from it (the history "
           "since the previous response, chained with previous_response_id; after a failure the whole history on a "
           "new connection, as Codex sends them); Codex's warm-up request and its base instructions are not in it, "
           "and a drop or a silent upstream between responses leaves no trace (Codex reconnects and resends)"]
    for request in rollout.requests:
        where = f"session {rollout.session(request.connection)} turn {request.number}"
        if request.status == "connection lost":
            kept = len(request.outputs)
            out.append(f"{where}: the rollout does not say how the upstream failed (a close, a TCP drop or silence"
                       f"{'; ' + repr(request.error_text) if request.error_text else ''}); Codex kept {kept} output "
                       f"item{'s' if kept != 1 else ''}"
                       + (f" and retried {request.gap:g} s later" if request.gap is not None else "")
                       + (": reproduced as a TCP drop after them" if kept else
                          ": reproduced as a TCP drop before the first event") + f"; {HOW_TO_RECORD}")
        elif request.status == "refused":
            out.append(f"{where}: Codex's last error was HTTP {request.http_status} ({(request.error_text or '')[:120]}"
                       f"); the rollout does not say whether it came on the WebSocket or on Codex's fallback to "
                       f"HTTPS: reproduced as a refused WebSocket handshake; {HOW_TO_RECORD}")
    return out


def recording(rollout: Rollout) -> Any:
    """The rollout as a recording for `replayguard reproduce` (a :class:`replayguard.tools.recording.Recording`)."""
    from .recording import Failure, Recording, sessions_from_records

    sessions = sessions_from_records(records(rollout))
    by_turn = {(rollout.session(r.connection), r.number): r for r in rollout.requests}
    for session in sessions:
        # A request whose connection was refused never went out on a WebSocket: the refusal is the session's.
        session.turns = [t for t in session.turns if by_turn[(session.id, t.number)].status != "refused"]
        for turn in session.turns:
            request = by_turn[(session.id, turn.number)]
            if request.status == "connection lost":
                turn.outcome.close_unknown = True
                # Codex had the kept items whole, so the events before them; with none, nothing is known to have come.
                turn.events = kept_events(request.outputs) if request.outputs else []
                turn.failures.append(Failure("drop", after=len(turn.events),
                                             how="the rollout does not say how: reproduced as a TCP drop"))
    return Recording(rollout.path, KIND, sessions, rollout.stopped, notes(rollout) + rollout.warnings)
