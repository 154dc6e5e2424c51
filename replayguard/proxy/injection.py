"""Carrying out fault rules on a session's live upstream connections.

When a rule fires and what it arms is decided by :class:`replayguard.core.faults.FaultInjector`; this module does
it to the real connections (close, drop, black-hole), answers a turn with an armed error, holds a frame, and
refuses a handshake, and emits a :mod:`~replayguard.core.events` record for each, so that every injection is
logged, traced and marked as injected.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine

from ..core import events as ev
from ..core.chain import Turn
from ..core.faults import FaultInjector, FaultKind, Fired
from .upstream import Upstream

# Faults carried out on an open upstream connection (the others are armed in the injector).
CONNECTION_FAULTS = frozenset({FaultKind.CLOSE, FaultKind.DROP, FaultKind.BLACKHOLE})

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class FaultActions:
    def __init__(self, injector: FaultInjector, emit: ev.Listener, spawn: Spawn) -> None:
        self.injector = injector
        self.emit = emit
        self.spawn = spawn

    def session_starting(self) -> list[Fired]:
        """Rules that fire at the session start (after_turn 0): the armed kinds take effect now (a refusal hits
        the first handshake); the connection kinds are returned, to be done once the connection is open."""
        later = []
        for fired in self.injector.turn_completed(0):
            if fired.rule.kind in CONNECTION_FAULTS:
                later.append(fired)
            else:
                self.fire(fired, None)
        return later

    def turn_completed(self, completed: int, conn: Upstream) -> None:
        for fired in self.injector.turn_completed(completed):
            self.fire(fired, conn)

    def fire(self, fired: Fired, conn: Upstream | None) -> None:
        """A rule fired: do it to ``conn`` (the armed kinds only need the event)."""
        self.emit(ev.FaultFired(fired, conn.id if conn is not None else None))
        if conn is None:
            return
        kind = fired.rule.kind
        if kind is FaultKind.CLOSE:
            self.spawn(conn.close(fired.rule.code, "replayguard fault injection"))
        elif kind is FaultKind.DROP:
            conn.abort()
        elif kind is FaultKind.BLACKHOLE:
            transport = conn.ws.transport
            if transport is not None:
                transport.pause_reading()

    def take_refusal(self) -> int | None:
        status = self.injector.take_refusal()
        if status is not None:
            self.emit(ev.FaultApplied("refuse", f"upstream handshake refused with HTTP {status}", None, None))
        return status

    def take_error(self, turn: Turn, conn: Upstream) -> dict[str, Any] | None:
        """The error event an armed ``error`` fault answers this turn with (instead of sending it), or None."""
        event = self.injector.take_error(turn.previous_id)
        if event is not None:
            self.emit(ev.FaultApplied("error", f"turn {turn.number} answered with {event['error']['code']}",
                                      turn.number, conn.id))
        return event

    @property
    def delay(self) -> float:
        return self.injector.delay

    async def hold_frame(self, turn: Turn, conn: Upstream) -> None:
        """An armed ``delay``: hold the first upstream frame of this turn."""
        delay = self.injector.take_delay()
        if delay:
            self.emit(ev.FaultApplied("delay", f"first frame of turn {turn.number} held {delay:g}s", turn.number,
                                      conn.id))
            await asyncio.sleep(delay)
