"""`python -m replayguard trace FILE`: a chain trace (or a mitmproxy flow file) as a timeline a person reads at a
glance, and the diagnosis of where a chain broke.

The model (:func:`build_sessions`) is pure: it takes trace records (from the live trace, or rebuilt from a flow
file's WebSocket messages by :func:`records_from_flows`) and rebuilds each turn's context as the upstream sees
it, to find the call_id a "No tool call found ..." or "No tool output found ..." error is about.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

from ..core.pairing import CALL_TYPES, OUTPUT_CALLS
from ..core.records import (OMITTED, Bodies, error_fields, read_records, records_in_flow, summarize_item,
                            turn_start_fields, turns_in_flow)
from ..core.redact import redact_url

Summary = dict[str, Any]


# -- reading ---------------------------------------------------------------------------------------
class ReadError(Exception):
    """The file is neither a readable trace nor a mitmproxy flow file."""


def load(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Records from any file `trace` reads (a trace, a flow file, a fixture, a Codex rollout, a HAR export: told
    apart by content, see :mod:`replayguard.tools.sources`), and warnings about what was skipped."""
    from .sources import trace_records

    records, warnings, _ = trace_records(path)
    return records, warnings


def read_trace(path: Path, text: str) -> tuple[list[dict[str, Any]], list[str]]:
    records, bad = read_records(text.splitlines())
    return records, [f"{path}: skipped line {n}: not a whole trace record" for n in bad]


def records_from_flows(path: str | Path) -> list[dict[str, Any]]:
    """Trace records for what each recorded WebSocket client saw (`mitmdump -w FILE`)."""
    from mitmproxy import exceptions, io  # only the flow reader needs mitmproxy

    records: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as f:
            for flow in io.FlowReader(f).stream():
                if getattr(flow, "websocket", None) is not None:
                    records.extend(_flow_records(flow))
    except exceptions.FlowReadException as e:
        raise ReadError(f"{path}: neither a replayguard trace nor a mitmproxy flow file ({e})") from None
    return records


def _flow_records(flow: Any) -> list[dict[str, Any]]:
    ws = flow.websocket
    url = flow.metadata.get("replayguard_upstream") or flow.request.pretty_url.replace("http", "ws", 1)
    end = ws.timestamp_end or (ws.messages[-1].timestamp if ws.messages else 0)
    reason = (f"closed by {'client' if ws.closed_by_client else 'server'}" if ws.close_code is not None else "open")
    return flow_records(flow.id, url, ws.messages, flow.timestamp_created, end, ws.close_code, reason)


def flow_records(session: str, url: str, messages: list[Any], created: float, ended: float,
                 close_code: int | None, reason: str, source: str = "flow") -> list[dict[str, Any]]:
    """The records of one WebSocket session, however its messages were saved (a flow file, a HAR export; each
    message has ``from_client``, ``content``, ``timestamp`` and ``injected``): replayguard's own (kept in the flow:
    connections, recoveries, faults, fail-closes), and the turns rebuilt from the messages the client really sent
    and received, with the whole requests and output items (``body``, ``output_items``) for the HTML report."""
    kept = records_in_flow(messages)
    out: list[dict[str, Any]] = [r for r in kept if r["event"] not in ("session.start", "session.end")]
    start = next((r for r in kept if r["event"] == "session.start"), None)
    out.insert(0, {**(start or {"ts": created, "session": session, "event": "session.start",
                                "url": redact_url(url)}), "source": source})
    completed = failed = 0
    for turn in turns_in_flow(messages):
        out.append({"ts": turn.started, "session": session, "event": "turn.start", "turn": turn.number,
                    "conn": None, **turn_start_fields(turn.request, turn.size, Bodies.SUMMARY), "body": turn.request})
        if turn.terminal is None:
            continue
        kind = turn.terminal.get("type")
        response = turn.terminal.get("response") if isinstance(turn.terminal.get("response"), dict) else {}
        status = "completed" if kind == "response.completed" else kind
        record = {"ts": turn.ended, "session": session, "event": "turn.end", "turn": turn.number, "conn": None,
                  "status": status, "response_id": turn.response_id,
                  "previous_response_id": turn.request.get("previous_response_id"),
                  "output": [summarize_item(i, Bodies.SUMMARY) for i in turn.outputs],
                  "output_items": turn.outputs, "ms": round((turn.ended - turn.started) * 1000, 1)}
        if isinstance(response.get("usage"), dict):
            record["usage"] = response["usage"]
        if kind == "error":
            record["error"] = error_fields(turn.terminal)
            record["error_event"] = turn.terminal
        out.append(record)
        completed += status == "completed"
        failed += status != "completed"
    end = next((r for r in kept if r["event"] == "session.end"), None)
    out.append(end or {"ts": ended, "session": session, "event": "session.end", "turns_completed": completed,
                       "turns_failed": failed, "close_code": close_code, "reason": reason})
    out.sort(key=lambda r: r.get("ts") or 0)
    return out


