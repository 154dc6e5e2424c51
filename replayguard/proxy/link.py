"""A session's upstream side: the current connection, a reader on every connection, and liveness.

Liveness is found four ways, so that a dead connection is known as soon as possible: the reader sees closes and
TCP drops as they happen; a continuation is preceded by a ping when the connection was silent for ``ping_idle``;
a background keepalive pings a connection silent for ``keepalive_interval`` (between turns and mid-turn); and a
turn whose first event does not arrive within ``first_event_timeout`` declares its connection dead. An idle
connection older than ``rotation_age`` is replaced before the next turn. What a loss means for the turn in flight
is the session's to decide: the link only reports it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable, Coroutine, Protocol

from websockets.exceptions import ConnectionClosed

from ..core import events as ev
from ..core.chain import Turn
from ..core.recovery import Trigger
from ..core.redact import redact_url
from .clock import CLOCK
from .injection import FaultActions
from .rules import UpstreamRules
from .upstream import HandshakeFailed, Target, Upstream, ms_since, open_upstream

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class LinkOwner(Protocol):
    """What the link tells its session."""

    closed: bool

    async def upstream_message(self, conn: Upstream, message: str | bytes) -> None: ...

    def upstream_lost(self, conn: Upstream, trigger: Trigger, detail: str) -> None: ...

    def turn_on(self, conn: Upstream) -> Turn | None: ...


class UpstreamLink:
    def __init__(self, name: str, owner: LinkOwner, target: Target, cfg: UpstreamRules, emit: ev.Listener,
                 spawn: Spawn, faults: FaultActions | None) -> None:
        self.name = name  # the flow id, for logs
        self.owner = owner
        self.target = target
        self.cfg = cfg
        self.emit = emit
        self.spawn = spawn
        self.faults = faults
        self.current: Upstream | None = None
        self._reader: asyncio.Task[Any] | None = None  # the current connection's reader

    # -- connections ------------------------------------------------------------------------------
    async def open(self, purpose: str) -> Upstream:
        """A new upstream connection (raises HandshakeFailed), refused on purpose when a fault rule says so."""
        started = time.monotonic()
        sent = self.target.request_headers()
        url = redact_url(self.target.url)
        refusal = self.faults.take_refusal() if self.faults is not None else None
        try:
            if refusal is not None:
                body = json.dumps({"error": {"type": "server_error", "code": None, "param": None,
                                             "message": f"injected by replayguard: HTTP {refusal}"}}).encode()
                raise HandshakeFailed(f"upstream answered HTTP {refusal} (injected)", refusal, body, "application/json")
            conn = await open_upstream(self.target)
        except HandshakeFailed as e:
            self.emit(ev.Handshake(url, purpose, None, False, e.status, ms_since(started), sent, error=e.detail,
                                   injected=refusal is not None))
            raise
        self.emit(ev.Handshake(url, purpose, conn.id, True, 101, ms_since(started), sent,
                               response_headers=list(conn.response_headers()), peer=conn.peer, local=conn.local,
                               tls=conn.tls_info(), certificate=conn.certificate()))
        return conn

    def start(self, conn: Upstream) -> None:
        """Make ``conn`` the current connection and read it."""
        self.current = conn
        self._reader = self.spawn(self._read(conn))

    def replace(self, conn: Upstream) -> None:
        """A fresh connection takes over; the old one is closed in the background."""
        old = self.current
        if old is not None and old is not conn:
            old.lost = old.lost or "replaced"
            self.spawn(old.close(1000, "replaced"))
        self.start(conn)

    def retire(self, conn: Upstream, how: Any, reason: str) -> None:
        """Finish a connection that cannot serve the chain any more (closed in the background)."""
        conn.lost = how
        self.spawn(conn.close(1000, reason))

    async def send(self, conn: Upstream, message: str | bytes) -> None:
        try:
            await conn.ws.send(message)
        except ConnectionClosed:
            self.declare_dead(conn, Trigger.CLOSED, "closed while sending")

    async def close(self, reason: str) -> None:
        """Close the current connection and let its reader finish (it reports the connection closed)."""
        conn = self.current
        if conn is not None:
            conn.lost = conn.lost or reason
            await conn.close(1000, "client went away")
        if self._reader is not None and self._reader is not asyncio.current_task():
            await asyncio.wait([self._reader], timeout=2)

    # -- liveness ---------------------------------------------------------------------------------
    async def preflight(self, turn: Turn) -> Trigger | None:
        """Is the current connection fit for this turn? Returns why not, or None."""
        conn = self.current
        cfg = self.cfg
        if conn is None:
            return Trigger.CLOSED
        if not conn.alive:
            return conn.lost if isinstance(conn.lost, Trigger) else Trigger.CLOSED
        if conn.age() >= cfg.rotation_age:
            conn.lost = Trigger.ROTATION
            self.emit(ev.UpstreamLost(conn.id, Trigger.ROTATION, f"age {conn.age():.0f}s", turn.number))
            self.spawn(conn.close(1000, "rotated"))
            return Trigger.ROTATION
        if turn.previous_id is not None and conn.idle_for() >= cfg.ping_idle:
            if not await conn.ping(cfg.ping_timeout):
                self.declare_dead(conn, Trigger.PING_TIMEOUT, f"no pong within {cfg.ping_timeout:g}s")
                return Trigger.PING_TIMEOUT
        return None

    def watch_first_event(self, conn: Upstream, still_waiting: Callable[[], bool]) -> None:
        """Declare ``conn`` dead when the turn just sent on it hears nothing within first_event_timeout."""
        self.spawn(self._watch_first_event(conn, still_waiting))

    async def _watch_first_event(self, conn: Upstream, still_waiting: Callable[[], bool]) -> None:
        timeout = self.cfg.first_event_timeout
        await CLOCK.sleep(timeout)  # a stall of our own does not count against the upstream
        if still_waiting():
            self.declare_dead(conn, Trigger.FIRST_EVENT_TIMEOUT, f"nothing within {timeout:g}s of sending the turn")

    async def keepalive(self, turn_in_flight: Callable[[], Turn | None]) -> None:
        """Ping the current connection whenever it has been silent for keepalive_interval: between turns, so a
        dead connection is known before the next turn, and mid-turn, so a connection that died while the model
        was thinking is found at once instead of leaving the client waiting on it. A pong is all it needs: a
        long, silent but healthy turn is never cut."""
        cfg = self.cfg
        while not self.owner.closed:
            await asyncio.sleep(cfg.keepalive_interval)
            conn = self.current
            if conn is None or not conn.alive or conn.idle_for() < cfg.keepalive_interval:
                continue
            if not await conn.ping(cfg.ping_timeout) and conn.alive and conn is self.current:
                turn = turn_in_flight()
                during = "" if turn is None else f" during turn {turn.number}"
                self.declare_dead(conn, Trigger.PING_TIMEOUT,
                                  f"keepalive{during}: no pong within {cfg.ping_timeout:g}s")

    def declare_dead(self, conn: Upstream, trigger: Trigger, detail: str) -> None:
        """``conn`` is dead: drop it, and tell the session when it was the current one."""
        if conn.lost is not None:
            return
        conn.lost = trigger
        conn.abort()
        if conn is self.current and not self.owner.closed:
            self.owner.upstream_lost(conn, trigger, detail)

    async def _read(self, conn: Upstream) -> None:
        """Read ``conn`` until it ends; an exception (replayguard's own, in handling a message) is the session's
        supervisor's to report: the connection is not declared dead for it."""
        try:
            async for message in conn.ws:
                if self.faults is not None and self.faults.delay:
                    turn = self.owner.turn_on(conn)
                    if turn is not None:
                        await self.faults.hold_frame(turn, conn)
                conn.last_heard = time.monotonic()
                if conn is self.current and conn.alive:
                    await self.owner.upstream_message(conn, message)
        except ConnectionClosed:
            pass
        except Exception:
            conn.lost = conn.lost or "internal error"
            conn.abort()
            raise
        finally:
            ws = conn.ws
            if ws.protocol.close_rcvd is None:
                self.declare_dead(conn, Trigger.DROPPED, "no close frame (TCP dropped)")
            else:
                self.declare_dead(conn, Trigger.CLOSED, f"close code {ws.close_code} {ws.close_reason or ''}".strip())
            why = conn.lost.value if isinstance(conn.lost, Trigger) else str(conn.lost)
            self.emit(ev.UpstreamClosed(conn.id, ws.close_code if ws.protocol.close_rcvd is not None else None,
                                        ws.close_reason or why))
