"""A recording read into what reproducing it needs: per session, the rules, the client's handshake headers, and per
turn the client's request, the upstream's answer (output items, usage, event order), the upstream failures and the
outcome the client got.

Three sources give the same model: a chain trace written with ``trace.bodies: full`` (JSON Lines), a mitmproxy flow
file (``mitmdump -w``, mitmweb's Save: the client's own messages and the records replayguard kept in the flow), and a
fixture written by ``replayguard reproduce --write-test`` (this model as JSON, redacted). A recording cut short (a
half-written last line, a flow file truncated at any byte) is read as far as it goes, and :attr:`Recording.stopped`
says where it stopped.

Upstream failures are told apart from the faults replayguard injected by rule (``fault`` records, ``injected``
handshakes): a reproduction lets the rules inject those again, and only the upstream's own failures are scripted
into the fake upstream.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..core.errors import PREFIX
from ..core.faults import InjectedError, upstream_error
from ..core.records import read_records, records_in_flow, turns_in_flow
from ..core.recovery import Action, Trigger

FIXTURE_VERSION = 1
HOW_TO_RECORD = ("record one with `trace: {bodies: full}` in rules.yaml and `--set replayguard_trace=FILE`, or save "
                 "the flows with `mitmdump -w FILE`")

# How a loss was found, as the kind of failure the fake upstream reproduces.
_BREAKS = {Trigger.CLOSED.value: "close", Trigger.DROPPED.value: "drop", Trigger.PING_TIMEOUT.value: "silence",
           Trigger.FIRST_EVENT_TIMEOUT.value: "silence", Trigger.PREVIOUS_NOT_FOUND.value: "error",
           Trigger.CONNECTION_LIMIT.value: "error"}
# Triggers compared as one: a silent upstream is found by a ping or by the first-event timeout, depending on timing.
TRIGGER_CLASS = {Trigger.CLOSED.value: "closed", Trigger.DROPPED.value: "dropped",
                 Trigger.PING_TIMEOUT.value: "silent", Trigger.FIRST_EVENT_TIMEOUT.value: "silent",
                 Trigger.PREVIOUS_NOT_FOUND.value: "previous_response_not_found",
                 Trigger.CONNECTION_LIMIT.value: "connection limit", Trigger.RESUME.value: "resume"}
_CONNECTION_FAULTS = {"close", "drop", "blackhole"}


class RecordingError(Exception):
    """The file cannot be reproduced: unreadable, not a recording, or without what reproducing needs."""


# -- the model ----------------------------------------------------------------------------------
@dataclass
class Failure:
    """An upstream failure: ``close`` (``code``), ``drop`` (TCP cut), ``silence`` (no events, no pongs) or ``error``
    (an error event the upstream sent instead of an answer). In a turn, ``after`` events of the answer came first."""

    kind: str
    code: int | None = None
    error: dict[str, Any] | None = None
    after: int = 0
    injected: bool = False  # a replayguard fault rule did it: the rules do it again in a reproduction
    how: str = ""  # as recorded (how it was found, or the fault rule)

    def describe(self) -> str:
        what = {"close": f"close {self.code}", "drop": "TCP drop", "silence": "silence"}.get(self.kind, "")
        if self.kind == "error":
            what = f"error {((self.error or {}).get('error') or {}).get('code')}"
        return what + (" (fault rule)" if self.injected else "")


@dataclass
class Outcome:
    """What the client got for a turn. ``kind``: completed, recovered, failed closed, client error, connection lost,
    refused, aborted, no outcome, not sent."""

    kind: str
    recoveries: list[list[str]] = field(default_factory=list)  # [verb, trigger] per recovery, in order
    code: str | None = None  # the error code (failed closed, client error) or HTTP status (refused)
    close: int | None = None  # the close code (failed closed, connection lost)
    note: str = ""  # shown, never compared
    close_unknown: bool = False  # the recording does not say how the connection closed (a Codex rollout)

    def key(self) -> tuple[Any, ...]:
        """What two outcomes must share to be the same."""
        recoveries = tuple((verb, TRIGGER_CLASS.get(trigger, trigger)) for verb, trigger in self.recoveries)
        return self.kind, recoveries, self.code, self.close

    def describe(self) -> str:
        recovered = ", ".join(f"{verb} ({trigger})" for verb, trigger in self.recoveries)
        if self.kind in ("completed", "recovered"):
            text = recovered or "completed"
        elif self.kind == "failed closed":
            text = f"failed closed: {self.code or 'no error event'}, close {self.close}"
            text = f"{recovered}, then {text}" if recovered else text
        elif self.kind == "client error":
            text = f"client error: {self.code}"
        elif self.kind == "connection lost":
            text = f"connection lost: {'close ' + str(self.close) if self.close is not None else 'no close frame'}"
            text = "connection lost (how is not recorded)" if self.close_unknown else text
        elif self.kind == "refused":
            text = f"handshake refused: HTTP {self.code}"
        else:
            text = self.kind
        return f"{text} [{self.note}]" if self.note else text


@dataclass
class RecordedTurn:
    number: int
    request: dict[str, Any]  # the client's response.create, as it sent it
    before: list[str] = field(default_factory=list)  # other client messages sent before it (flow files)
    response_id: str | None = None
    status: str | None = None  # completed, error, response.failed, response.incomplete, aborted; None: no end
    output: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    events: list[str] | None = None  # the event types of the answer, in order (flow files)
    error: dict[str, Any] | None = None  # the upstream error event that reached the client
    failures: list[Failure] = field(default_factory=list)  # in the turn, in order: each ended one attempt
    idle: list[Failure] = field(default_factory=list)  # while idle after the turn
    handshakes: list[dict[str, Any]] = field(default_factory=list)  # made during the turn: {status, injected}
    outcome: Outcome = field(default_factory=lambda: Outcome("no outcome"))

    @property
    def complete(self) -> bool:
        """The recording has this turn's outcome (a turn the client left is not one to reproduce)."""
        return self.outcome.kind not in ("no outcome", "aborted")