# -- the model ------------------------------------------------------------------------------------
@dataclass
class TurnView:
    number: int
    previous_response_id: str | None = None
    input: list[Summary] = field(default_factory=list)
    output: list[Summary] = field(default_factory=list)
    response_id: str | None = None
    status: str = "in flight"
    ms: float | None = None
    model: str | None = None
    store: bool = True
    generate: bool = True  # False: a warm-up (Codex's first turn), which prepares the connection and generates nothing
    chains_on: str | None = None  # "turn 2", or "session X turn 2", or None
    error: dict[str, Any] | None = None
    replayed_input: list[Summary] | None = None  # what a recovery really sent
    ts: float = 0.0  # when the client sent it


@dataclass
class CallView:
    call_id: str
    call: str | None = None  # "turn 1 output"
    answer: str | None = None  # "turn 2 input"
    state: str = "no output yet"


@dataclass
class SessionView:
    id: str
    url: str = ""
    source: str = "trace"
    turns: list[TurnView] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (ts, line) for losses, recoveries, ...
    calls: dict[str, CallView] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    recoveries: int = 0
    failed_closed: bool = False
    end: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["timeline"] = [{"ts": ts, "line": line} for ts, line in self.timeline]
        data["calls"] = list(data["calls"].values())
        return data


def build_sessions(records: Iterable[dict[str, Any]]) -> list[SessionView]:
    sessions: dict[str, SessionView] = {}
    order: list[tuple[float, str, dict[str, Any]]] = []
    for record in records:
        sid = str(record.get("session"))
        view = sessions.setdefault(sid, SessionView(sid))
        _apply(view, record)
        order.append((record.get("ts") or 0.0, sid, record))
    by_response: dict[str, tuple[SessionView, TurnView]] = {}
    for view in sessions.values():
        for turn in view.turns:
            if turn.response_id:
                by_response[turn.response_id] = (view, turn)
    for view in sessions.values():
        _diagnose(view, by_response)
    return list(sessions.values())


def _turn(view: SessionView, number: Any) -> TurnView | None:
    for turn in reversed(view.turns):
        if turn.number == number:
            return turn
    return None


def _summaries(value: Any) -> list[Summary]:
    """Item summaries as the model needs them, whatever a (possibly broken or hostile) file holds: objects only,
    a type and a call_id that are strings or absent."""
    if not isinstance(value, list):
        return []
    out = []
    for item in value:
        if not isinstance(item, dict):
            continue
        summary = dict(item)
        kind = summary.get("type")
        summary["type"] = kind if isinstance(kind, str) or kind is None else f"<{type(kind).__name__}>"
        for key in ("call_id", "id"):
            if key in summary and not isinstance(summary[key], str):
                del summary[key]
        out.append(summary)
    return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _kinds(items: list[Summary]) -> str:
    return ", ".join(f"{i.get('type')}({i['call_id']})" if "call_id" in i else str(i.get("type")) for i in items) or "-"


