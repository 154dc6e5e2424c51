"""Chain traces: one JSON object per line for every event that matters in a session.

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
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

log = logging.getLogger(__name__)

SCHEMA = 1
PREVIEW_CHARS = 80


class Bodies(str, enum.Enum):
    NONE = "none"  # structure only: item kinds, roles, call_ids, tool names
    SUMMARY = "summary"  # plus a short text preview of each item
    FULL = "full"  # plus the whole request body and the whole output items


# -- redaction -------------------------------------------------------------------------------------
_SECRET_HEADER = re.compile(r"authorization|cookie|api[-_]?key|secret|token|password|credential|signature", re.I)
_NOT_SECRET = frozenset({"x-codex-turn-state"})  # a routing token the upstream hands out, not a credential
_SECRET_QUERY = re.compile(r"key|token|secret|sig|password|auth", re.I)
# Anything shaped like an OpenAI-style key or a bearer credential, wherever it appears.
_SECRET_TEXT = re.compile(r"\b(?:sk|rk|pk|sess)-[A-Za-z0-9_\-]{8,}|(?<=Bearer )[A-Za-z0-9._~+/=\-]{8,}", re.I)


def fingerprint(value: str) -> str:
    """A stable, non-reversible name for a secret, so two sessions can be told apart."""
    return "[redacted sha256:" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:8] + "]"


def is_secret_header(name: str) -> bool:
    return name.lower() not in _NOT_SECRET and _SECRET_HEADER.search(name) is not None


def redact_header(name: str, value: str) -> str:
    if not is_secret_header(name):
        return scrub(value)
    scheme, sep, rest = value.partition(" ")
    if sep and scheme.lower() in ("bearer", "basic", "token"):
        return f"{scheme} {fingerprint(rest)}"
    return fingerprint(value)


def redact_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        redacted = redact_header(name, value)
        out[key] = f"{out[key]}, {redacted}" if key in out else redacted
    return out


def redact_url(url: str) -> str:
    """The URL with credentials in userinfo or in key/token-like query parameters replaced."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return scrub(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "[redacted]@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "[redacted]" if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="[]")
    return scrub(urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)))


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove known secret values and anything shaped like a key or bearer token from ``text``."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "[redacted]")
    return _SECRET_TEXT.sub("[redacted]", text)


def secret_values(headers: Iterable[tuple[str, str]]) -> list[str]:
    """The secret parts of a session's handshake headers (what must never be written anywhere)."""
    values: list[str] = []
    for name, value in headers:
        if not is_secret_header(name):
            continue
        values.append(value)
        scheme, sep, rest = value.partition(" ")
        if sep and len(rest) >= 4:
            values.append(rest)
        # Cookie headers: every cookie value on its own.
        for part in value.split(";"):
            _, eq, cookie = part.partition("=")
            if eq and len(cookie.strip()) >= 4:
                values.append(cookie.strip())
    return sorted(set(values), key=len, reverse=True)  # longest first: no half-replaced secrets


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


# -- writing ---------------------------------------------------------------------------------------
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
    """One session's view of the trace: stamps the session id and scrubs its own secrets."""

    def __init__(self, writer: TraceWriter, session: str, headers: Iterable[tuple[str, str]],
                 bodies: Bodies = Bodies.SUMMARY) -> None:
        self.writer = writer
        self.session = session
        self.bodies = bodies
        self.secrets = secret_values(headers)

    def __call__(self, event: str, **fields: Any) -> None:
        try:
            self.writer.write(self.session, event, self.secrets, **fields)
        except OSError as e:  # a full disk must not take the session down; the log says it once
            if self.writer.failed is None:
                self.writer.failed = str(e)
                log.warning("replayguard: cannot write trace %s: %s (records are being lost)", self.writer.path, e)


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
