"""Responses WebSocket messages as lines a person debugging a tool-call chain reads (the "Responses" contentview).

Pure: no mitmproxy here; :mod:`replayguard.proxy.contentview` hands the bytes and the flow's earlier messages in.
One line per thing that matters (a request's items with their call_ids, an event's ids and status, an error's
code), each at most :data:`MAX_LINE` characters, so a 10 MB request still reads as a screenful. A request's tool
outputs are checked against the chain it continues, rebuilt from the flow's earlier messages with the pairing rule
of :mod:`replayguard.core.pairing`; that rebuild is cached per flow and extended incrementally, because a UI
renders every message of a flow, again whenever one arrives.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .messages import parse
from .pairing import CALL_TYPES, OUTPUT_CALLS, find_orphans
from .records import PREVIEW_CHARS, Bodies, error_fields, summarize_item

log = logging.getLogger(__name__)

Line = tuple[str, str]  # (style, text); style: header, key, value, text, highlight, error, warn

MAX_LINE = 160
HEAD_ITEMS = 200  # item lines shown from the start of a long list...
TAIL_ITEMS = 50  # ...and from its end
SHOWN_ORPHANS = 100  # orphaned items shown wherever they are (the header counts them all)
MAX_FLOWS = 32  # flows whose chain scan is cached
RECHECKED = 8  # last messages of a cached scan compared with the flow before it is reused
RECORD_PREFIX = "replayguard."

# The event type when it is the first key, as the upstream and replayguard send it: read without decoding.
_TYPE_HEAD = re.compile(rb'\s*\{\s*"type"\s*:\s*"([^"\\]{1,200})"')
_TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "response.done"})
_HAS_RESPONSE = _TERMINAL | {"response.created", "response.in_progress", "response.queued"}
_SCANNED = _HAS_RESPONSE | {"response.create", "response.output_item.done", "error"}
# call item type -> the field its output names it by ("id" for mcp_approval_request), derived from the pairing rule
_CALL_KEY: dict[str, str] = {t: call_key for calls, _, call_key in OUTPUT_CALLS.values() for t in calls}


def _ours(kind: Any) -> bool:
    return isinstance(kind, str) and (kind.startswith("response.") or kind == "error"
                                      or kind.startswith(RECORD_PREFIX))


def is_responses_message(content: bytes) -> bool:
    """A JSON object whose type is a Responses event or a replayguard record.

    Decided from the first bytes when ``type`` is the first key (as every sender here writes it), so a 10 MB
    request costs nothing to classify; otherwise the message is parsed.
    """
    head = content[:256]
    if not head.lstrip().startswith(b"{"):
        return False
    m = _TYPE_HEAD.match(head)
    if m is not None:
        return _ours(m.group(1).decode("utf-8", "replace")) and content[-64:].rstrip().endswith(b"}")
    obj = _load(content)
    return isinstance(obj, dict) and _ours(obj.get("type"))


def render(content: bytes, earlier: Sequence[tuple[bool, bytes]] = (), *,
           flow_key: Hashable | None = None) -> list[Line] | None:
    """Display lines for one message; None when it is not a JSON object (not ours to show).

    ``earlier`` is (from_client, content) of the flow's messages before this one. ``flow_key`` (the flow id) lets
    the chain scan of those messages be reused across calls; without it they are scanned on each request rendered.
    """
    obj = _load(content)
    if not isinstance(obj, dict):
        return None
    return _event(obj, _Context(earlier, flow_key))


# -- text helpers ----------------------------------------------------------------------------------
def _load(content: bytes | str) -> Any:
    return parse(content)  # None for invalid or too deeply nested JSON (UnicodeDecodeError is a ValueError)


def _cut(text: str, limit: int = MAX_LINE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _flat(value: Any, limit: int = MAX_LINE) -> str:
    """One line of at most ``limit`` characters; only the start of a long value is ever looked at."""
    if isinstance(value, str):
        text = value[: limit * 4]
    elif isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, (int, float)):
        text = str(value)
    else:
        text = _compact(value, limit)
    return _cut(" ".join(text.split()), limit)


def _compact(value: Any, budget: int) -> str:
    """Compact JSON of ``value`` that stops after about ``budget`` characters: a nested 10 MB body costs nothing."""
    out: list[str] = []
    size = 0

    def emit(text: str) -> None:
        nonlocal size
        out.append(text)
        size += len(text)

    def walk(v: Any, depth: int) -> None:
        if size > budget:
            return
        if isinstance(v, (dict, list)) and depth > 20:
            emit("…")
        elif isinstance(v, dict):
            emit("{")
            for i, (k, x) in enumerate(v.items()):
                if size > budget:
                    break
                emit(("," if i else "") + json.dumps(str(k)[:budget], ensure_ascii=False) + ":")
                walk(x, depth + 1)
            emit("}")
        elif isinstance(v, list):
            emit("[")
            for i, x in enumerate(v):
                if size > budget:
                    break
                emit("," if i else "")
                walk(x, depth + 1)
            emit("]")
        elif isinstance(v, str):
            emit(json.dumps(v[:budget], ensure_ascii=False))
        else:
            emit(json.dumps(v, default=repr))

    walk(value, 0)
    return "".join(out)


def _quoted(text: str, limit: int = 100) -> str:
    return json.dumps(_flat(text, limit), ensure_ascii=False)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _line(style: str, text: str) -> Line:
    return style, _cut(text)


def _prefixed(prefix: str, lines: list[Line]) -> list[Line]:
    if not lines:
        return lines
    (style, first), rest = lines[0], lines[1:]
    return [_line(style, prefix + first), *rest]


# -- items -----------------------------------------------------------------------------------------
def _light(item: Any, budget: int = 4 * PREVIEW_CHARS) -> Any:
    """``item`` with its long strings cut to what an 80-character preview can need, so summarizing it does not
    walk a 10 MB tool output a second time after the parse."""
    if not isinstance(item, dict):
        return item
    light: dict[str, Any] = {}
    for key, value in item.items():
        if isinstance(value, str):
            light[key] = value[:budget]
        elif isinstance(value, list):
            parts: list[Any] = []
            seen = 0
            for part in value:
                if seen > budget or len(parts) >= 64:
                    break
                if isinstance(part, str):
                    part = part[:budget]
                    seen += len(part)
                elif isinstance(part, dict) and isinstance(part.get("text"), str):
                    part = {**part, "text": part["text"][:budget]}
                    seen += len(part["text"])
                parts.append(part)
            light[key] = parts
        else:
            light[key] = value
    return light


def _item_words(item: Any, index: int | None = None) -> list[str]:
    """kind, role, call_id (named as pairing names it), tool name, an 80-character preview."""
    s = summarize_item(_light(item), Bodies.SUMMARY)
    kind = s.get("type")
    words = [] if index is None else [f"#{index}"]
    words.append(_flat(kind, 60) if kind is not None else "?")
    if "role" in s:
        words.append(_flat(s["role"], 20))
    if isinstance(kind, str) and kind in _CALL_KEY:
        key_name = _CALL_KEY[kind]
    elif isinstance(kind, str) and kind in OUTPUT_CALLS:
        key_name = OUTPUT_CALLS[kind][1]
    else:
        key_name = "call_id"
    key = s.get("id") if kind == "mcp_approval_request" else s.get("call_id")
    if key is not None:
        words.append(f"{key_name}={_flat(key, 60)}")
    if "name" in s:
        words.append(f"name={_flat(s['name'], 40)}")
    if isinstance(item, Mapping) and item.get("encrypted_content"):
        words.append("(encrypted)")
    if "text" in s:
        words.append(_quoted(s["text"]))
    return words


def _windows(count: int, always: Sequence[int] = ()) -> list[int | tuple[int, int]]:
    """Indices to show of a list of ``count`` items: the first HEAD_ITEMS, the last TAIL_ITEMS and ``always``,
    in order; a (start, end) pair stands for a hidden run."""
    if count <= HEAD_ITEMS + TAIL_ITEMS:
        shown = list(range(count))
    else:
        shown = sorted({*range(HEAD_ITEMS), *range(count - TAIL_ITEMS, count), *always})
    out: list[int | tuple[int, int]] = []
    last = -1
    for i in shown:
        if i > last + 1:
            out.append((last + 1, i))
        out.append(i)
        last = i
    return out


def _gap(start: int, end: int, what: str = "items") -> Line:
    return _line("text", f"  … {end - start} more {what} …")


def _item_lines(items: Sequence[Any], orphans: Mapping[int, Any] | None = None) -> list[Line]:
    orphans = orphans or {}
    lines: list[Line] = []
    for entry in _windows(len(items), sorted(orphans)[:SHOWN_ORPHANS]):
        if isinstance(entry, tuple):
            lines.append(_gap(*entry))
            continue
        words = _item_words(items[entry], entry)
        if entry in orphans:
            calls = "/".join(sorted(OUTPUT_CALLS[orphans[entry].item_type][0]))
            words.insert(len(words) - 1 if words[-1].startswith('"') else len(words),
                         f"ORPHANED: no {calls} with call_id {orphans[entry].call_id} earlier in this chain")
            lines.append(_line("error", "  " + " ".join(words)))
        else:
            lines.append(_line("value", "  " + " ".join(words)))
    return lines


# -- the chain a request continues -----------------------------------------------------------------
def _stub(item: Any) -> dict[str, Any] | None:
    """A call item reduced to what pairing reads (its type and key), so a cached chain holds no payloads."""
    if isinstance(item, dict) and isinstance(item.get("type"), str) and item["type"] in CALL_TYPES:
        kind = item["type"]
        key = item.get(_CALL_KEY[kind])
        if isinstance(key, str):
            return {"type": kind, _CALL_KEY[kind]: key}
    return None


def _stubs(items: Any) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        return []
    return [s for s in map(_stub, items) if s is not None]


@dataclass(slots=True)
class _Turn:
    """One response.create of the flow and what came back, with the message index of each piece, so the same
    scan answers for any message of the flow (a UI re-renders old messages after new ones arrived)."""

    index: int
    previous: str | None
    calls: list[dict[str, Any]]
    streamed: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # from response.output_item.done
    first_done: int | None = None
    final: list[dict[str, Any]] = field(default_factory=list)  # from the terminal event's response.output
    final_index: int | None = None
    id_index: int | None = None

    def context(self, end: int) -> list[dict[str, Any]]:
        """The calls this turn adds to its chain, as seen by a message at index ``end``."""
        if self.first_done is not None and self.first_done < end:
            out = [s for i, s in self.streamed if i < end]
        elif self.final_index is not None and self.final_index < end:
            out = self.final
        else:
            out = []
        return self.calls + out


class _FlowScan:
    """Response ids, inputs and outputs of one flow's turns, fed one message at a time."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []  # (id, len) of each content fed: detects a different or edited flow
        self.by_id: dict[str, _Turn] = {}
        self.current: _Turn | None = None

    def same_prefix(self, earlier: Sequence[tuple[bool, bytes]]) -> bool:
        """The messages scanned are still the flow's: checked on the last few, where an addon may have just
        rewritten one (checking all on every render would make a UI's full redraw quadratic)."""
        n = min(len(self.seen), len(earlier))
        for i in range(max(0, n - RECHECKED), n):
            content = earlier[i][1]
            if self.seen[i] != (id(content), len(content)):
                return False
        return True

    def feed(self, from_client: bool, content: bytes) -> None:
        index = len(self.seen)
        self.seen.append((id(content), len(content)))
        m = _TYPE_HEAD.match(content[:256])
        if m is not None and m.group(1).decode("utf-8", "replace") not in _SCANNED:
            return  # deltas and everything else the chain does not need: never decoded
        obj = _load(content)
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if from_client:
            if kind == "response.create":
                prev = obj.get("previous_response_id")
                self.current = _Turn(index, prev if isinstance(prev, str) else None, _stubs(obj.get("input")))
            return
        turn = self.current
        if turn is None or not isinstance(kind, str):
            return
        if kind in _HAS_RESPONSE:
            response = obj.get("response")
            if not isinstance(response, dict):
                return
            rid = response.get("id")
            if isinstance(rid, str) and turn.id_index is None:
                turn.id_index = index
                self.by_id.setdefault(rid, turn)
            if kind in _TERMINAL:
                turn.final, turn.final_index = _stubs(response.get("output")), index
                self.current = None
        elif kind == "response.output_item.done":
            if turn.first_done is None:
                turn.first_done = index
            stub = _stub(obj.get("item"))
            if stub is not None:
                turn.streamed.append((index, stub))
        elif kind == "error":
            self.current = None

    def chain(self, previous: str, end: int) -> tuple[list[dict[str, Any]] | None, str | None]:
        """The calls of the chain ending in response ``previous``, seen from message ``end``; (None, the id not
        found) when the chain reaches outside the flow."""
        parts: list[list[dict[str, Any]]] = []
        visited: set[int] = set()
        rid: str | None = previous
        while rid is not None:
            turn = self.by_id.get(rid)
            if turn is None or turn.id_index is None or turn.id_index >= end or turn.index in visited:
                return None, rid
            visited.add(turn.index)
            parts.append(turn.context(end))
            rid = turn.previous
        return [s for part in reversed(parts) for s in part], None