def _apply(view: SessionView, r: dict[str, Any]) -> None:
    event, ts = r["event"], r.get("ts") or 0.0
    if not isinstance(ts, (int, float)):
        ts = 0.0
    if event == "session.start":
        view.url = str(r.get("url", ""))
        view.source = str(r.get("source", "trace"))
    elif event == "turn.start":
        number = r.get("turn")
        view.turns.append(TurnView(number=number if isinstance(number, int) else len(view.turns) + 1, ts=ts,
                                   previous_response_id=_text(r.get("previous_response_id")),
                                   input=_summaries(r.get("input")), model=_text(r.get("model")),
                                   store=r.get("store", True) is not False,
                                   generate=r.get("generate", True) is not False))
    elif event == "turn.end":
        turn = _turn(view, r.get("turn"))
        if turn is None:
            return
        turn.status = str(r.get("status", "?"))
        turn.response_id = _text(r.get("response_id"))
        turn.output = _summaries(r.get("output"))
        turn.ms = r.get("ms") if isinstance(r.get("ms"), (int, float)) else None
        turn.error = r.get("error") if isinstance(r.get("error"), dict) else None
        if turn.status == "aborted":
            view.timeline.append((ts, f"turn {turn.number} aborted: {r.get('reason', '')}"))
    elif event == "handshake":
        if r.get("purpose") != "open" or not r.get("ok"):
            what = f"upstream #{r['conn']} opened" if r.get("ok") else f"handshake refused: HTTP {r.get('status')}"
            why = f" ({r.get('purpose')}{', injected' if r.get('injected') else ''})"
            view.timeline.append((ts, f"{'+' if r.get('ok') else '!'} {what}{why}"))
    elif event == "upstream.closed":
        code = r.get("code")
        view.timeline.append((ts, f"- upstream #{r.get('conn')} closed"
                                  f" ({'close ' + str(code) if code is not None else 'no close frame'}"
                                  f"{': ' + r['reason'] if r.get('reason') else ''})"))
    elif event == "upstream.lost":
        where = f"during turn {r['turn']}" if r.get("turn") is not None else "while idle"
        detail = r.get("detail")
        if isinstance(detail, dict):
            detail = detail.get("code") or detail.get("message")
        conn = f" #{r['conn']}" if r.get("conn") is not None else ""
        seen = " (seen by the client)" if r.get("by") == "client" else ""
        view.timeline.append((ts, f"! upstream{conn} lost {where}{seen}: {r.get('how')} ({detail})"))
    elif event == "recovery":
        view.recoveries += 1
        turn = _turn(view, r.get("turn"))
        removed = r.get("removed_previous_response_id")
        what = ", ".join(filter(None, [f"{r['items']} items" if r.get("items") is not None else "",
                                       f"previous_response_id {removed} removed" if removed else ""]))
        action = str(r.get("action", ""))
        verb = "replayed" if action.startswith("replay") else "resent"
        on = f" on upstream #{r['to_conn']}" if r.get("to_conn") is not None else ""
        view.timeline.append((ts, f"↻ turn {r.get('turn')} {verb}{on} after {r.get('trigger')}"
                                  f"{' (' + what + ')' if what else ''}"))
        if turn is not None and r.get("input") is not None:
            turn.replayed_input = _summaries(r["input"])
    elif event == "fail_close":
        view.failed_closed = True
        error = (r.get("error") or {}).get("error") or {}
        code = error.get("code") or "no error event"
        view.timeline.append((ts, f"✗ turn {r.get('turn')} failed closed ({code}, close {r.get('close_code')}): "
                                  f"{r.get('reason')}"))
    elif event == "fault":
        view.timeline.append((ts, f"⚡ injected fault ({r.get('phase', 'fired')}"
                                  f"{' after turn ' + str(r['turn']) if r.get('phase', 'fired') == 'fired' else ''}): "
                                  f"{r.get('detail')}"))
    elif event == "session.end":
        view.end = r.get("reason")


def describe(record: dict[str, Any]) -> str | None:
    """The timeline line one record makes (None for records that make none): for the HTML report."""
    scratch = SessionView("")
    _apply(scratch, record)
    return scratch.timeline[-1][1] if scratch.timeline else None


def _context(view: SessionView, turn: TurnView, by_response: dict[str, tuple[SessionView, TurnView]],
             depth: int = 0) -> list[Summary] | None:
    """The input the upstream sees for ``turn`` (None when the chain it names is not in the file)."""
    if turn.previous_response_id is None:
        return list(turn.input)
    found = by_response.get(turn.previous_response_id)
    if found is None or depth > 10_000:
        return None
    pview, parent = found
    base = _context(pview, parent, by_response, depth + 1)
    if base is None:
        return None
    return base + parent.output + turn.input


def _orphans(items: list[Summary]) -> list[tuple[int, Summary]]:
    if any(item.get("type") == OMITTED for item in items):
        return []  # the trace left items out of a huge request: their calls may be among them
    seen: set[str] = set()
    out = []
    for index, item in enumerate(items):
        kind = item.get("type")
        if kind in CALL_TYPES and isinstance(item.get("call_id") or item.get("id"), str):
            seen.add(item.get("call_id") or item.get("id"))
        elif kind in OUTPUT_CALLS and item.get("call_id") not in seen:
            out.append((index, item))
    return out


