"""Every file `replayguard trace` and `reproduce` read, told apart by content (never by name): a chain trace (JSON
Lines of replayguard records), a mitmproxy flow file, a fixture (``reproduce --write-test``), a Codex CLI rollout
(:mod:`.rollout`) and a HAR export (:mod:`.har`). :func:`trace_records` gives the viewer (and the HTML report) trace
records from any of them; :func:`read_recording` gives reproduce its model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.messages import parse
from ..core.records import Bodies, summarize_items
from . import har, rollout

TRACE, FLOWS, FIXTURE = "trace", "flow file", "fixture"


def _read(path: str | Path) -> bytes:
    from .viewer import ReadError

    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ReadError(f"cannot read {path}: {e.strerror or e}") from None


def sniff(data: bytes) -> tuple[str, Any]:
    """(kind, what was parsed to tell it: the whole JSON document, or None)."""
    head = data.lstrip()[:1]
    if head not in (b"{", b""):
        return FLOWS, None
    if not head:
        return TRACE, None
    text = data.decode("utf-8", errors="replace")
    first = parse(text.lstrip().split("\n", 1)[0])
    if rollout.looks_like_rollout(first):
        return rollout.KIND, None
    if isinstance(first, dict) and isinstance(first.get("event"), str):
        return TRACE, None  # a one-line-per-record trace (read whole lines only)
    doc = parse(text)
    if isinstance(doc, dict) and "replayguard_fixture" in doc:
        return FIXTURE, doc
    if har.looks_like_har(doc):
        return har.KIND, doc
    return TRACE, None


def trace_records(path: str | Path) -> tuple[list[dict[str, Any]], list[str], str]:
    """(records, warnings, kind) for any file the viewer reads (raises viewer.ReadError)."""
    from .recording import RecordingError, read_fixture
    from .viewer import ReadError, read_trace, records_from_flows

    p = Path(path)
    data = _read(p)
    kind, doc = sniff(data)
    if kind == FLOWS:
        return records_from_flows(p), [], kind
    if kind == rollout.KIND:
        try:
            read = rollout.read_rollout(p, data.decode("utf-8", errors="replace"))
        except rollout.RolloutError as e:
            raise ReadError(str(e)) from None
        warnings = [f"{p}: {w}" for w in read.warnings]
        if read.stopped:
            warnings.append(f"{p}: {read.stopped}")
        return rollout.records(read), warnings, kind
    if kind == har.KIND:
        flows, warnings = har.read_har(doc)
        if not flows:
            raise ReadError(f"{p}: a HAR file with no WebSocket entry (nothing a Responses session left)"
                            + (f": {'; '.join(warnings)}" if warnings else ""))
        return har.records(flows), [f"{p}: {w}" for w in warnings], kind
    if kind == FIXTURE:
        try:
            recorded = read_fixture(doc, str(p))
        except RecordingError as e:
            raise ReadError(str(e)) from None
        return fixture_records(recorded), [], kind
    records, warnings = read_trace(p, data.decode("utf-8", errors="replace"))
    return records, warnings, kind


def read_recording(path: str | Path) -> Any:
    """A :class:`replayguard.tools.recording.Recording` from any file reproduce reads (raises RecordingError)."""
    from .recording import HOW_TO_RECORD, RecordingError, read_recording as read_own

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise RecordingError(f"cannot read {p}: {e.strerror or e}") from None
    kind, doc = sniff(data)
    if kind == rollout.KIND:
        try:
            return rollout.recording(rollout.read_rollout(p, data.decode("utf-8", errors="replace")))
        except rollout.RolloutError as e:
            raise RecordingError(str(e)) from None
    if kind == har.KIND:
        flows, warnings = har.read_har(doc)
        return har.recording(flows, str(p), warnings)
    if kind == TRACE and data.strip() and not any(
            isinstance(r, dict) and isinstance(r.get("event"), str) for r in map(parse, data.splitlines())):
        raise RecordingError(f"{p}: not a recording replayguard reads (a chain trace, a flow file, a fixture, a "
                             f"Codex session file or a HAR export); {HOW_TO_RECORD}")
    return read_own(p)


# -- fixtures as records ------------------------------------------------------------------------------
def fixture_records(recorded: Any) -> list[dict[str, Any]]:
    """A fixture's sessions as trace records. A fixture keeps no times: each turn gets one second, in order, so the
    timeline and the report's axis show the order of events, not their durations."""
    out: list[dict[str, Any]] = []
    clock = 0.0

    def tick(step: float = 0.1) -> float:
        nonlocal clock
        clock += step
        return round(clock, 3)

    origin = recorded.origin or "recording"
    for session in recorded.sessions:
        sid = session.id
        out.append({"ts": tick(1), "session": sid, "event": "session.start", "url": session.url,
                    "source": f"fixture, written from a {origin} (no times kept: one second a turn)"})
        if session.refused is not None:
            out.append({"ts": tick(), "session": sid, "event": "handshake", "conn": None, "purpose": "open",
                        "ok": False, "status": session.refused})
        for failure in session.open_idle:
            out.append(_lost(tick(), sid, None, failure))
        for turn in session.turns:
            request = turn.request if isinstance(turn.request, dict) else {}
            out.append({"ts": tick(1), "session": sid, "event": "turn.start", "turn": turn.number, "conn": None,
                        "model": request.get("model"), "store": request.get("store", True) is not False,
                        "previous_response_id": request.get("previous_response_id"),
                        "input": summarize_items(request.get("input"), Bodies.SUMMARY),
                        "bytes": len(json.dumps(request)), "body": request})
            for failure in turn.failures:
                out.append(_lost(tick(), sid, turn.number, failure))
            for verb, trigger in turn.outcome.recoveries:
                out.append({"ts": tick(), "session": sid, "event": "recovery", "turn": turn.number,
                            "trigger": trigger, "action": "replay full input" if verb == "replayed" else "resend",
                            "from_conn": None, "to_conn": None})
            if turn.outcome.kind == "failed closed":
                out.append({"ts": tick(), "session": sid, "event": "fail_close", "turn": turn.number,
                            "reason": turn.outcome.note or "recorded in the fixture",
                            "error": {"type": "error", "error": {"code": turn.outcome.code}},
                            "close_code": turn.outcome.close})
            if turn.status is not None:
                error = (turn.error or {}).get("error") if isinstance(turn.error, dict) else None
                end: dict[str, Any] = {
                    "ts": tick(), "session": sid, "event": "turn.end", "turn": turn.number, "conn": None,
                    "status": turn.status, "response_id": turn.response_id,
                    "previous_response_id": request.get("previous_response_id"),
                    "output": summarize_items(turn.output, Bodies.SUMMARY), "output_items": turn.output,
                    "usage": turn.usage}
                if isinstance(error, dict):
                    end["error"] = {"status": turn.error.get("status"), "code": error.get("code"),
                                    "message": error.get("message")}
                out.append(end)
            for failure in turn.idle:
                out.append(_lost(tick(), sid, None, failure))
        out.append({"ts": tick(), "session": sid, "event": "session.end", "reason": "end of the fixture"})
    return out


def _lost(ts: float, session: str, turn: int | None, failure: Any) -> dict[str, Any]:
    return {"ts": ts, "session": session, "event": "upstream.lost", "conn": None, "turn": turn,
            "how": failure.how or failure.describe(), "detail": failure.describe(), "injected": failure.injected}