_scans: OrderedDict[Hashable, _FlowScan] = OrderedDict()


def _scan_for(earlier: Sequence[tuple[bool, bytes]], flow_key: Hashable | None) -> _FlowScan:
    scan = _scans.get(flow_key) if flow_key is not None else None
    if scan is None or not scan.same_prefix(earlier):
        scan = _FlowScan()
    for i in range(len(scan.seen), len(earlier)):
        from_client, content = earlier[i]
        scan.feed(from_client, content)
    if flow_key is not None:
        _scans[flow_key] = scan
        _scans.move_to_end(flow_key)
        while len(_scans) > MAX_FLOWS:
            _scans.popitem(last=False)
    return scan


class _Context:
    """Where the message being rendered sits: its flow's earlier messages, scanned only if a request needs them."""

    def __init__(self, earlier: Sequence[tuple[bool, bytes]], flow_key: Hashable | None) -> None:
        self.earlier = earlier
        self.flow_key = flow_key
        self._scan: _FlowScan | None = None

    def chain(self, previous: str) -> tuple[list[dict[str, Any]] | None, str | None]:
        if self._scan is None:
            self._scan = _scan_for(self.earlier, self.flow_key)
        return self._scan.chain(previous, len(self.earlier))


# -- events ----------------------------------------------------------------------------------------
def _event(obj: dict[str, Any], ctx: _Context, depth: int = 0) -> list[Line]:
    kind = obj.get("type")
    if not isinstance(kind, str):
        return _generic(obj, "(no type)")
    if kind == "response.create":
        return _create(obj, ctx)
    if kind == "error":
        return _error(obj)
    if kind.startswith(RECORD_PREFIX):
        return _record(obj, kind[len(RECORD_PREFIX):], ctx, depth)
    if kind.endswith(".delta"):
        delta = obj.get("delta")
        text = _quoted(delta, MAX_LINE) if isinstance(delta, str) else _flat(delta)
        return [_line("value", f"{kind}  {text}")]
    if kind in ("response.output_item.added", "response.output_item.done"):
        where = f"[{obj['output_index']}] " if _scalar(obj.get("output_index")) and "output_index" in obj else ""
        return [_line("header", f"{kind}  {where}" + " ".join(_item_words(obj.get("item"))))]
    if kind in _HAS_RESPONSE and isinstance(obj.get("response"), dict):
        return _response(kind, obj["response"])
    return _generic(obj, kind)


