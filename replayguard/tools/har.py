"""HAR files with WebSocket messages: mitmproxy's own export (``--set hardump=FILE``, the ``save.har`` command)
keeps a WebSocket entry's frames in ``_webSocketMessages`` (``type`` send or receive, ``time`` in Unix seconds,
``opcode`` 1 text or 2 binary in base64, ``data``), the form Chrome DevTools' "Save all as HAR" uses. Each such
entry is read as a flow: the same turns, call pairing and diagnosis as a flow file, and the same reproduction.

What a HAR loses against a flow file: mitmproxy's ``injected`` mark (replayguard's own records are still told apart,
by their ``{"type": "replayguard.<record>"`` head, in either direction), the close code and who closed, and the
flow's metadata. An entry is written when its WebSocket ended (mitmproxy writes it at ``websocket_end``), so a turn
without its end is one whose connection was lost.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..core.records import FLOW_RECORD

KIND = "HAR export"
_OURS = ('{"type": "' + FLOW_RECORD).encode()


class HarError(Exception):
    """A HAR document without what a WebSocket session needs."""


def looks_like_har(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("log"), dict) and isinstance(doc["log"].get("entries"), list)


@dataclass
class HarMessage:
    from_client: bool
    content: bytes
    timestamp: float
    injected: bool = False


@dataclass
class HarFlow:
    """One WebSocket entry, with the fields the flow readers use (see ``recording._Flow``)."""

    id: str
    url: str
    headers: list[tuple[str, str]]
    messages: list[HarMessage] = field(default_factory=list)
    close_code: int | None = None  # a HAR does not keep it
    ended: bool = True
    refused: int | None = None  # the upgrade was answered with this status
    started: float = 0.0
    dropped: int = 0


def _ts(value: Any) -> float:
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return 0.0


def _headers(value: Any) -> list[tuple[str, str]]:
    out = []
    for header in value if isinstance(value, list) else []:
        if isinstance(header, dict) and isinstance(header.get("name"), str):
            out.append((header["name"], str(header.get("value", ""))))
    return out


def _message(raw: Any) -> HarMessage | None:
    if not isinstance(raw, dict) or raw.get("type") not in ("send", "receive"):
        return None
    opcode, data = raw.get("opcode", 1), raw.get("data", "")
    if opcode not in (1, 2) or not isinstance(data, str):
        return None  # control frames carry no Responses message
    if opcode == 2:
        try:
            content = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            content = data.encode("utf-8", "surrogateescape")
    else:
        content = data.encode("utf-8", "surrogateescape")
    time = raw.get("time")
    from_client = raw["type"] == "send"
    # replayguard's records go either way (a replay is kept as the client's, as it was sent upstream).
    return HarMessage(from_client, content, float(time) if isinstance(time, (int, float)) else 0.0,
                      injected=content.startswith(_OURS))


def read_har(doc: dict[str, Any]) -> tuple[list[HarFlow], list[str]]:
    """The WebSocket flows of a HAR document, and warnings about what was not read."""
    flows: list[HarFlow] = []
    warnings: list[str] = []
    for index, entry in enumerate(doc["log"]["entries"], 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
            warnings.append(f"entry {index}: not a HAR entry, skipped")
            continue
        request = entry["request"]
        url = str(request.get("url", ""))
        headers = _headers(request.get("headers"))
        response = entry.get("response") if isinstance(entry.get("response"), dict) else {}
        status = response.get("status") if isinstance(response.get("status"), int) else None
        upgrade = any(k.lower() == "upgrade" and v.lower() == "websocket" for k, v in headers)
        frames = entry.get("_webSocketMessages")
        if not upgrade and frames is None and entry.get("_resourceType") != "websocket":
            if url.split("?", 1)[0].endswith("/responses"):
                warnings.append(f"entry {index}: {request.get('method', '?')} {url} is an HTTP request, not a "
                                f"Responses WebSocket: not read")
            continue
        ws_url = url.replace("http", "ws", 1) if url.startswith("http") else url
        flow = HarFlow(f"har-entry-{index}", ws_url, headers, started=_ts(entry.get("startedDateTime")))
        if status is not None and status >= 400:
            flow.refused = status
        for raw in frames if isinstance(frames, list) else []:
            message = _message(raw)
            if message is not None:
                flow.messages.append(message)
        flow.messages.sort(key=lambda m: m.timestamp)  # stable: frames of one instant keep their order
        session = _session_id(flow)
        if session:
            flow.id = session
        flows.append(flow)
    return flows, warnings


def _session_id(flow: HarFlow) -> str | None:
    """The flow id replayguard named the session by, when it kept its records in the flow."""
    from ..core.records import records_in_flow

    for record in records_in_flow(flow.messages[:8]):
        if record.get("event") == "session.start" and isinstance(record.get("session"), str):
            return record["session"]
    return None


def records(flows: list[HarFlow]) -> list[dict[str, Any]]:
    """Trace records for the viewer: each WebSocket entry as a session."""
    from .viewer import flow_records

    out: list[dict[str, Any]] = []
    for flow in flows:
        if flow.refused is not None and not flow.messages:
            out += [{"ts": flow.started, "session": flow.id, "event": "session.start", "url": flow.url,
                     "source": KIND},
                    {"ts": flow.started, "session": flow.id, "event": "handshake", "conn": None, "purpose": "open",
                     "ok": False, "status": flow.refused},
                    {"ts": flow.started, "session": flow.id, "event": "session.end", "reason": "refused"}]
            continue
        end = flow.messages[-1].timestamp if flow.messages else flow.started
        out += flow_records(flow.id, flow.url, flow.messages, flow.started, end, None,
                            "ended (a HAR keeps no close code)", source=KIND)
    return out


def recording(flows: list[HarFlow], path: str, warnings: list[str]) -> Any:
    """The HAR as a recording for `replayguard reproduce`."""
    from .recording import HOW_TO_RECORD, Recording, RecordingError, sessions_from_flows

    sessions = sessions_from_flows(flows)
    if not sessions:
        raise RecordingError(f"{path}: no Responses WebSocket session in this HAR file; {HOW_TO_RECORD}")
    for session in sessions:
        for turn in session.turns:
            if turn.outcome.kind == "connection lost":
                turn.outcome.close_unknown = True  # a HAR keeps no close code
    return Recording(path, KIND, sessions, None, warnings)
