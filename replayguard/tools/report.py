"""`replayguard trace FILE --html report.html`: the chain as one self-contained page (no script, no network, no
external asset; a Content-Security-Policy that allows inline styles only): per session a row per turn on a time
axis, every tool call linked to its output and back, replays, faults, losses and fail-closes marked where they
happened, ORPHANED outputs in red, and every turn, item and event expandable to its JSON.

It is drawn from the viewer's model (:func:`replayguard.tools.viewer.build_sessions`) and the records it was built
from, so it shows the same timeline and diagnosis as the text output, from every format `trace` reads. Everything
taken from the recording is escaped (it is untrusted input) and scrubbed of secrets (:func:`core.redact.scrub`);
element ids are made here, never taken from the recording.
"""

from __future__ import annotations

import json
import time
from html import escape
from typing import Any, Iterable

from ..core.pairing import CALL_TYPES, OUTPUT_CALLS
from ..core.redact import scrub
from .viewer import SessionView, TurnView, describe

MAX_JSON = 20_000  # characters of one item's JSON shown; the rest is counted
MAX_CHIPS = 100  # items of one request drawn
# record event -> (marker class, symbol, what it is)
MARKERS = {
    "recovery": ("replay", "↻", "replayed"),
    "fault": ("fault", "⚡", "fault injected"),
    "upstream.lost": ("loss", "!", "upstream lost"),
    "fail_close": ("fail-close", "✗", "failed closed"),
}

STYLE = """
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#1d2330;background:#f6f7f9}
h1{font-size:18px;margin:0 0 4px} h2{font-size:15px;margin:0} .muted{color:#667085}
.session{background:#fff;border:1px solid #d0d5dd;border-radius:6px;margin:14px 0;padding:10px 12px}
.session.has-problems{border-color:#d92d20}
.summary{margin:2px 0 8px}
.axis,.turn{display:grid;grid-template-columns:300px 1fr;gap:8px;align-items:start}
.axis .track{height:16px;border-bottom:1px solid #98a2b3}
.tick{position:absolute;top:0;font-size:10px;color:#667085;transform:translateX(-50%);white-space:nowrap}
.tick.first{transform:none}.tick.last{transform:translateX(-100%)}
.track{position:relative;height:22px;background:#f2f4f7;border-radius:3px}
.turn{border-top:1px solid #eaecf0;padding:5px 0}
.turn:target{background:#fffaeb}
.label a{color:inherit} .rid{font-family:ui-monospace,monospace;font-size:12px}
.bar{position:absolute;top:4px;height:14px;min-width:3px;border-radius:3px;background:#12b76a}
.bar.st-error,.bar.st-connection-lost,.bar.st-refused,.bar.st-aborted,.bar.st-response-failed{background:#f04438}
.bar.st-in-flight,.bar.st-response-incomplete{background:#f79009}
.status{font-weight:600} .status.bad{color:#d92d20}
.marker{position:absolute;top:0;transform:translateX(-50%);width:18px;height:20px;line-height:20px;text-align:center;
 font-weight:700;border-radius:9px;font-size:12px;text-decoration:none}
.marker.replay{background:#2e90fa;color:#fff}.marker.fault{background:#fdb022;color:#000}
.marker.loss{background:#475467;color:#fff}.marker.fail-close{background:#d92d20;color:#fff}
.items{grid-column:2;display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start}
.items .sep{color:#98a2b3;padding:2px}
details.item{display:inline-block;border:1px solid #d0d5dd;border-radius:4px;background:#fff;max-width:100%}
details.item>summary{cursor:pointer;padding:1px 5px;font-family:ui-monospace,monospace;font-size:12px}
details.item.call{border-color:#7a5af8} details.item.output{border-color:#12b76a}
details.item.orphaned{border:2px solid #d92d20;background:#fef3f2}
.orphan-badge{background:#d92d20;color:#fff;font-weight:700;padding:0 4px;border-radius:3px;margin-left:4px}
details.item:target{outline:3px solid #fdb022}
pre{margin:0;padding:6px;max-height:420px;overflow:auto;background:#f9fafb;font-size:11px;white-space:pre-wrap;
 word-break:break-all}
.events{grid-column:2;margin:2px 0 0;padding:0;list-style:none}
.events li{margin:1px 0}
.events details>summary{cursor:pointer}
.ev-replay{color:#175cd3}.ev-fault{color:#b54708}.ev-loss{color:#344054}.ev-fail-close{color:#d92d20;font-weight:600}
table.calls{border-collapse:collapse;margin-top:8px} .calls td,.calls th{border:1px solid #eaecf0;padding:2px 6px}
tr.orphaned td{background:#fef3f2;color:#b42318;font-weight:600}
.problems{color:#b42318;margin:8px 0 0 0} .problems li{margin:3px 0}
.legend span{margin-right:12px}
"""