def _generic(obj: Mapping[str, Any], title: str) -> list[Line]:
    lines = [_line("header", title)]
    lines += [_line("key", f"{k}: {_flat(v)}") for k, v in obj.items() if k != "type" and _scalar(v)]
    return lines


def _create(req: Mapping[str, Any], ctx: _Context) -> list[Line]:
    raw = req.get("input")
    items: list[Any] = [{"type": "message", "role": "user", "content": raw}] if isinstance(raw, str) else (
        raw if isinstance(raw, list) else [])
    words = ["response.create"]
    for key in ("model", "store"):
        if key in req:
            words.append(f"{key}={_flat(req[key], 40)}")
    if req.get("generate") is False:
        words.append("generate=false")
    prev = req.get("previous_response_id")
    context: list[dict[str, Any]] | None = []
    if prev is not None:
        words.append(f"previous_response_id={_flat(prev, 60)}")
        if isinstance(prev, str):
            context, missing = ctx.chain(prev)
            if context is None:
                gap = f": {_flat(missing, 60)} missing" if missing != prev else ""
                words.append(f"(chain not in this flow{gap})")
    orphans = {}
    if context is not None:
        offset = len(context)
        orphans = {o.index - offset: o for o in find_orphans([*context, *items])}
    words.append(_count(len(items), "item") if isinstance(raw, (list, str)) else "no input")
    if orphans:
        words.append(f"{len(orphans)} ORPHANED")
    return [_line("header", " ".join(words)), *_item_lines(items, orphans)]


