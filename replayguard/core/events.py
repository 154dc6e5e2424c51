"""What happens in a session, as plain records.

A session emits each of these once, where it happens; the chain trace, the log and mitmweb's marks are listeners
(:mod:`replayguard.proxy.tracing`, :mod:`replayguard.proxy.reporting`), so the I/O code says what happened and
never how each surface shows it. A listener is any callable taking one event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

from .chain import Turn
from .faults import Fired
from .recovery import Decision, Trigger


@dataclass(frozen=True, slots=True)
class SessionStarted:
    url: str  # the upstream, credentials redacted
    client: str  # the client's address
    rules: dict[str, Any] | None = None  # the rules the session runs with, as a rules.yaml document


@dataclass(frozen=True, slots=True)
class Handshake:
    """An upstream WebSocket handshake, accepted or refused."""

    url: str
    purpose: str  # open | reconnect | recovery
    conn: int | None  # the new connection's id; None when refused
    ok: bool
    status: int | None
    ms: float
    headers: list[tuple[str, str]]  # as sent (the listener redacts)
    response_headers: list[tuple[str, str]] | None = None
    error: str | None = None
    injected: bool = False  # refused on purpose by a fault rule
    peer: tuple[str, int] | None = None  # the address the connection reached (the proxy's, through one)
    local: tuple[str, int] | None = None  # replayguard's end of it
    tls: dict[str, Any] | None = None  # version, cipher, sni of an accepted TLS connection
    certificate: bytes | None = None  # the upstream's certificate (DER), for what mitmweb shows


@dataclass(frozen=True, slots=True)
class TurnStarted:
    turn: Turn
    conn: int | None
    size: int  # bytes of the client's response.create


CLIENT_LEFT = "client left mid-turn"  # TurnEnded.reason of a turn aborted because the client went away
FAILED_CLOSED = "failed closed"


@dataclass(frozen=True, slots=True)
class TurnEnded:
    turn: Turn
    conn: int | None
    event: dict[str, Any] | None  # the terminal upstream event, None when the turn was aborted
    reason: str | None  # why an aborted turn ended
    ms: float


@dataclass(frozen=True, slots=True)
class UpstreamLost:
    conn: int
    how: Trigger
    detail: Any  # text, or the upstream's error fields when an error event finished the connection
    turn: int | None  # the turn in flight on it, None when idle
    by_error: bool = False  # an upstream error event finished it (it was swallowed, not forwarded)
    raw: str | None = None  # that error event as the upstream sent it
    events: int | None = None  # upstream events of the turn in flight seen before the loss


@dataclass(frozen=True, slots=True)
class UpstreamClosed:
    """An upstream connection is gone, for whatever reason (replaced, rotated, lost, the session ended)."""

    conn: int
    code: int | None  # the close code, None when the connection was dropped without one
    reason: str


@dataclass(frozen=True, slots=True)
class Recovered:
    """A turn carried over to a fresh connection (or, for a resume, rebuilt for the current one)."""

    turn: Turn
    trigger: Trigger
    decision: Decision
    from_conn: int | None
    to_conn: int | None
    body: dict[str, Any] | None  # the replayed request; None when the turn was resent unchanged
    size: int  # bytes sent
    detail: str = ""
    sent: str = ""  # exactly what went upstream


@dataclass(frozen=True, slots=True)
class FailedClosed:
    turn: Turn | None
    decision: Decision


@dataclass(frozen=True, slots=True)
class FaultFired:
    """A fault rule fired after a completed turn (0: the session start)."""

    fired: Fired
    conn: int | None


@dataclass(frozen=True, slots=True)
class FaultApplied:
    """An armed fault hit: an error answered instead of the upstream, a held frame, a refused handshake."""

    kind: str
    detail: str
    turn: int | None
    conn: int | None


@dataclass(frozen=True, slots=True)
class ChainEvicted:
    """The chain outgrew max_chain_bytes (no longer replayable), or the cross-flow store dropped records."""

    turn: int
    chain_bytes: int = 0
    max_chain_bytes: int = 0
    records: int = 0


@dataclass(frozen=True, slots=True)
class SessionEnded:
    completed: int
    failed: int
    recoveries: int
    reason: str


Event = Union[SessionStarted, Handshake, TurnStarted, TurnEnded, UpstreamLost, UpstreamClosed, Recovered, FailedClosed,
              FaultFired, FaultApplied, ChainEvicted, SessionEnded]
Listener = Callable[[Event], None]


class Emitter:
    """Hands every event to every listener, in the order they were added."""

    __slots__ = ("listeners",)

    def __init__(self, listeners: list[Listener] | None = None) -> None:
        self.listeners: list[Listener] = list(listeners or ())

    def __call__(self, event: Event) -> None:
        for listener in self.listeners:
            listener(event)