@dataclass
class RecordedSession:
    id: str
    url: str  # the upstream the client addressed (credentials redacted)
    rules: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)  # the client's handshake headers (secrets redacted)
    turns: list[RecordedTurn] = field(default_factory=list)
    open_handshakes: list[dict[str, Any]] = field(default_factory=list)  # before the first turn
    open_idle: list[Failure] = field(default_factory=list)  # right after the connection opened
    refused: int | None = None  # the client's handshake was refused with this status

    @property
    def reproducible(self) -> list[RecordedTurn]:
        """The turns up to the first one whose outcome the recording does not have."""
        out = []
        for turn in self.turns:
            if not turn.complete:
                break
            out.append(turn)
        return out


@dataclass
class Recording:
    path: str
    kind: str  # trace, flow file, fixture
    sessions: list[RecordedSession]
    stopped: str | None = None  # where a truncated recording stops
    warnings: list[str] = field(default_factory=list)
    origin: str | None = None  # a fixture: the kind of recording it was written from

    @property
    def turns(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


# -- from trace records ------------------------------------------------------------------------
def _error_event(detail: Any) -> dict[str, Any] | None:
    """An upstream error event rebuilt from a record's error fields (status, code, message, param)."""
    if not isinstance(detail, dict):
        return None
    if detail.get("type") == "error":
        return detail
    status = detail.get("status") or 400
    code = detail.get("code")
    if code in {e.value for e in InjectedError} and not detail.get("message"):
        return upstream_error(InjectedError(code))
    return {"type": "error", "status": status, "error": {
        "type": "server_error" if status >= 500 else "invalid_request_error", "code": code,
        "message": detail.get("message") or "", "param": detail.get("param")}}


def _close_code(record: dict[str, Any], closes: dict[Any, int | None]) -> int:
    code = closes.get(record.get("conn"))
    if code is None:
        m = re.search(r"close code (\d+)", str(record.get("detail") or ""))
        code = int(m.group(1)) if m else 1011
    return code


def session_from_records(records: list[dict[str, Any]], need_bodies: bool = True) -> RecordedSession:
    """One session's records (trace schema; flow files rebuilt into it) as a recorded session."""
    first = records[0]
    session = RecordedSession(id=str(first.get("session")), url="")
    closes = {r.get("conn"): r.get("code") for r in records if r["event"] == "upstream.closed"}
    turns: dict[int, RecordedTurn] = {}
    current: RecordedTurn | None = None  # the last turn that started
    last_ended: RecordedTurn | None = None
    # conn -> the connection fault done to it, and whether a rule did it (the recorded rules do it again) or the
    # replayguard.fault command (the fake must, as if the upstream had)
    faulted: dict[Any, tuple[str, bool]] = {}
    error_by_rule = True  # who armed the error fault applied next
    injected_error: dict[int, int] = {}  # turn -> injected errors not yet matched with their loss
    delayed: set[int] = set()
    recoveries: dict[int, list[list[str]]] = {}
    fail_close: dict[int, dict[str, Any]] = {}
    lost_close: dict[int, int | None] = {}
    for r in records:
        event = r["event"]
        if event == "session.start":
            session.url = r.get("url") or session.url
            session.rules = r.get("rules") if isinstance(r.get("rules"), dict) else session.rules
        elif event == "handshake":
            if r.get("purpose") == "open" and not session.headers:
                session.headers = {k: v for k, v in (r.get("headers") or {}).items() if isinstance(v, str)}
            entry = {"status": None if r.get("ok") else r.get("status"), "injected": bool(r.get("injected"))}
            (current.handshakes if current is not None else session.open_handshakes).append(entry)
            if not r.get("ok") and r.get("purpose") == "open" and current is None:
                session.refused = r.get("status") or 502
        elif event == "turn.start":
            body = r.get("body")
            if not isinstance(body, dict):
                if need_bodies:
                    kept = "summary" if any("text" in i for i in r.get("input") or [] if isinstance(i, dict)) else "none"
                    raise RecordingError(
                        f"turn {r.get('turn')} of session {session.id} has no request body: this trace was written "
                        f"with trace.bodies: {kept}, and reproducing needs the requests and outputs; {HOW_TO_RECORD}")
                body = {"type": "response.create", "input": []}
            current = RecordedTurn(number=int(r.get("turn") or len(turns) + 1), request=body,
                                   before=list(r.get("before") or []))
            turns[current.number] = current
            session.turns.append(current)
        elif event == "turn.end":
            turn = turns.get(r.get("turn"))
            if turn is None:
                continue
            turn.status = r.get("status")
            turn.response_id = r.get("response_id")
            items = r.get("output_items")
            if items is None and r.get("output") and need_bodies and turn.status == "completed":
                raise RecordingError(f"turn {turn.number} of session {session.id} has no output items: "
                                     f"reproducing needs trace.bodies: full; {HOW_TO_RECORD}")
            turn.output = list(items or [])
            turn.usage = r.get("usage")
            turn.events = r.get("event_types")
            if turn.status == "error":
                turn.error = r.get("error_event") or _error_event(r.get("error"))
            elif turn.status == "connection lost":
                lost_close[turn.number] = r.get("close")
            last_ended = turn
        elif event == "fault":
            kind, phase = r.get("kind"), r.get("phase", "fired")
            by_rule = not r.get("origin")
            if phase == "fired" and kind in _CONNECTION_FAULTS:
                faulted[r.get("conn")] = (str(r.get("detail") or kind), by_rule)
            elif phase == "fired" and kind == "error":
                error_by_rule = by_rule
            elif phase == "applied" and kind == "error" and r.get("turn") in turns:
                code = str(r.get("detail") or "").rsplit(" ", 1)[-1]
                error = upstream_error(InjectedError(code)) if code in {e.value for e in InjectedError} else None
                turns[r["turn"]].failures.append(Failure("error", error=error, injected=error_by_rule,
                                                         how=str(r.get("detail"))))
                injected_error[r["turn"]] = injected_error.get(r["turn"], 0) + 1
            elif phase == "applied" and kind == "delay":
                delayed.add(r.get("turn"))
        elif event == "upstream.lost":
            how = str(r.get("how"))
            kind = _BREAKS.get(how)
            if kind is None:
                continue  # rotation: routine, not a failure
            number = r.get("turn")
            by_error = bool(r.get("by_error")) if "by_error" in r else isinstance(r.get("detail"), dict) or "message" in r
            if by_error and number is not None and injected_error.get(number):
                injected_error[number] -= 1  # the loss an injected error caused: counted with the fault
                continue
            failure = Failure(kind, how=how)
            if kind == "close":
                failure.code = _close_code(r, closes)
            elif kind == "error":
                failure.error = _error_event(r.get("message")) or _error_event(r.get("detail"))
            conn = r.get("conn")
            if conn in faulted:
                failure.how, failure.injected = faulted[conn]
            elif kind == "silence" and number in delayed:
                failure.injected = True
            if number is not None and number in turns:
                # The count includes the error event that ended the turn, when one did.
                # Records before by_error existed counted the error event itself among the turn's events.
                failure.after = max(0, int(r.get("events") or 0) - (1 if by_error and "by_error" not in r else 0))
                turns[number].failures.append(failure)
            elif last_ended is not None:
                last_ended.idle.append(failure)
            else:
                session.open_idle.append(failure)
        elif event == "recovery":
            trigger = str(r.get("trigger"))
            if trigger == Trigger.ROTATION.value:
                continue
            action = str(r.get("action"))
            verb = "resumed" if trigger == Trigger.RESUME.value else (
                "resent" if action == Action.SEND.value or action.startswith("resend") else "replayed")
            recoveries.setdefault(r.get("turn"), []).append([verb, trigger])
        elif event == "fail_close":
            fail_close[r.get("turn")] = r
    for turn in session.turns:
        turn.outcome = _outcome(turn, recoveries.get(turn.number, []), fail_close.get(turn.number),
                                lost_close.get(turn.number))
    return session


def _outcome(turn: RecordedTurn, recoveries: list[list[str]], failed: dict[str, Any] | None,
             close: int | None) -> Outcome:
    if failed is not None:
        error = (failed.get("error") or {}).get("error") or {}
        return Outcome("failed closed", recoveries, error.get("code"), failed.get("close_code"))
    if turn.status == "completed":
        return Outcome("recovered" if recoveries else "completed", recoveries)
    if turn.status in ("error", "response.failed", "response.incomplete"):
        return Outcome("client error", recoveries, error_code(turn.error) or turn.status)
    if turn.status == "connection lost":
        return Outcome("connection lost", recoveries, close=close)
    if turn.status == "aborted":
        return Outcome("aborted", recoveries, note="the client left mid-turn")
    return Outcome("no outcome", recoveries)


def error_code(event: dict[str, Any] | None) -> str | None:
    """An error event's code, or its message with response ids blanked out when it has no code."""
    error = event.get("error") if isinstance(event, dict) else None
    if not isinstance(error, dict):
        return None
    if error.get("code"):
        return str(error["code"])
    message = re.sub(r"resp_[A-Za-z0-9]+", "resp_…", str(error.get("message") or ""))
    return message or None


def sessions_from_records(records: Iterable[dict[str, Any]], need_bodies: bool = True) -> list[RecordedSession]:
    by_session: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_session.setdefault(str(record.get("session")), []).append(record)
    sessions = []
    for sid, recs in by_session.items():
        try:
            sessions.append(session_from_records(recs, need_bodies))
        except (TypeError, ValueError, AttributeError, KeyError) as e:
            raise RecordingError(f"session {sid}: a record is malformed ({type(e).__name__}: {e})") from None
    return [s for s in sessions if s.url or s.turns]


# -- reading a file ----------------------------------------------------------------------------
def read_recording(path: str | Path) -> Recording:
    """A trace, a flow file or a fixture, read into the model (raises RecordingError)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise RecordingError(f"cannot read {p}: {e.strerror or e}") from None
    if not data.strip():
        raise RecordingError(f"{p} is empty: nothing to reproduce; {HOW_TO_RECORD}")
    if data.lstrip()[:1] == b"{":
        text = data.decode("utf-8", errors="replace")
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None
        if isinstance(whole, dict) and "replayguard_fixture" in whole:
            return read_fixture(whole, str(p))
        return _read_trace(text, str(p))
    return _read_flows(data, str(p))


def _read_trace(text: str, path: str) -> Recording:
    lines = text.splitlines()
    records, bad = read_records(lines)
    if not records:
        raise RecordingError(f"{path}: no trace records in it (neither a replayguard trace, a flow file nor a "
                             f"fixture); {HOW_TO_RECORD}")
    warnings = []
    stopped = None
    last = len(lines)
    while last and not lines[last - 1].strip():
        last -= 1
    for number in bad:
        if number == last:
            offset = sum(len(line.encode()) + 1 for line in lines[: number - 1])
            stopped = f"line {number} (byte {offset}) is half-written: the trace stops there"
        else:
            warnings.append(f"skipped line {number}: not a whole trace record")
    recording = Recording(path, "trace", sessions_from_records(records), stopped, warnings)
    if not recording.sessions:
        raise RecordingError(f"{path}: no session in this trace; {HOW_TO_RECORD}")
    return recording


# -- flow files ----------------------------------------------------------------------------------
@dataclass
class _Message:
    from_client: bool
    content: bytes
    timestamp: float
    injected: bool


@dataclass
class _Flow:
    """What reproducing needs of one WebSocket flow, from mitmproxy's reader or salvaged from a cut file."""

    id: str | None
    url: str | None
    headers: list[tuple[str, str]]
    messages: list[_Message]
    close_code: int | None = None
    ended: bool = False
    refused: int | None = None  # the upgrade was answered with this status
    started: float = 0.0
    dropped: int = 0  # messages replayguard dropped from the live flow (limits.flow_messages)


def _read_flows(data: bytes, path: str) -> Recording:
    from mitmproxy import exceptions, io  # only flow files need mitmproxy
    import io as stdio

    stream = stdio.BytesIO(data)
    flows: list[_Flow] = []
    stopped = None
    start = 0
    try:
        for flow in io.FlowReader(stream).stream():
            start = stream.tell()
            converted = _convert(flow)
            if converted is not None:
                flows.append(converted)
    except exceptions.FlowReadException as e:
        salvaged = _salvage(data[start:])
        if not flows and salvaged is None:
            if _TNET_START.match(data):  # a flow file, cut before anything of a session could be read
                raise RecordingError(f"{path}: no Responses WebSocket session in this flow file: it ends at byte "
                                     f"{len(data)}, before anything of its first flow could be read; "
                                     f"{HOW_TO_RECORD}") from None
            raise RecordingError(f"{path}: neither a replayguard trace, a fixture nor a mitmproxy flow file ({e}); "
                                 f"{HOW_TO_RECORD}") from None
        where = f"the file ends at byte {len(data)}, in the middle of flow {len(flows) + 1} (from byte {start})"
        if salvaged is not None and salvaged.messages:
            flows.append(salvaged)
            stopped = f"{where}: its first {len(salvaged.messages)} messages were read"
        else:
            stopped = f"{where}: nothing of it could be read"
    recording = Recording(path, "flow file", [], stopped)
    for flow in flows:
        if flow.dropped:
            recording.warnings.append(
                f"flow {flow.id}: {flow.dropped} messages were dropped while it was live (limits.flow_messages): "
                f"its event order and outputs may be incomplete; a trace with trace.bodies: full has them all")
    records: list[dict[str, Any]] = []
    for flow in sorted(flows, key=lambda f: f.started):
        records.extend(_flow_records(flow))
    recording.sessions = sessions_from_records(records)
    if not recording.sessions:
        where = f" ({stopped})" if stopped else ""
        raise RecordingError(f"{path}: no Responses WebSocket session in this flow file{where}; {HOW_TO_RECORD}")
    return recording


def sessions_from_flows(flows: Iterable[Any]) -> list[RecordedSession]:
    """Sessions from WebSocket flows read from elsewhere (a HAR export): objects with :class:`_Flow`'s fields."""
    records: list[dict[str, Any]] = []
    for flow in sorted(flows, key=lambda f: f.started):
        records.extend(_flow_records(flow))
    return sessions_from_records(records)


def _convert(flow: Any) -> _Flow | None:
    request = getattr(flow, "request", None)
    if request is None:
        return None
    url = flow.metadata.get("replayguard_upstream") or request.pretty_url.replace("http", "ws", 1)
    headers = [(k, v) for k, v in request.headers.items(multi=True)]
    ws = getattr(flow, "websocket", None)
    if ws is None:
        response = getattr(flow, "response", None)
        if request.headers.get("upgrade", "").lower() == "websocket" and response is not None \
                and response.status_code >= 400:
            return _Flow(flow.id, url, headers, [], refused=response.status_code, ended=True,
                         started=flow.timestamp_created)
        return None
    messages = [_Message(m.from_client, m.content, m.timestamp, bool(m.injected)) for m in ws.messages]
    return _Flow(flow.id, url, headers, messages, ws.close_code, ws.timestamp_end is not None,
                 started=flow.timestamp_created, dropped=int(flow.metadata.get("replayguard_dropped_messages") or 0))


_TNET_START = re.compile(rb"\d{1,12}:")  # how a mitmproxy flow file (tnetstrings) begins


def _salvage(data: bytes) -> _Flow | None:
    """The WebSocket messages of a flow whose file was cut short: mitmproxy writes a flow's websocket first and
    its messages in order, so a cut flow still holds its first messages whole."""
    state, _ = _tnet_partial(data, 0)
    if not isinstance(state, dict):
        return None
    ws = state.get(b"websocket") or state.get("websocket")
    if not isinstance(ws, dict):
        return None
    raw = ws.get(b"messages") or ws.get("messages") or []
    messages = []
    for m in raw if isinstance(raw, list) else []:
        if isinstance(m, list) and len(m) == 6 and isinstance(m[2], bytes) and isinstance(m[3], float):
            messages.append(_Message(bool(m[1]), m[2], m[3], bool(m[5])))
    flow_id = state.get(b"id") or state.get("id")
    return _Flow(flow_id.decode() if isinstance(flow_id, bytes) else flow_id, None, [], messages,
                 started=messages[0].timestamp if messages else 0.0)


def _tnet_partial(data: bytes, pos: int) -> tuple[Any, bool]:
    """Parse one tnetstring at ``pos`` as far as ``data`` goes: (value, whole). A cut list or dict keeps its whole
    elements; a cut scalar is None."""
    colon = data.find(b":", pos, pos + 12)
    if colon < 0 or not data[pos:colon].isdigit():
        return None, False
    length = int(data[pos:colon])
    begin, end = colon + 1, colon + 1 + length
    if end >= len(data):
        # Cut here: the type character is lost. Read the elements that are whole; a dict's keys are short strings.
        items = _tnet_items(data[begin:])
        keys = items[0::2]
        if items and all(isinstance(k, (str, bytes)) and len(k) < 64 for k in keys) and any(
                isinstance(v, (dict, list)) or not isinstance(v, (str, bytes)) for v in items[1::2]):
            return dict(zip(keys, items[1::2])), False
        return items, False
    kind, body, whole = data[end:end + 1], data[begin:end], True
    if kind == b",":
        return body, whole
    if kind == b"#":
        return int(body), whole
    if kind == b"^":
        return float(body), whole
    if kind == b"!":
        return body == b"true", whole
    if kind == b"~":
        return None, whole
    if kind == b";":
        return body.decode("utf-8", errors="replace"), whole
    if kind == b"]":
        return _tnet_items(body), whole
    if kind == b"}":
        items = _tnet_items(body)
        return dict(zip(items[0::2], items[1::2])), whole
    return None, False


def _tnet_items(body: bytes) -> list[Any]:
    items: list[Any] = []
    pos = 0
    while pos < len(body):
        value, whole = _tnet_partial(body, pos)
        if not whole:
            if isinstance(value, (list, dict)):
                items.append(value)
            break
        items.append(value)
        colon = body.find(b":", pos)
        pos = colon + 1 + int(body[pos:colon]) + 1
    return items


def _flow_records(flow: _Flow) -> list[dict[str, Any]]:
    """Trace-schema records for one flow: replayguard's own (kept in the flow) and the turns rebuilt from the
    client's messages, with the full requests, output items and event order."""
    session: str | None = flow.id
    placed: list[tuple[int, dict[str, Any]]] = []  # (position among the messages, record)
    for index, message in enumerate(flow.messages):
        for record in records_in_flow([message]):
            session = session or record.get("session")
            placed.append((index, record))
    turns = turns_in_flow(flow.messages)
    for turn in turns:
        placed.append((turn.index, {"event": "turn.start", "ts": turn.started, "turn": turn.number,
                                    "body": turn.request, "before": turn.before}))
        if turn.terminal is None:
            continue
        kind = turn.terminal.get("type")
        response = turn.terminal.get("response") if isinstance(turn.terminal.get("response"), dict) else {}
        end: dict[str, Any] = {"event": "turn.end", "ts": turn.ended, "turn": turn.number,
                               "response_id": turn.response_id, "output_items": turn.outputs,
                               "usage": response.get("usage"), "event_types": turn.event_types}
        error = turn.terminal.get("error")
        mine = kind == "error" and str((error if isinstance(error, dict) else {}).get("message", "")).startswith(PREFIX)
        if mine:  # replayguard's fail-close: the upstream's events were those before it
            end.update(status="aborted", event_types=turn.event_types[:-1])
        else:
            end["status"] = "completed" if kind == "response.completed" else kind
            if kind == "error":
                end["error_event"] = turn.terminal
        assert turn.end_index is not None
        placed.append((turn.end_index, end))
    placed.sort(key=lambda entry: entry[0])  # stable: the records one message holds keep their order
    out = [record for _, record in placed]
    last = turns[-1] if turns else None
    if last is not None and last.terminal is None and flow.ended:
        out.append({"event": "turn.end", "turn": last.number, "status": "connection lost",
                    "close": flow.close_code, "output_items": last.items, "event_types": last.event_types})
    session = session or f"flow-{id(flow)}"
    if not any(r["event"] == "session.start" for r in out):
        out.insert(0, {"event": "session.start", "url": flow.url})
    for record in out:
        record["session"] = session
        if record["event"] == "session.start" and not record.get("url"):
            record["url"] = flow.url
    if flow.refused is not None:
        out.insert(1, {"event": "handshake", "session": session, "purpose": "open", "ok": False,
                       "status": flow.refused})
    if not any(r["event"] == "handshake" and r.get("purpose") == "open" for r in out) and flow.headers:
        out.insert(1, {"event": "handshake", "session": session, "purpose": "open", "ok": True, "status": 101,
                       "headers": _client_headers(flow.headers)})
    return out


def _client_headers(headers: list[tuple[str, str]]) -> dict[str, str]:
    from ..core.redact import redact_headers

    skip = {"host", "connection", "upgrade", "sec-websocket-key", "sec-websocket-version",
            "sec-websocket-extensions", "content-length", "user-agent"}
    return redact_headers([(k, v) for k, v in headers if k.lower() not in skip])


# -- fixtures --------------------------------------------------------------------------------------
def to_fixture(recording: Recording) -> dict[str, Any]:
    """The model as a fixture document (redaction is the writer's: see reproduce.write_fixture). Event types are
    run-length coded ("response.output_text.delta*12")."""
    sessions = [asdict(s) for s in recording.sessions]
    for s in sessions:
        for t in s["turns"]:
            if t["events"] is not None:
                t["events"] = _runs(t["events"])
    return {"replayguard_fixture": FIXTURE_VERSION,
            "recorded_from": {"kind": recording.origin or recording.kind, "file": Path(recording.path).name,
                              "stopped": recording.stopped},
            "sessions": sessions}


def _runs(types: list[str]) -> list[str]:
    out: list[str] = []
    count = 0
    for index, kind in enumerate(types):
        count += 1
        if index + 1 == len(types) or types[index + 1] != kind:
            out.append(kind if count == 1 else f"{kind}*{count}")
            count = 0
    return out


def _unruns(runs: list[str]) -> list[str]:
    out: list[str] = []
    for run in runs:
        kind, star, count = run.rpartition("*")
        out += [kind] * int(count) if star and count.isdigit() else [run]
    return out


def read_fixture(doc: dict[str, Any], path: str) -> Recording:
    if doc.get("replayguard_fixture") != FIXTURE_VERSION:
        raise RecordingError(f"{path}: fixture version {doc.get('replayguard_fixture')!r} is not supported "
                             f"(this replayguard reads version {FIXTURE_VERSION})")
    try:
        sessions = []
        for s in doc["sessions"]:
            turns = []
            for t in s.get("turns", []):
                t = dict(t)
                if t.get("events") is not None:
                    t["events"] = _unruns(t["events"])
                t["failures"] = [Failure(**f) for f in t.get("failures", [])]
                t["idle"] = [Failure(**f) for f in t.get("idle", [])]
                t["outcome"] = Outcome(**t["outcome"])
                turns.append(RecordedTurn(**t))
            s = dict(s, turns=turns, open_idle=[Failure(**f) for f in s.get("open_idle", [])])
            sessions.append(RecordedSession(**s))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RecordingError(f"{path}: not a valid replayguard fixture ({type(e).__name__}: {e})") from None
    origin = (doc.get("recorded_from") or {}).get("kind")
    return Recording(path, "fixture", sessions, stopped=(doc.get("recorded_from") or {}).get("stopped"),
                     origin=origin)