def _error_text(fields: Mapping[str, Any]) -> str:
    text = "ERROR"
    if fields.get("status") is not None:
        text += f" {_flat(fields['status'], 10)}"
    if fields.get("code") is not None:
        text += f" {_flat(fields['code'], 60)}"
    if fields.get("message") is not None:
        text += f": {_flat(fields['message'])}"
    if fields.get("param") is not None:
        text += f" (param {_flat(fields['param'], 60)})"
    return text


def _error(obj: Mapping[str, Any]) -> list[Line]:
    lines = [_line("error", _error_text(error_fields(obj)))]
    error = obj.get("error")
    if isinstance(error, Mapping) and error.get("type") is not None:
        lines.append(_line("key", f"type: {_flat(error['type'])}"))
    return lines


def _response(kind: str, response: Mapping[str, Any]) -> list[Line]:
    words = [kind]
    if response.get("id") is not None:
        words.append(f"id={_flat(response['id'], 60)}")
    if response.get("status") is not None:
        words.append(f"status={_flat(response['status'], 30)}")
    if response.get("previous_response_id") is not None:
        words.append(f"previous_response_id={_flat(response['previous_response_id'], 60)}")
    usage = response.get("usage")
    if isinstance(usage, Mapping):
        words.append(f"usage in={_flat(usage.get('input_tokens'), 12)} out={_flat(usage.get('output_tokens'), 12)}")
    lines = [_line("header", " ".join(words))]
    error = response.get("error")
    if isinstance(error, Mapping):
        lines.append(_line("error", _error_text({"code": error.get("code"), "message": error.get("message")})))
    details = response.get("incomplete_details")
    if isinstance(details, Mapping) and details.get("reason") is not None:
        lines.append(_line("warn", f"incomplete: {_flat(details['reason'])}"))
    output = response.get("output")
    if kind in _TERMINAL and isinstance(output, list):
        lines.append(_line("key", f"output: {_count(len(output), 'item')}"))
        lines += _item_lines(output)
    return lines


