"""The chain trace file: session events become records (:mod:`replayguard.core.records`), appended to a JSON Lines
file that only the user can read, every line scrubbed of the session's secrets."""

from __future__ import annotations

import enum
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

from ..core import events as ev
from ..core.chain import Turn
from ..core.records import SCHEMA, Bodies, error_fields, summarize_item, summarize_items, turn_start_fields
from ..core.redact import redact_headers, scrub, secret_values

log = logging.getLogger(__name__)


def _default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    return repr(value)


class TraceWriter:
    """Appends records to a JSON Lines file that only the user can read.

    Each record is one ``write()`` of a whole line on an O_APPEND descriptor, so records from many sessions never
    interleave. If a previous run died mid-line, the file is first ended with a newline, so the broken line stays
    one line that readers skip.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = self.resolve(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(self._fd, 0o600)  # an existing file keeps no wider permissions than ours
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")
        self.records = 0
        self.failed: str | None = None  # the first write error (the trace goes on without the record)

    @staticmethod
    def resolve(path: str | Path) -> Path:
        """A directory (existing, or named with a trailing slash) gets one file per run."""
        p = Path(path).expanduser()
        if p.is_dir() or str(path).endswith(("/", os.sep)):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            return p / f"replayguard-{stamp}-{os.getpid()}.jsonl"
        return p

    def write(self, session: str, event: str, secrets: Iterable[str] = (), **fields: Any) -> None:
        record = {"ts": round(time.time(), 6), "session": session, "event": event, **fields}
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=_default)
        line = scrub(line, secrets)
        os.write(self._fd, (line + "\n").encode("utf-8", "replace"))
        self.records += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SessionTrace:
    """One session's trace: a listener of its events that writes them as records, stamped with the session id and
    scrubbed of the session's own secrets."""

    def __init__(self, writer: TraceWriter, session: str, headers: Iterable[tuple[str, str]],
                 bodies: Bodies = Bodies.SUMMARY) -> None:
        self.writer = writer
        self.session = session
        self.bodies = bodies
        self.secrets = secret_values(headers)

    def record(self, event: str, **fields: Any) -> None:
        try:
            self.writer.write(self.session, event, self.secrets, **fields)
        except OSError as e:  # a full disk must not take the session down; the log says it once
            if self.writer.failed is None:
                self.writer.failed = str(e)
                log.warning("replayguard: cannot write trace %s: %s (records are being lost)", self.writer.path, e)

    def __call__(self, event: ev.Event) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)

    # -- one method per event ---------------------------------------------------------------------
    def _session_started(self, e: ev.SessionStarted) -> None:
        self.record("session.start", schema=SCHEMA, url=e.url, client=e.client)

    def _handshake(self, e: ev.Handshake) -> None:
        fields: dict[str, Any] = {}
        if e.ok:
            fields["response_headers"] = redact_headers(e.response_headers or ())
        else:
            fields["error"] = e.error
            fields["injected"] = e.injected
        self.record("handshake", conn=e.conn, url=e.url, purpose=e.purpose, ok=e.ok, status=e.status, ms=e.ms,
                    headers=redact_headers(e.headers), **fields)

    def _turn_started(self, e: ev.TurnStarted) -> None:
        self.record("turn.start", turn=e.turn.number, conn=e.conn,
                    **turn_start_fields(e.turn.request, e.size, self.bodies))

    def _turn_ended(self, e: ev.TurnEnded) -> None:
        turn: Turn = e.turn
        fields: dict[str, Any] = {}
        event = e.event
        response = event.get("response") if event is not None else None
        if isinstance(response, dict) and isinstance(response.get("usage"), dict):
            fields["usage"] = response["usage"]
        if event is not None and event.get("type") == "error":
            fields["error"] = error_fields(event)
        if e.reason is not None:
            fields["reason"] = e.reason
        if self.bodies is Bodies.FULL and turn.outputs:
            fields["output_items"] = turn.outputs
        self.record("turn.end", turn=turn.number, conn=e.conn, status=turn.status, response_id=turn.response_id,
                    previous_response_id=turn.previous_id,
                    output=[summarize_item(i, self.bodies) for i in turn.outputs], ms=e.ms, **fields)

    def _upstream_lost(self, e: ev.UpstreamLost) -> None:
        self.record("upstream.lost", conn=e.conn, how=e.how, detail=e.detail, turn=e.turn)

    def _recovered(self, e: ev.Recovered) -> None:
        turn, body = e.turn, e.body
        replayed = body is not None
        fields: dict[str, Any] = {}
        if body is not None:
            fields["input"] = summarize_items(body["input"])
            if self.bodies is Bodies.FULL:
                fields["body"] = body
        self.record("recovery", turn=turn.number, trigger=e.trigger, action=e.decision.action, from_conn=e.from_conn,
                    to_conn=e.to_conn, removed_previous_response_id=turn.previous_id if replayed else None,
                    items=len(body["input"]) if body is not None else len(turn.new_items), bytes=e.size,
                    attempt=turn.attempts, **fields)

    def _failed_closed(self, e: ev.FailedClosed) -> None:
        d = e.decision
        self.record("fail_close", turn=e.turn.number if e.turn is not None else None, reason=d.reason,
                    error=d.error, close_code=d.close_code, close_reason=d.close_reason)

    def _fault_fired(self, e: ev.FaultFired) -> None:
        rule = e.fired.rule
        self.record("fault", phase="fired", kind=rule.kind, detail=rule.describe(), turn=e.fired.after_turn,
                    conn=e.conn, rule_line=rule.line, injected=True)

    def _fault_applied(self, e: ev.FaultApplied) -> None:
        if e.kind == "refuse":
            return  # the refused handshake's own record says injected
        self.record("fault", phase="applied", kind=e.kind, detail=e.detail, turn=e.turn, conn=e.conn, injected=True)

    def _session_ended(self, e: ev.SessionEnded) -> None:
        self.record("session.end", turns_completed=e.completed, turns_failed=e.failed, recoveries=e.recoveries,
                    reason=e.reason)


_HANDLERS: dict[type, Any] = {
    ev.SessionStarted: SessionTrace._session_started,
    ev.Handshake: SessionTrace._handshake,
    ev.TurnStarted: SessionTrace._turn_started,
    ev.TurnEnded: SessionTrace._turn_ended,
    ev.UpstreamLost: SessionTrace._upstream_lost,
    ev.Recovered: SessionTrace._recovered,
    ev.FailedClosed: SessionTrace._failed_closed,
    ev.FaultFired: SessionTrace._fault_fired,
    ev.FaultApplied: SessionTrace._fault_applied,
    ev.SessionEnded: SessionTrace._session_ended,
}
