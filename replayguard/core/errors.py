"""Error events and close codes replayguard sends to clients when it fails closed.

Events have the upstream's own shape, so every client that handles upstream errors handles ours. The code
is chosen for what a real client does with it (measured with Codex CLI 0.169 and 0.171, tests/test_codex_cli.py):
status 400 with code previous_response_not_found, or a 5xx of type server_error, makes it reconnect and resend its
full history; any other 400, a 429 or code server_is_overloaded ends its run. The openai SDKs hand the event to the
application instead (the README's "What each client does with them" has the few lines that resend).

| situation                                  | status | type                  | code                          | close |
|--------------------------------------------|--------|-----------------------|-------------------------------|-------|
| replay would orphan a tool output          | 400    | invalid_request_error | previous_response_not_found   | 1011  |
| previous_response_id unknown to replayguard| 400    | invalid_request_error | previous_response_not_found   | 1011  |
| upstream died after output reached client  | 502    | server_error          | upstream_stream_interrupted   | 1011  |
| reconnect handshake refused (the upstream's own status, type, code, message and Retry-After, e.g. 429     |
|   rate_limit_exceeded; 502 upstream_unavailable when it gave none)          |                               | 1013 for 429 and 503, else 1011 |
| recovery retries for the turn exhausted    | 502    | server_error          | upstream_retries_exhausted    | 1011  |
| strict policy, tool output involved        | (none: close only, as the peer gateway) |                     | 1008  |
| an internal error of replayguard's         | 500    | server_error          | replayguard_internal_error    | 1011  |
| the proxy stops during a turn              | 503    | server_error          | replayguard_shutting_down     | 1001  |
| the addon is reloaded during a turn        | 503    | server_error          | replayguard_reloaded          | 1012  |
| the client answered no ping during a turn  | 503    | server_error          | replayguard_client_unresponsive | 1011 |
"""

from __future__ import annotations

import json
from typing import Any

PREFIX = "replayguard: "

CLOSE_INTERNAL = 1011
CLOSE_GOING_AWAY = 1001
CLOSE_SERVICE_RESTART = 1012  # the addon was reloaded: reconnect
CLOSE_TRY_AGAIN_LATER = 1013  # the upstream refused a reconnect with 429 or 503: wait as it says
CLOSE_POLICY = 1008
STRICT_CLOSE_REASON = "upstream continuation connection is unavailable; please restart the conversation"


def error_event(status: int, type_: str, code: str | None, message: str, param: str | None = None) -> dict[str, Any]:
    """An ``error`` event shaped like the upstream's own."""
    return {
        "type": "error",
        "status": status,
        "error": {"type": type_, "code": code, "message": PREFIX + message, "param": param},
    }


def not_found(message: str) -> dict[str, Any]:
    return error_event(400, "invalid_request_error", "previous_response_not_found", message, "previous_response_id")


def server_error(code: str, message: str) -> dict[str, Any]:
    return error_event(502, "server_error", code, message)


INTERNAL = "replayguard_internal_error"


def internal_error(message: str) -> dict[str, Any]:
    """replayguard itself failed: a 5xx server_error, which a real client answers by retrying with its history."""
    return error_event(500, "server_error", INTERNAL, message)


def http_error_body(status: int, code: str, message: str) -> bytes:
    """JSON body for a refused upgrade (the first handshake failed)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"type": kind, "code": code, "message": PREFIX + message, "param": None}}
    return json.dumps(body).encode()


def close_reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8."""
    raw = text.encode()
    if len(raw) <= 123:
        return text
    return raw[:120].decode(errors="ignore") + "..."


SHUTTING_DOWN = "replayguard_shutting_down"


def shutting_down(message: str) -> dict[str, Any]:
    return error_event(503, "server_error", SHUTTING_DOWN, message)


RELOADED = "replayguard_reloaded"


def reloaded(message: str) -> dict[str, Any]:
    return error_event(503, "server_error", RELOADED, message)


CLIENT_UNRESPONSIVE = "replayguard_client_unresponsive"


def client_unresponsive(message: str) -> dict[str, Any]:
    return error_event(503, "server_error", CLIENT_UNRESPONSIVE, message)