# -- replayguard's own records ---------------------------------------------------------------------
def _conn(value: Any) -> str:
    return f"upstream #{_flat(value, 12)}"


def _detail(detail: Any) -> str:
    if isinstance(detail, Mapping):
        code, message = detail.get("code"), detail.get("message")
        if code is not None or message is not None:
            return ": ".join(_flat(v) for v in (code, message) if v is not None)
    return _flat(detail)


def _sentence(event: str, r: Mapping[str, Any]) -> tuple[str, str] | None:
    """(style, what happened in words) for the records people read most; None for the rest."""
    turn = r.get("turn")
    if event == "session.start":
        return "highlight", f"session started for {_flat(r.get('url'))}" + (
            f" (client {_flat(r['client'], 60)})" if r.get("client") else "")
    if event == "handshake":
        injected = " ⚡ injected" if r.get("injected") else ""
        purpose = _flat(r.get("purpose"), 30)
        if r.get("ok"):
            ms = r.get("ms")
            took = f" in {ms:.1f} ms" if isinstance(ms, (int, float)) else ""
            status = _flat(r.get("status"), 10)
            return "highlight", f"{_conn(r.get('conn'))} opened ({purpose}) status {status}{took}{injected}"
        error = f": {_flat(r['error'])}" if r.get("error") else ""
        if r.get("status") is None:
            return "error", f"handshake failed ({purpose}){error}{injected}"
        return "error", f"handshake refused: HTTP {_flat(r.get('status'), 10)} ({purpose}){error}{injected}"
    if event == "upstream.lost":
        when = f"during turn {_flat(turn, 12)}" if turn is not None else "while idle"
        detail = f" ({_detail(r['detail'])})" if r.get("detail") else ""
        return "highlight", f"{_conn(r.get('conn'))} lost {when}: {_flat(r.get('how'))}{detail}"
    if event == "upstream.closed":
        reason = f" ({_flat(r['reason'])})" if r.get("reason") else ""
        code = r.get("code")
        how = f"close {_flat(code, 12)}" if code is not None else "no close frame"
        return "highlight", f"{_conn(r.get('conn'))} closed: {how}{reason}"
    if event == "recovery":
        action = r.get("action")
        verb = "replayed" if isinstance(action, str) and action.startswith("replay") else "resent"
        where = f" on {_conn(r['to_conn'])}" if r.get("to_conn") is not None else ""
        items = r.get("items")
        facts = [] if items is None else [_count(items, "item") if isinstance(items, int) else f"items {_flat(items)}"]
        if r.get("removed_previous_response_id"):
            facts.append(f"previous_response_id {_flat(r['removed_previous_response_id'], 60)} removed")
        if isinstance(r.get("attempt"), int) and r["attempt"] > 1:
            facts.append(f"attempt {r['attempt']}")
        tail = f" ({', '.join(facts)})" if facts else ""
        return "highlight", f"turn {_flat(turn, 12)} {verb}{where} after {_flat(r.get('trigger'))}{tail}"
    if event == "fail_close":
        sent = r.get("error")
        code = error_fields(sent).get("code") if isinstance(sent, Mapping) else None
        return "error", (f"failed closed ({_flat(code, 60) if code is not None else 'no error event'}, "
                         f"close {_flat(r.get('close_code'), 12)}): {_flat(r.get('reason'))}")
    if event == "fault":
        when = f" (after turn {_flat(turn, 12)})" if r.get("phase") == "fired" and turn is not None else (
            f" (turn {_flat(turn, 12)})" if turn is not None else "")
        return "highlight", f"⚡ injected fault: {_flat(r.get('detail'))}{when}"
    if event == "session.end":
        return "highlight", (f"session ended: {_flat(r.get('reason'))} ({_flat(r.get('turns_completed'), 12)} turns "
                             f"completed, {_flat(r.get('turns_failed'), 12)} failed, "
                             f"{_flat(r.get('recoveries'), 12)} recoveries)")
    return None


def _embedded(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):
        value = _load(value)
    return value if isinstance(value, dict) else None


def _record(r: dict[str, Any], event: str, ctx: _Context, depth: int) -> list[Line]:
    said = _sentence(event, r)
    if said is not None:
        lines = [_line(said[0], f"replayguard: {said[1]}")]
    else:
        lines = [_line("highlight", f"replayguard: {event}")]
        lines += [_line("key", f"{k}: {_flat(v)}") for k, v in r.items() if k not in ("type", "sent", "message")]
    sent = _embedded(r.get("sent"))
    if sent is not None:
        lines += _create(sent, ctx)
    message = _embedded(r.get("message"))
    if message is not None and depth < 2:
        lines += _prefixed("consumed, not forwarded: ", _event(message, ctx, depth + 1))
    if event == "fail_close" and isinstance(r.get("error"), dict):
        lines += _prefixed("sent to the client: ", _error(r["error"]))
    return lines
