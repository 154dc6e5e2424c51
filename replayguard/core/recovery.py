"""The recovery decision: what to do with a turn whose upstream connection is gone.

Everything that decides between resending, replaying and failing closed is in :func:`decide`; the I/O layer
only gathers a :class:`Situation` and carries out the :class:`Decision`.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from . import errors
from .pairing import find_orphans, is_tool_output


class Trigger(str, enum.Enum):
    """How the upstream connection was found dead (or why it is being replaced)."""

    CLOSED = "upstream closed"
    DROPPED = "upstream connection dropped"
    PING_TIMEOUT = "no pong within ping timeout"
    FIRST_EVENT_TIMEOUT = "no event within first event timeout"
    PREVIOUS_NOT_FOUND = "upstream answered previous_response_not_found"
    CONNECTION_LIMIT = "upstream connection limit reached"
    ROTATION = "connection rotated before its age limit"
    RESUME = "previous_response_id is not on this upstream connection"


# Triggers that are not failures: they do not use up the turn's retries.
ROUTINE = frozenset({Trigger.ROTATION, Trigger.RESUME})


class Policy(str, enum.Enum):
    PAIR_AWARE = "pair-aware"
    STRICT = "strict"


class Action(str, enum.Enum):
    SEND = "resend unchanged on a fresh connection"
    REPLAY = "replay full input without previous_response_id on a fresh connection"
    FAIL = "fail closed"


@dataclass(frozen=True, slots=True)
class Situation:
    trigger: Trigger
    policy: Policy
    attempts: int  # recoveries already tried for this turn
    max_retries: int
    previous_id: str | None
    previous_stored: bool  # the previous response is stored server-side (store=true)
    payload_input: list[Any]  # the input items the client sent in this turn
    replay: list[Any] | None  # full replayed input, None when the history is unknown
    client_saw_output: bool  # part of this turn's output already reached the client


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    error: dict[str, Any] | None = None  # event sent to the client before the close
    close_code: int = errors.CLOSE_INTERNAL
    close_reason: str = ""

    @property
    def fails(self) -> bool:
        return self.action is Action.FAIL


def _fail(reason: str, event: dict[str, Any] | None, code: int = errors.CLOSE_INTERNAL, text: str = "") -> Decision:
    return Decision(Action.FAIL, reason, event, code, errors.close_reason(text or errors.PREFIX + reason))


def decide(s: Situation) -> Decision:
    """Decide how to carry a turn over to a fresh upstream connection, or to fail closed."""
    cause = s.trigger.value
    if s.client_saw_output:
        reason = f"{cause} after part of the response reached the client"
        return _fail(reason, errors.server_error("upstream_stream_interrupted", reason))
    if s.trigger not in ROUTINE and s.attempts >= s.max_retries:
        reason = f"{cause}; {s.attempts} recovery attempt(s) already made for this turn (max retries {s.max_retries})"
        return _fail(reason, errors.server_error("upstream_retries_exhausted", reason))
    if s.previous_id is None or s.previous_stored:
        return Decision(Action.SEND, f"{cause}; request does not depend on the lost connection")
    # Strict reproduces the peer gateway: a continuation that involves any tool output is refused.
    if s.policy is Policy.STRICT and (
        any(map(is_tool_output, s.payload_input)) or any(map(is_tool_output, s.replay or ()))
    ):
        reason = f"{cause}; strict policy: a tool output is involved"
        return _fail(reason, None, errors.CLOSE_POLICY, errors.STRICT_CLOSE_REASON)
    if s.replay is None:
        reason = f"{cause}; no chain state for previous_response_id {s.previous_id!r}, cannot replay"
        return _fail(reason, errors.not_found(reason + "; resend the full input"))
    orphans = find_orphans(s.replay)
    if orphans:
        o = orphans[0]
        reason = (
            f"{cause}; replay would orphan {o.item_type} call_id {o.call_id!r} "
            f"(input item {o.index}): its call is not in the chain"
        )
        return _fail(reason, errors.not_found(reason + "; resend the full input"))
    return Decision(Action.REPLAY, f"{cause}; replay is self-consistent")


def internal_error(where: str, exc: BaseException) -> Decision:
    """An exception in replayguard's own work: the session ends, and says so."""
    reason = f"internal error in {where}: {type(exc).__name__}: {exc}"[:300]
    return _fail(reason, errors.internal_error(reason))