def _diagnose(view: SessionView, by_response: dict[str, tuple[SessionView, TurnView]]) -> None:
    where_called: dict[str, str] = {}
    for turn in view.turns:
        for item in turn.output:
            if item.get("type") in CALL_TYPES and item.get("call_id"):
                where_called.setdefault(item["call_id"], f"turn {turn.number} output")
                view.calls.setdefault(item["call_id"], CallView(item["call_id"], call=f"turn {turn.number} output"))
        for item in turn.input:
            if item.get("type") in CALL_TYPES and item.get("call_id"):
                where_called.setdefault(item["call_id"], f"turn {turn.number} input")
    for turn in view.turns:
        if turn.previous_response_id is not None:
            found = by_response.get(turn.previous_response_id)
            if found is None:
                view.problems.append(
                    f"turn {turn.number}: previous_response_id {turn.previous_response_id} names no response in "
                    f"this file: the chain is broken here (without store=true the upstream answers "
                    f"previous_response_not_found)")
            else:
                pview, parent = found
                turn.chains_on = f"turn {parent.number}" if pview is view else f"session {pview.id} turn {parent.number}"
                answered = {i.get("call_id") for i in turn.input if i.get("type") in OUTPUT_CALLS}
                for item in parent.output:
                    if item.get("type") in CALL_TYPES and item.get("call_id") not in answered:
                        view.problems.append(
                            f"turn {turn.number}: continues {turn.chains_on} whose {item.get('type')} "
                            f"{item.get('call_id')} has no output in this request (the upstream answers: No tool "
                            f"output found for function call {item.get('call_id')}.)")
        for item in turn.input:
            if item.get("type") in OUTPUT_CALLS and item.get("call_id"):
                call = view.calls.setdefault(item["call_id"], CallView(item["call_id"],
                                                                       call=where_called.get(item["call_id"])))
                call.answer = f"turn {turn.number} input"
                call.state = "paired"
        contexts = [("request", _context(view, turn, by_response))]
        reported = len(view.problems)
        if turn.replayed_input is not None:
            contexts.append(("replay", turn.replayed_input))
        for label, context in contexts:
            if context is None:
                continue
            for _, item in _orphans(context):
                call_id = item.get("call_id")
                if label == "request" and not any(o.get("call_id") == call_id for o in turn.input):
                    continue  # an orphan from an earlier turn is reported there
                elsewhere = where_called.get(call_id)
                hint = (f"; its call is in {elsewhere}, which this request does not chain on" if elsewhere
                        else "; no call with this call_id anywhere in the session")
                subject = "the replay replayguard sent" if label == "replay" else "the request"
                view.problems.append(
                    f"turn {turn.number}: {item.get('type')} call_id {call_id} has no call before it in {subject} "
                    f"(the upstream answers: No tool call found for function call output with call_id {call_id}.)"
                    f"{hint}")
                if call_id in view.calls:
                    view.calls[call_id].state = "ORPHANED"
        if len(view.problems) == reported:
            _upstream_said(view, turn, where_called)


_NO_CALL = re.compile(r"No tool call found for function call output with call_id (\S+?)\.?$")
_NO_OUTPUT = re.compile(r"No tool output found for function call (\S+?)\.?$")


def _upstream_said(view: SessionView, turn: TurnView, where_called: dict[str, str]) -> None:
    """The upstream rejected the turn over a call_id although the chain in this file pairs it: the upstream did not
    have the chain the request names (a client's own session file shows its history, not what reached the
    upstream)."""
    message = str((turn.error or {}).get("message") or "")
    found = _NO_CALL.search(message) or _NO_OUTPUT.search(message)
    if found is None:
        return
    call_id = found.group(1)
    elsewhere = where_called.get(call_id)
    if found.re is _NO_CALL:
        if elsewhere is None:
            where = "no call with this call_id anywhere in the session"
        elif turn.chains_on is None:
            where = f"its call is in {elsewhere}, which this request does not chain on"
        else:
            where = (f"its call is in {elsewhere}, which this request chains on: the upstream did not have that part "
                     f"of the chain (it lost the connection-local response, or something between sent the output "
                     f"without its call)")
        view.problems.append(f"turn {turn.number}: the upstream answered \"{message}\"; {where}")
        view.calls.setdefault(call_id, CallView(call_id, call=elsewhere, answer=f"turn {turn.number} input"))
        view.calls[call_id].state = "ORPHANED"
    else:
        view.problems.append(f"turn {turn.number}: the upstream answered \"{message}\"; the call is "
                             f"{'in ' + elsewhere if elsewhere else 'not in this file'}, and this request carries "
                             f"no output for it")