def _text(value: Any) -> str:
    """Escaped, scrubbed text from the recording."""
    return escape(scrub(str(value)), quote=True)


def _json(value: Any) -> str:
    text = json.dumps(value, indent=1, ensure_ascii=False, default=str)
    if len(text) > MAX_JSON:
        text = text[:MAX_JSON] + f"\n… {len(text) - MAX_JSON} more characters"
    return _text(text)


def _clock(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _slug(value: Any) -> str:
    return "".join(c if c.isalnum() else "-" for c in str(value)).strip("-").lower() or "unknown"


class _Session:
    """One session's page section: ids made here, positions on its own time axis."""

    def __init__(self, index: int, view: SessionView, records: list[dict[str, Any]]) -> None:
        self.index, self.view, self.records = index, view, records
        stamps = [r["ts"] for r in records if isinstance(r.get("ts"), (int, float)) and r["ts"] > 0]
        stamps += [t.ts for t in view.turns if t.ts]
        self.t0 = min(stamps) if stamps else 0.0
        self.span = max((max(stamps) - self.t0) if stamps else 0.0, 1e-3)
        self.starts = {r.get("turn"): r for r in records if r["event"] == "turn.start"}
        self.ends = {r.get("turn"): r for r in records if r["event"] == "turn.end"}
        self.call_ids: dict[str, str] = {}

    def pos(self, ts: Any) -> float:
        if not isinstance(ts, (int, float)) or ts <= 0:
            return 0.0
        return max(0.0, min(100.0, (ts - self.t0) / self.span * 100))

    def turn_id(self, number: Any) -> str:
        return f"s{self.index}-t{_slug(number)}"

    def call_ref(self, call_id: str) -> str:
        return self.call_ids.setdefault(call_id, f"s{self.index}-c{len(self.call_ids) + 1}")


def _items(turn_items: list[dict[str, Any]], full: Any) -> list[Any]:
    """The whole items when the record kept them (same count as the summaries), else the summaries."""
    if isinstance(full, list) and len(full) == len(turn_items):
        return full
    return turn_items


def _cap(pairs: list[tuple[dict[str, Any], Any]], keep: Any) -> list[tuple[dict[str, Any], Any]]:
    """At most MAX_CHIPS items of a request drawn, and every item ``keep`` says must be (an ORPHANED output): a
    client resending its whole history every turn would otherwise make the page grow with the square of the
    session. The first and last half are kept; runs of items left out are counted in their place."""
    if len(pairs) <= MAX_CHIPS:
        return pairs
    half = MAX_CHIPS // 2
    out, run = pairs[:half], 0
    for pair in pairs[half:-half]:
        if keep(pair[0]):
            if run:
                out.append(({"type": "…", "omitted": run}, None))
            out.append(pair)
            run = 0
        else:
            run += 1
    if run:
        out.append(({"type": "…", "omitted": run}, None))
    return out + pairs[-half:]


def _orphaned(s: _Session, summary: dict[str, Any]) -> bool:
    call = s.view.calls.get(summary.get("call_id")) if isinstance(summary.get("call_id"), str) else None
    return summary.get("type") in OUTPUT_CALLS and call is not None and call.state == "ORPHANED"


def _chip(s: _Session, summary: dict[str, Any], item: Any, side: str, turn: TurnView) -> str:
    kind = summary.get("type")
    call_id = summary.get("call_id")
    label = _text(kind) + (f"({_text(call_id)})" if call_id else "")
    if summary.get("role"):
        label += f" <span class='muted'>{_text(summary['role'])}</span>"
    if summary.get("omitted"):
        return f"<span class='gap muted'>… {_text(summary['omitted'])} items left out</span>"
    classes, anchor, extra = ["item"], "", ""
    call = s.view.calls.get(call_id) if isinstance(call_id, str) else None
    if kind in CALL_TYPES and isinstance(call_id, str):
        classes.append("call")
        if side == "out":
            anchor = f" id='{s.call_ref(call_id)}-call'"
        if call is not None and call.answer:
            extra = (f" <a class='call-link to-output' href='#{s.call_ref(call_id)}-output'>"
                     f"→ output in {_text(call.answer)}</a>")
    elif kind in OUTPUT_CALLS and isinstance(call_id, str):
        classes.append("output")
        anchor = f" id='{s.call_ref(call_id)}-output'"
        orphaned = call is not None and call.state == "ORPHANED"
        if orphaned:
            classes.append("orphaned")
            extra = "<span class='orphan-badge'>ORPHANED</span>"
        if call is not None and call.call:
            extra += (f" <a class='call-link to-call' href='#{s.call_ref(call_id)}-call'>"
                      f"← call in {_text(call.call)}</a>")
        elif not orphaned:
            extra += " <span class='muted'>(its call is not in this file)</span>"
    return (f"<details class='{' '.join(classes)}'{anchor} data-type='{_text(kind)}'>"
            f"<summary>{label}{extra}</summary><pre>{_json(item)}</pre></details>")


def _events(s: _Session, start: float, end: float | None) -> list[tuple[dict[str, Any], str]]:
    """The session's marked records from one turn's start to the next's, each with its timeline line."""
    out = []
    for record in s.records:
        if record["event"] not in MARKERS and not (record["event"] == "handshake" and not record.get("ok")):
            continue
        ts = record.get("ts") if isinstance(record.get("ts"), (int, float)) else 0
        if ts >= start and (end is None or ts < end):
            out.append((record, describe(record) or record["event"]))
    return out


def _marker_class(record: dict[str, Any]) -> tuple[str, str, str]:
    if record["event"] == "handshake":
        return "loss", "!", "handshake refused"
    return MARKERS[record["event"]]


def _turn_row(s: _Session, turn: TurnView, events: list[tuple[dict[str, Any], str]]) -> str:
    start, end = s.starts.get(turn.number, {}), s.ends.get(turn.number, {})
    begin = s.pos(turn.ts)
    finish = s.pos(end.get("ts")) if end else begin
    status = turn.status
    bad = status != "completed"
    chain = ""
    if turn.chains_on:
        target = turn.chains_on.rsplit(" ", 1)[-1]
        chain = (f" ← <a href='#{s.turn_id(target)}'>{_text(turn.chains_on)}</a>" if turn.chains_on.startswith("turn")
                 else f" ← {_text(turn.chains_on)}")
    elif turn.previous_response_id:
        chain = f" ← <span class='status bad'>{_text(turn.previous_response_id)} (not in this file)</span>"
    ms = f"{turn.ms:.0f} ms" if isinstance(turn.ms, (int, float)) else ""
    error = ""
    if turn.error:
        what = " ".join(_text(turn.error[k]) for k in ("status", "code") if turn.error.get(k) is not None)
        error = f"<div class='status bad error'>error {what}: {_text(turn.error.get('message'))}</div>"
    markers = "".join(
        f"<a class='marker {cls}' href='#{s.turn_id(turn.number)}-e{n}' style='left:{s.pos(r.get('ts')):.3f}%' "
        f"title='{_text(line)}'>{symbol}</a>"
        for n, (r, line) in enumerate(events) for cls, symbol, _ in [_marker_class(r)])
    inputs = _items(turn.input, (start.get("body") or {}).get("input") if isinstance(start.get("body"), dict) else None)
    outputs = _items(turn.output, end.get("output_items"))
    chips = [_chip(s, summary, item, "in", turn) for summary, item in _cap(list(zip(turn.input, inputs)),
                                                                            lambda i: _orphaned(s, i))]
    chips.append("<span class='sep'>→</span>")
    chips += [_chip(s, summary, item, "out", turn) for summary, item in zip(turn.output, outputs)] or [
        "<span class='muted'>no output</span>"]
    record_json = {"turn.start": start, "turn.end": end} if end else {"turn.start": start}
    event_items = "".join(
        f"<li id='{s.turn_id(turn.number)}-e{n}' class='ev-{cls}'><details><summary>{_text(line)}</summary>"
        f"<pre>{_json(r)}</pre></details></li>"
        for n, (r, line) in enumerate(events) for cls, symbol, _ in [_marker_class(r)])
    orphaned = any(_orphaned(s, i) for i in turn.input)
    return (f"<div class='turn{' orphaned' if orphaned else ''}' id='{s.turn_id(turn.number)}' "
            f"data-turn='{_text(turn.number)}' data-status='{_text(status)}'>"
            f"<div class='label'><b>turn {_text(turn.number)}</b> <span class='rid'>{_text(turn.response_id or '-')}"
            f"</span>{chain}<br><span class='status{' bad' if bad else ''}'>{_text(status)}</span> {ms}"
            f"<details class='item record'><summary>JSON</summary><pre>{_json(record_json)}</pre></details>"
            f"{error}</div>"
            f"<div class='track'><div class='bar st-{_slug(status)}' style='left:{begin:.3f}%;"
            f"width:{max(finish - begin, 0.4):.3f}%'></div>{markers}</div>"
            f"<div class='items'>{''.join(chips)}</div>"
            f"{'<ul class=events>' + event_items + '</ul>' if event_items else ''}</div>")


def _session(s: _Session) -> str:
    view = s.view
    done = sum(t.status == "completed" for t in view.turns)
    parts = [f"<section class='session{' has-problems' if view.problems else ''}' id='s{s.index}' "
             f"data-session='{_text(view.id)}'>",
             f"<h2>session {_text(view.id)}</h2>",
             f"<div class='summary'>{_text(view.url)} <span class='muted'>[{_text(view.source)}]</span><br>"
             f"{len(view.turns)} turns ({done} completed), {view.recoveries} "
             f"{'recovery' if view.recoveries == 1 else 'recoveries'}"
             f"{', <b class=status bad>failed closed</b>' if view.failed_closed else ''}"
             f"{', end: ' + _text(view.end) if view.end else ''}</div>"]
    edge = {0: " first", 100: " last"}
    ticks = "".join(f"<span class='tick{edge.get(p, '')}' style='left:{p}%'>+{_clock(s.span * p / 100)}</span>"
                    for p in (0, 25, 50, 75, 100))
    parts.append(f"<div class='axis'><div class='muted'>time since the session started</div>"
                 f"<div class='track'>{ticks}</div></div>")
    starts = [t.ts for t in view.turns]
    before = _events(s, 0, starts[0] if starts else None)
    if before:
        parts.append("<div class='turn' data-turn='open'><div class='label'><b>before the first turn</b></div>"
                     "<div class='track'>" + "".join(
                         f"<span class='marker {cls}' style='left:{s.pos(r.get('ts')):.3f}%' title='{_text(line)}'>"
                         f"{symbol}</span>" for r, line in before for cls, symbol, _ in [_marker_class(r)])
                     + "</div><ul class='events'>" + "".join(
                         f"<li class='ev-{cls}'><details><summary>{_text(line)}</summary><pre>{_json(r)}"
                         f"</pre></details></li>" for r, line in before for cls, symbol, _ in [_marker_class(r)])
                     + "</ul></div>")
    for position, turn in enumerate(view.turns):
        nxt = starts[position + 1] if position + 1 < len(starts) else None
        parts.append(_turn_row(s, turn, _events(s, turn.ts, nxt)))
    if view.calls:
        rows = []
        for call in view.calls.values():
            ref = s.call_ref(call.call_id)
            called = f"<a href='#{ref}-call'>{_text(call.call)}</a>" if call.call else "?"
            answered = f"<a href='#{ref}-output'>{_text(call.answer)}</a>" if call.answer else "-"
            state = "orphaned" if call.state == "ORPHANED" else ""
            rows.append(f"<tr class='{state}' data-call='{_text(call.call_id)}'>"
                        f"<td class='rid'>{_text(call.call_id)}</td><td>{called}</td><td>{answered}</td>"
                        f"<td>{_text(call.state)}</td></tr>")
        parts.append("<table class='calls'><tr><th>call_id</th><th>called in</th><th>answered in</th><th>state</th>"
                     "</tr>" + "".join(rows) + "</table>")
    if view.problems:
        parts.append("<ul class='problems'>" + "".join(f"<li>✗ {_text(p)}</li>" for p in view.problems) + "</ul>")
    parts.append("</section>")
    return "".join(parts)


def render(sessions: list[SessionView], records: Iterable[dict[str, Any]], source: str, kind: str,
           warnings: Iterable[str] = ()) -> str:
    """The page, as one string."""
    by_session: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_session.setdefault(str(record.get("session")), []).append(record)
    sections = [_session(_Session(i, view, by_session.get(view.id, []))) for i, view in enumerate(sessions)]
    problems = sum(len(v.problems) for v in sessions)
    flagged = "<b class='status bad'>{} problem(s)</b>"
    index = "".join(f"<li><a href='#s{i}'>{_text(v.id)}</a> {len(v.turns)} turns"
                    f"{', ' + flagged.format(len(v.problems)) if v.problems else ''}</li>"
                    for i, v in enumerate(sessions))
    notes = "".join(f"<li>{_text(w)}</li>" for w in warnings)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="referrer" content="no-referrer">
<title>replayguard chain report: {_text(source)}</title><style>{STYLE}</style></head>
<body>
<h1>replayguard chain report</h1>
<div class="muted">{_text(source)} ({_text(kind)}), {len(sessions)} session(s), {problems} problem(s);
written {escape(time.strftime('%Y-%m-%d %H:%M:%S'))} by replayguard trace --html</div>
<div class="legend muted"><span><b class="marker replay" style="position:static;display:inline-block">↻</b> replayed
</span><span><b class="marker fault" style="position:static;display:inline-block">⚡</b> fault injected</span>
<span><b class="marker loss" style="position:static;display:inline-block">!</b> upstream lost or refused</span>
<span><b class="marker fail-close" style="position:static;display:inline-block">✗</b> failed closed</span>
<span class="orphan-badge">ORPHANED</span> a tool output whose call is not in the chain it continues</div>
{'<ul class="muted notes">' + notes + '</ul>' if notes else ''}
<ul class="index">{index}</ul>
{''.join(sections) or '<p>no sessions in this file</p>'}
</body></html>
"""