def shutting_down() -> Decision:
    """The proxy is stopping with a turn in flight: a retryable error, and the close code for going away."""
    reason = "the proxy is shutting down; retry the turn"
    return _fail(reason, errors.shutting_down(reason), errors.CLOSE_GOING_AWAY)


def client_unresponsive(timeout: float) -> Decision:
    """The client answered no ping within ``timeout`` with a turn in flight: it is treated as gone, but a client that
    was only too busy to answer reads why, with an error it retries (a 5xx), before the close."""
    reason = f"the client answered no ping within {timeout:g}s; reconnect and retry the turn"
    return _fail(reason, errors.client_unresponsive(reason))


def reloading() -> Decision:
    """The addon is being reloaded (its script or package was edited) with a turn in flight: a retryable error, and
    the close code for a service restart; the client reconnects to the new code."""
    reason = "replayguard was reloaded; reconnect and retry the turn"
    return _fail(reason, errors.reloaded(reason), errors.CLOSE_SERVICE_RESTART)


@dataclass(frozen=True, slots=True)
class Refusal:
    """An upstream handshake that did not open: the upstream's HTTP answer, or why it could not be reached."""

    detail: str
    status: int | None = None
    body: bytes = b""
    content_type: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    code: str = "upstream_unavailable"  # the code a client gets when the upstream's answer names none
    injected: bool = False  # refused on purpose by a fault rule

    def upstream_error(self) -> dict[str, Any] | None:
        """The upstream's own error object from a JSON body ({"error": {type, code, message, param}}), if any."""
        if not self.body or "json" not in self.content_type.lower():
            return None
        try:
            doc = json.loads(self.body)
        except ValueError:
            return None
        error = doc.get("error") if isinstance(doc, dict) else None
        return error if isinstance(error, dict) else None


# Response headers a refused handshake passes on in the error event (error.headers, as the upstream's own events
# carry them): when to retry, and what to quote to the provider.
PASSED_HEADERS = ("retry-after", "retry-after-ms", "x-request-id")


def handshake_failed(trigger: Trigger, refusal: Refusal) -> Decision:
    """The fresh connection a recovery needed could not be opened: the client gets the upstream's own status, error
    type, code and message (and its Retry-After), so that it waits as long as the upstream asked; a refusal without
    an error of the upstream's is a 502 upstream_unavailable."""
    what = f"HTTP {refusal.status}" if refusal.status else refusal.detail
    reason = f"{trigger.value}; reconnect handshake failed: {what}"
    status = refusal.status if refusal.status and refusal.status >= 400 else 502
    upstream = refusal.upstream_error() or {}
    message = upstream.get("message")
    type_ = upstream.get("type") if isinstance(upstream.get("type"), str) else None
    code = upstream.get("code") if isinstance(upstream.get("code"), str) and upstream.get("code") else refusal.code
    param = upstream.get("param") if isinstance(upstream.get("param"), str) else None
    event = errors.error_event(status, type_ or ("server_error" if status >= 500 else "invalid_request_error"), code,
                               f"{reason}: {message}" if isinstance(message, str) and message else reason, param)
    headers = {k.lower(): v for k, v in refusal.headers
               if k.lower() in PASSED_HEADERS or k.lower().startswith("x-ratelimit-")}
    if headers:
        event["error"]["headers"] = headers
    close = errors.CLOSE_TRY_AGAIN_LATER if status in (429, 503) else errors.CLOSE_INTERNAL
    return _fail(reason, event, close)