# -- output ---------------------------------------------------------------------------------------
class _Style:
    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text


def render(sessions: list[SessionView], out: TextIO, color: bool = False) -> None:
    s = _Style(color)
    for view in sessions:
        done = sum(t.status == "completed" for t in view.turns)
        warmups = sum(not t.generate for t in view.turns)
        out.write(s(f"session {view.id}", "1") + f"  {view.url}  [{view.source}]\n")
        out.write(f"  {len(view.turns)} turns ({done} completed{f', {warmups} warm-up' if warmups else ''}), "
                  f"{view.recoveries} "
                  f"{'recovery' if view.recoveries == 1 else 'recoveries'}"
                  f"{', failed closed' if view.failed_closed else ''}\n")
        for line in _interleave(view, s):
            out.write(line + "\n")
        if view.calls:
            out.write("  calls:\n")
            for call in view.calls.values():
                state = s(call.state, "31") if call.state == "ORPHANED" else call.state
                out.write(f"    {call.call_id}: called in {call.call or '?'}, answered in {call.answer or '-'}"
                          f"  [{state}]\n")
        if view.problems:
            out.write(s("  problems:", "31;1") + "\n")
            for problem in view.problems:
                out.write(f"    ✗ {problem}\n")
        if view.end:
            out.write(f"  end: {view.end}\n")
        out.write("\n")


def _interleave(view: SessionView, s: _Style) -> list[str]:
    """Turns in order, each followed by what happened before the next turn was sent."""
    timeline = sorted(view.timeline, key=lambda e: e[0])
    lines: list[str] = []
    index = 0
    while index < len(timeline) and view.turns and timeline[index][0] < view.turns[0].ts:
        lines.append("  " + timeline[index][1])
        index += 1
    for position, turn in enumerate(view.turns):
        chain = f" <- {turn.chains_on}" if turn.chains_on else (
            f" <- {turn.previous_response_id} (unknown)" if turn.previous_response_id else "")
        status = turn.status if turn.status == "completed" else s(turn.status, "31")
        ms = f"{turn.ms:.0f} ms" if isinstance(turn.ms, (int, float)) else "-"
        error = ""
        if turn.error:
            error = f"  error {turn.error.get('status')} {turn.error.get('code')}: {turn.error.get('message')}"
        if turn.generate:
            what = f"in: {_kinds(turn.input)}  out: {_kinds(turn.output)}"
        else:  # generate: false, nothing comes out: say what the turn is for instead of an empty output
            what = f"warm-up (generate: false: prepares the connection, generates nothing; in: {_kinds(turn.input)})"
        lines.append(f"  turn {turn.number:<3} {turn.response_id or '-'}{chain}  {status}  {ms}  {what}{error}")
        limit = view.turns[position + 1].ts if position + 1 < len(view.turns) else None
        while index < len(timeline) and (limit is None or timeline[index][0] < limit):
            lines.append("    " + timeline[index][1])
            index += 1
    while index < len(timeline):
        lines.append("    " + timeline[index][1])
        index += 1
    return lines


def main(path: str, as_json: bool = False, session: str | None = None, check: bool = False,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr, html: str | None = None) -> int:
    from .sources import trace_records

    try:
        records, warnings, kind = trace_records(path)
    except ReadError as e:
        err.write(f"replayguard trace: {e}\n")
        return 1
    for warning in warnings:
        err.write(f"replayguard trace: warning: {warning}\n")
    sessions = build_sessions(records)
    if session is not None:
        sessions = [v for v in sessions if v.id.startswith(session)]
    if html is not None:
        from .report import render as page

        try:
            target = Path(html)
            target.write_text(page(sessions, records, Path(path).name, kind, warnings), encoding="utf-8")
        except OSError as e:
            err.write(f"replayguard trace: cannot write {html}: {e.strerror or e}\n")
            return 1
        problems = sum(len(v.problems) for v in sessions)
        out.write(f"wrote {target} ({len(sessions)} sessions, {problems} problems)\n")
    elif as_json:
        json.dump({"sessions": [v.to_json() for v in sessions]}, out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        if not sessions:
            out.write("no sessions in this file\n")
        render(sessions, out, color=out.isatty())
    return 2 if check and any(v.problems for v in sessions) else 0
