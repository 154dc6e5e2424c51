"""The loopback bridge: a WebSocket server inside the mitmproxy process that owns the client side of every
matched flow, so the client's connection can outlive any number of upstream connections.

mitmproxy relays (and records) messages between the client and this server; a :class:`Session` relays them
on to the addon's own upstream connection, feeds the replay state, watches the upstream, and carries out the
recovery decision (:mod:`replayguard.recovery`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from http import HTTPStatus
from typing import Any, Callable, Coroutine

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from . import trace as tr
from .chain import Chain, ChainStore, RequestError, Turn
from .faults import FaultInjector, FaultKind, Fired
from .recovery import Action, Decision, Situation, Trigger, decide, handshake_failed
from .rules import Rules
from .upstream import HandshakeFailed, Target, Upstream, open_upstream

log = logging.getLogger(__name__)
logging.getLogger("websockets").setLevel(logging.WARNING)  # it logs every frame at DEBUG otherwise

TOKEN_HEADER = "x-replayguard-session"
PENDING_TTL = 30.0  # seconds a registered session waits for mitmproxy to connect to the bridge

# The event type, when it is the first key (as the upstream sends it): cheap to read without decoding.
_TYPE_HEAD = re.compile(r'\{\s*"type"\s*:\s*"([a-z_.]+)"')


def is_delta(message: str) -> bool:
    """A streaming delta event (`response.*.delta`): forwarded without being decoded."""
    m = _TYPE_HEAD.match(message, 0, 96)
    return m is not None and m.group(1).endswith(".delta")


# Faults carried out on an open upstream connection (the others are armed in the FaultInjector).
CONNECTION_FAULTS = frozenset({FaultKind.CLOSE, FaultKind.DROP, FaultKind.BLACKHOLE})

# (flow id, kind, text): kind is "recovered", "failed" or "info"
Notify = Callable[[str, str, str], None]


class Session:
    """One client WebSocket session: the replay state plus the I/O around it."""

    def __init__(self, flow_id: str, target: Target, rules: Rules, store: ChainStore, notify: Notify | None = None,
                 trace: tr.SessionTrace | None = None, faults: FaultInjector | None = None):
        self.flow_id = flow_id
        self.trace = trace  # None when tracing is off: every trace call site is one `if`
        self.faults = faults  # None unless rules.yaml injects faults into this flow
        self.target = target
        self.rules = rules
        self.chain = Chain(store, rules.limits.max_chain_bytes)
        self.notify = notify or (lambda *_: None)
        self.upstream: Upstream | None = None
        self.client: ServerConnection | None = None
        self.closed = False
        self.recoveries = 0
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inflight: tuple[Turn, Upstream] | None = None  # the turn in flight and where it was sent
        self._event_seen = False  # an upstream event arrived since the turn was sent
        self._turn_t0 = 0.0  # when the turn in flight was sent by the client
        self._failed_closed: Decision | None = None
        self._turn_ended = asyncio.Event()  # set whenever the turn in flight ends

    # -- lifecycle --------------------------------------------------------------------------------
    async def open(self, client: str = "") -> None:
        """Open the first upstream connection (raises HandshakeFailed)."""
        if self.trace:
            self.trace("session.start", schema=tr.SCHEMA, url=tr.redact_url(self.target.url), client=client)
        fired = self.faults.turn_completed(0) if self.faults is not None else []
        for fault in fired:
            if fault.rule.kind not in CONNECTION_FAULTS:
                self._inject(fault, None)
        try:
            self.upstream = await self._open_upstream("open")
            for fault in fired:
                if fault.rule.kind in CONNECTION_FAULTS:
                    self._inject(fault, self.upstream)
        except HandshakeFailed as e:
            if self.trace:
                self.trace("session.end", turns_completed=0, turns_failed=0, recoveries=0,
                           reason=f"upstream handshake failed: {e.detail}")
            raise

    async def _open_upstream(self, purpose: str) -> Upstream:
        """A new upstream connection (raises HandshakeFailed); traced, and refused on purpose by a fault rule."""
        started = time.monotonic()
        sent = tr.redact_headers(self.target.request_headers()) if self.trace else None
        refusal = self.faults.take_refusal() if self.faults is not None else None
        try:
            if refusal is not None:
                log.warning("flow %s: injected fault: upstream handshake refused with HTTP %d", self.flow_id, refusal)
                body = json.dumps({"error": {"type": "server_error", "code": None, "param": None,
                                             "message": f"injected by replayguard: HTTP {refusal}"}}).encode()
                raise HandshakeFailed(f"upstream answered HTTP {refusal} (injected)", refusal, body, "application/json")
            conn = await open_upstream(self.target)
        except HandshakeFailed as e:
            if self.trace:
                self.trace("handshake", conn=None, url=tr.redact_url(self.target.url), purpose=purpose, ok=False,
                           status=e.status, ms=_ms(started), headers=sent, error=e.detail,
                           injected=refusal is not None)
            raise
        if self.trace:
            self.trace("handshake", conn=conn.id, url=tr.redact_url(self.target.url), purpose=purpose, ok=True,
                       status=101, ms=_ms(started), headers=sent,
                       response_headers=tr.redact_headers(conn.response_headers()))
        return conn

    async def run(self, client: ServerConnection) -> None:
        self.client = client
        if self.upstream is not None:
            self._spawn(self._read_upstream(self.upstream))
        if self.rules.upstream.keepalive_interval > 0:
            self._spawn(self._keepalive())
        try:
            async for message in client:
                await self._from_client(message)
        except ConnectionClosed:
            pass
        finally:
            await self.close()

    async def close(self) -> None:
        """Free everything; closing the upstream stops a response still being generated."""
        if self.closed:
            return
        self.closed = True
        aborted = self.chain.abort_turn()
        self._turn_ended.set()
        if aborted is not None:
            log.info("flow %s: client left mid-turn; upstream response stopped", self.flow_id)
            self._trace_end(aborted, None, "client left mid-turn")
        if self.trace:
            self.trace("session.end", turns_completed=self.chain.completed, turns_failed=self.chain.failed,
                       recoveries=self.recoveries, reason=self._end_reason())
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self._retire_chain()
        if self.upstream is not None:
            self.upstream.lost = self.upstream.lost or "session closed"
            await self._close_ws(self.upstream, 1000, "client went away")
        if self.client is not None:
            await self._close_ws_client(1000, "")
        self._inflight = None

    def _retire_chain(self) -> None:
        """The session's replay state stays resumable for limits.resume_ttl seconds, then it is freed."""
        store, ttl = self.chain.store, self.rules.limits.resume_ttl
        store.retire(self.chain.response_ids, time.monotonic() + ttl)

        def sweep() -> None:
            freed = store.sweep(time.monotonic())
            if freed:
                log.debug("replayguard: freed %d saved response(s) after resume_ttl (%d retired left)",
                          freed, store.retired)

        if ttl == 0:
            sweep()
        else:
            asyncio.get_running_loop().call_later(ttl + 0.01, sweep)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- client -> upstream -----------------------------------------------------------------------
    async def _from_client(self, message: str | bytes) -> None:
        if isinstance(message, str):
            try:
                obj = json.loads(message)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and obj.get("type") == "response.create":
                if self.chain.turn is not None:
                    await self._wait_for_turn_end()
                    if self.closed:
                        return
                await self._create(obj, message)
                return
        async with self._lock:
            conn = await self._usable_upstream()
            if conn is not None:
                await self._send(conn, message)

    async def _wait_for_turn_end(self) -> None:
        """A response.create sent while another is in flight waits for it, as the upstream runs one response at
        a time per connection. The client's later messages wait behind it (this is the client reader), so
        nothing is reordered and nothing is dropped; the turn in flight always ends (completed, failed,
        recovered and completed, or failed closed)."""
        turn = self.chain.turn
        log.debug("flow %s: response.create pipelined behind turn %s; it waits", self.flow_id,
                  turn.number if turn else "-")
        while self.chain.turn is not None and not self.closed:
            self._turn_ended.clear()
            await self._turn_ended.wait()

    async def _create(self, request: dict[str, Any], raw: str) -> None:
        try:
            turn = self.chain.begin_turn(request, raw)
            self._turn_t0 = time.monotonic()
            if self.trace:
                conn = self.upstream.id if self.upstream is not None else None
                self.trace("turn.start", turn=turn.number, conn=conn,
                           **tr.turn_start_fields(request, len(raw), self.trace.bodies))
        except RequestError as e:
            log.debug("flow %s: passing unreadable response.create through: %s", self.flow_id, e)
            async with self._lock:
                conn = await self._usable_upstream()
                if conn is not None:
                    await self._send(conn, raw)
            return
        async with self._lock:
            trigger = await self._preflight(turn)
            if trigger is not None:
                await self._recover_locked(turn, trigger)
                return
            assert self.upstream is not None
            payload = raw
            if self.chain.needs_rewrite(turn):
                payload = self._resume_payload(turn, raw)
            await self._send_turn(self.upstream, turn, payload)

    def _resume_payload(self, turn: Turn, raw: str) -> str:
        """previous_response_id names a response this connection does not hold (a client that reconnected,
        or a retry after an error): rebuild the request from the chain state when that is safe."""
        situation = self._situation(turn, Trigger.RESUME, attempts=0)
        decision = decide(situation)
        if decision.action is not Action.REPLAY:
            return raw  # the upstream answers for itself
        log.info(
            "flow %s turn %d: previous_response_id %s is not on this upstream connection -> replayed full input (%d items)",
            self.flow_id,
            turn.number,
            turn.previous_id,
            len(situation.replay or ()),
        )
        self.notify(self.flow_id, "recovered", f"turn {turn.number}: resumed {turn.previous_id} from chain state")
        body = turn.replay_request()
        payload = json.dumps(body)
        if self.trace:
            conn = self.upstream.id if self.upstream is not None else None
            self._trace_recovery(turn, Trigger.RESUME, decision, conn, conn, body, len(payload))
        return payload

    async def _preflight(self, turn: Turn) -> Trigger | None:
        """Is the upstream connection fit for this turn? Returns why not, or None."""
        conn = self.upstream
        cfg = self.rules.upstream
        if conn is None:
            return Trigger.CLOSED
        if not conn.alive:
            return conn.lost if isinstance(conn.lost, Trigger) else Trigger.CLOSED
        if conn.age() >= cfg.rotation_age:
            conn.lost = Trigger.ROTATION
            if self.trace:
                self.trace("upstream.lost", conn=conn.id, how=Trigger.ROTATION, detail=f"age {conn.age():.0f}s",
                           turn=turn.number)
            self._spawn(self._close_ws(conn, 1000, "rotated"))
            return Trigger.ROTATION
        if turn.previous_id is not None and conn.idle_for() >= cfg.ping_idle:
            if not await conn.ping(cfg.ping_timeout):
                self._declare_dead(conn, Trigger.PING_TIMEOUT, f"no pong within {cfg.ping_timeout:g}s")
                return Trigger.PING_TIMEOUT
        return None

    async def _usable_upstream(self) -> Upstream | None:
        """The current upstream connection, reconnected if it died (for messages other than response.create)."""
        if self.upstream is not None and self.upstream.alive:
            return self.upstream
        try:
            conn = await self._open_upstream("reconnect")
        except HandshakeFailed as e:
            await self._fail(None, handshake_failed(Trigger.CLOSED, e.status, e.detail))
            return None
        self._replace_upstream(conn)
        return conn

    async def _send(self, conn: Upstream, message: str | bytes) -> None:
        try:
            await conn.ws.send(message)
        except ConnectionClosed:
            self._declare_dead(conn, Trigger.CLOSED, "closed while sending")

    async def _send_turn(self, conn: Upstream, turn: Turn, payload: str) -> None:
        self._inflight = (turn, conn)
        self._event_seen = False
        attempt = turn.attempts
        injected = self.faults.take_error(turn.previous_id) if self.faults is not None else None
        if injected is not None:
            # Answered as the upstream would, without sending: the error arrives on this connection.
            self._fault_applied("error", f"turn {turn.number} answered with {injected['error']['code']}", conn)
            self._spawn(self._from_upstream(conn, json.dumps(injected)))
        else:
            await self._send(conn, payload)
        self._spawn(self._watch_first_event(conn, turn, attempt))

    async def _watch_first_event(self, conn: Upstream, turn: Turn, attempt: int) -> None:
        timeout = self.rules.upstream.first_event_timeout
        await asyncio.sleep(timeout)
        if self._inflight == (turn, conn) and turn.attempts == attempt and not self._event_seen:
            self._declare_dead(conn, Trigger.FIRST_EVENT_TIMEOUT, f"nothing within {timeout:g}s of sending the turn")

    # -- upstream -> client -----------------------------------------------------------------------
    async def _read_upstream(self, conn: Upstream) -> None:
        try:
            async for message in conn.ws:
                if self.faults is not None and self.faults.delay and self._inflight is not None \
                        and self._inflight[1] is conn:
                    delay = self.faults.take_delay()
                    self._fault_applied("delay", f"first frame of turn {self._inflight[0].number} held {delay:g}s", conn)
                    await asyncio.sleep(delay)
                conn.last_heard = time.monotonic()
                if conn is self.upstream and conn.alive:
                    await self._from_upstream(conn, message)
        except ConnectionClosed:
            pass
        except Exception:  # never let one bad frame take the proxy down
            log.exception("flow %s: upstream reader failed", self.flow_id)
        finally:
            ws = conn.ws
            if ws.protocol.close_rcvd is None:
                self._declare_dead(conn, Trigger.DROPPED, "no close frame (TCP dropped)")
            else:
                self._declare_dead(conn, Trigger.CLOSED, f"close code {ws.close_code} {ws.close_reason or ''}".strip())

    async def _from_upstream(self, conn: Upstream, message: str | bytes) -> None:
        inflight = self._inflight is not None and self._inflight[1] is conn
        if inflight:
            self._event_seen = True
        if isinstance(message, bytes):
            await self._to_client(message)
            return
        turn = self.chain.turn
        result = None
        event: dict[str, Any] | None = None
        if not is_delta(message):  # deltas, most of a stream, are never needed by the state: not decoded
            try:
                event = json.loads(message)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                await self._to_client(message)
                return
            if event.get("type") == "error" and self._swallow_error(conn, event, turn if inflight else None):
                return
            result = self.chain.on_event(event, len(message))
        if turn is not None and inflight:
            turn.forwarded = True
        await self._to_client(message)
        if result is not None:
            self._inflight = None
            self._turn_ended.set()
            if self.trace:
                self._trace_end(result.turn, event, None, conn)
            if result.ok and self.faults is not None:
                for fired in self.faults.turn_completed(self.chain.completed):
                    self._inject(fired, conn)
            if result.evicted_bytes:
                log.warning(
                    "flow %s turn %d: chain history reached %d bytes (max_chain_bytes %d): evicted, no longer replayable",
                    self.flow_id, result.turn.number, result.evicted_bytes, self.chain.max_chain_bytes,
                )
            if result.evicted_records:
                log.info("replayguard: evicted %d saved response(s) (max_saved_responses)", result.evicted_records)

    def _swallow_error(self, conn: Upstream, event: dict[str, Any], turn: Turn | None) -> bool:
        """Errors that mean 'this connection cannot serve the chain' are recovered, not forwarded,
        as long as nothing of the turn reached the client."""
        error = event.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        if code == "websocket_connection_limit_reached":
            trigger = Trigger.CONNECTION_LIMIT
        elif code == "previous_response_not_found" and turn is not None and turn.base_known:
            trigger = Trigger.PREVIOUS_NOT_FOUND
        else:
            return False
        if turn is None:
            if self.chain.turn is not None:
                return False  # the turn went elsewhere; let the client see it
            # Idle: the connection is finished; the next turn opens a new one.
            conn.lost = trigger
            if self.trace:
                self.trace("upstream.lost", conn=conn.id, how=trigger, detail=tr.error_fields(event), turn=None)
            self._spawn(self._close_ws(conn, 1000, "connection limit"))
            log.info("flow %s: %s while idle; next turn reconnects", self.flow_id, trigger.value)
            return True
        if turn.forwarded:
            return False
        conn.lost = trigger
        if self.trace:
            self.trace("upstream.lost", conn=conn.id, how=trigger, detail=tr.error_fields(event), turn=turn.number)
        self._spawn(self._close_ws(conn, 1000, "replaced"))
        self._spawn(self._recover(turn, trigger))
        return True

    async def _to_client(self, message: str | bytes) -> None:
        if self.client is None:
            return
        try:
            await self.client.send(message)
        except ConnectionClosed:
            await self.close()

    # -- loss and recovery ------------------------------------------------------------------------
    def _declare_dead(self, conn: Upstream, trigger: Trigger, detail: str) -> None:
        if conn.lost is not None:
            return
        conn.lost = trigger
        conn.abort()
        if conn is not self.upstream or self.closed:
            return
        inflight = self._inflight
        if self.trace:
            turn = inflight[0].number if inflight is not None and inflight[1] is conn else None
            self.trace("upstream.lost", conn=conn.id, how=trigger, detail=detail, turn=turn)
        if inflight is not None and inflight[1] is conn and self.chain.turn is inflight[0]:
            self._spawn(self._recover(inflight[0], trigger, detail))
        else:
            log.info("flow %s: upstream connection lost while idle (%s: %s); next turn reconnects",
                     self.flow_id, trigger.value, detail)

    async def _recover(self, turn: Turn, trigger: Trigger, detail: str = "") -> None:
        async with self._lock:
            if self.closed or self.chain.turn is not turn:
                return
            await self._recover_locked(turn, trigger, detail)

    def _situation(self, turn: Turn, trigger: Trigger, attempts: int) -> Situation:
        cfg = self.rules.recovery
        return Situation(
            trigger=trigger,
            policy=cfg.policy,
            attempts=attempts,
            max_retries=cfg.max_retries,
            previous_id=turn.previous_id,
            previous_stored=turn.base_store,
            payload_input=turn.new_items,
            replay=turn.full_input(),
            client_saw_output=turn.forwarded,
        )

    async def _recover_locked(self, turn: Turn, trigger: Trigger, detail: str = "") -> None:
        decision = decide(self._situation(turn, trigger, turn.attempts))
        if decision.fails:
            await self._fail(turn, decision)
            return
        if trigger is not Trigger.ROTATION:
            turn.attempts += 1
        try:
            conn = await self._open_upstream("recovery")
        except HandshakeFailed as e:
            await self._fail(turn, handshake_failed(trigger, e.status, e.detail))
            return
        if self.closed:
            await self._close_ws(conn, 1000, "client went away")
            return
        old = self.upstream.id if self.upstream is not None else None
        self._replace_upstream(conn)
        body = None
        if decision.action is Action.REPLAY:
            body = turn.replay_request()
            payload = json.dumps(body)
        else:
            payload = turn.raw
        if self.trace:
            self._trace_recovery(turn, trigger, decision, old, conn.id, body, len(payload))
        self.recoveries += 1
        level = logging.DEBUG if trigger is Trigger.ROTATION else logging.INFO
        log.log(
            level,
            "flow %s turn %d: %s%s -> %s (upstream #%d)",
            self.flow_id, turn.number, trigger.value, f" ({detail})" if detail else "",
            decision.action.value, conn.id,
        )
        if trigger is not Trigger.ROTATION:
            self.notify(self.flow_id, "recovered", f"turn {turn.number}: {trigger.value} -> {decision.action.value}")
        await self._send_turn(conn, turn, payload)

    def _replace_upstream(self, conn: Upstream) -> None:
        old = self.upstream
        if old is not None and old is not conn:
            old.lost = old.lost or "replaced"
            self._spawn(self._close_ws(old, 1000, "replaced"))
        self.upstream = conn
        self.chain.connection_reset()
        self._spawn(self._read_upstream(conn))

    async def _fail(self, turn: Turn | None, decision: Decision) -> None:
        """Fail closed: tell the client why (an upstream-shaped error event), then close it."""
        aborted = self.chain.abort_turn()
        self._inflight = None
        self._turn_ended.set()
        self._failed_closed = decision
        if self.trace:
            if aborted is not None:
                self._trace_end(aborted, None, "failed closed")
            self.trace("fail_close", turn=turn.number if turn is not None else None, reason=decision.reason,
                       error=decision.error, close_code=decision.close_code, close_reason=decision.close_reason)
        number = turn.number if turn is not None else "-"
        log.warning("flow %s turn %s: %s -> failed closed (close %d)", self.flow_id, number, decision.reason,
                    decision.close_code)
        self.notify(self.flow_id, "failed", f"turn {number}: {decision.reason} -> failed closed")
        if self.client is not None and decision.error is not None:
            try:
                await self.client.send(json.dumps(decision.error))
            except ConnectionClosed:
                pass
        await self._close_ws_client(decision.close_code, decision.close_reason)
        if self.upstream is not None:
            self.upstream.lost = self.upstream.lost or "failed closed"
            self._spawn(self._close_ws(self.upstream, 1000, "failed closed"))

    async def _keepalive(self) -> None:
        """Ping the upstream connection whenever it has been silent for keepalive_interval: between turns, so a
        dead connection is known before the next turn, and mid-turn, so a connection that died while the model
        was thinking is found at once instead of leaving the client waiting on it. A pong is all it needs: a
        long, silent but healthy turn is never cut."""
        cfg = self.rules.upstream
        while not self.closed:
            await asyncio.sleep(cfg.keepalive_interval)
            conn = self.upstream
            if conn is None or not conn.alive or conn.idle_for() < cfg.keepalive_interval:
                continue
            if not await conn.ping(cfg.ping_timeout) and conn.alive and conn is self.upstream:
                during = "" if self.chain.turn is None else f" during turn {self.chain.turn.number}"
                self._declare_dead(conn, Trigger.PING_TIMEOUT,
                                   f"keepalive{during}: no pong within {cfg.ping_timeout:g}s")

    # -- faults and trace -------------------------------------------------------------------------
    def _inject(self, fired: Fired, conn: Upstream | None) -> None:
        """Carry out a fault that fired after a completed turn (the others are armed in the injector)."""
        rule = fired.rule
        log.warning("flow %s: injected fault after turn %d: %s", self.flow_id, fired.after_turn, rule.describe())
        self.notify(self.flow_id, "info", f"injected fault after turn {fired.after_turn}: {rule.describe()}")
        if self.trace:
            self.trace("fault", phase="fired", kind=rule.kind, detail=rule.describe(), turn=fired.after_turn,
                       conn=conn.id if conn is not None else None, rule_line=rule.line, injected=True)
        if conn is None:
            return
        if rule.kind is FaultKind.CLOSE:
            self._spawn(self._close_ws(conn, rule.code, "replayguard fault injection"))
        elif rule.kind is FaultKind.DROP:
            conn.abort()
        elif rule.kind is FaultKind.BLACKHOLE:
            transport = conn.ws.transport
            if transport is not None:
                transport.pause_reading()

    def _fault_applied(self, kind: str, detail: str, conn: Upstream) -> None:
        log.warning("flow %s: injected fault: %s", self.flow_id, detail)
        if self.trace:
            self.trace("fault", phase="applied", kind=kind, detail=detail,
                       turn=self.chain.turn.number if self.chain.turn else None, conn=conn.id, injected=True)

    def _trace_end(self, turn: Turn, event: dict[str, Any] | None, reason: str | None,
                   conn: Upstream | None = None) -> None:
        if not self.trace:
            return
        fields: dict[str, Any] = {}
        response = event.get("response") if event is not None else None
        if isinstance(response, dict) and isinstance(response.get("usage"), dict):
            fields["usage"] = response["usage"]
        if event is not None and event.get("type") == "error":
            fields["error"] = tr.error_fields(event)
        if reason is not None:
            fields["reason"] = reason
        if self.trace.bodies is tr.Bodies.FULL and turn.outputs:
            fields["output_items"] = turn.outputs
        self.trace("turn.end", turn=turn.number, conn=conn.id if conn is not None else None, status=turn.status,
                   response_id=turn.response_id, previous_response_id=turn.previous_id,
                   output=[tr.summarize_item(i, self.trace.bodies) for i in turn.outputs],
                   ms=_ms(self._turn_t0), **fields)

    def _trace_recovery(self, turn: Turn, trigger: Trigger, decision: Decision, old: int | None, new: int,
                        body: dict[str, Any] | None, size: int) -> None:
        assert self.trace is not None
        replayed = body is not None
        fields: dict[str, Any] = {}
        if replayed:
            fields["input"] = tr.summarize_items(body["input"])
            if self.trace.bodies is tr.Bodies.FULL:
                fields["body"] = body
        self.trace("recovery", turn=turn.number, trigger=trigger, action=decision.action, from_conn=old, to_conn=new,
                   removed_previous_response_id=turn.previous_id if replayed else None,
                   items=len(body["input"]) if replayed else len(turn.new_items), bytes=size, attempt=turn.attempts,
                   **fields)

    def _end_reason(self) -> str:
        if self._failed_closed is not None:
            return f"failed closed: {self._failed_closed.reason}"
        ws = self.client
        code = ws.close_code if ws is not None else None
        return f"client closed ({code})" if code is not None else "closed"

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    async def _close_ws(conn: Upstream, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(conn.ws.close(code, reason), 2)
        except Exception:
            conn.abort()

    async def _close_ws_client(self, code: int, reason: str) -> None:
        if self.client is None:
            return
        try:
            await asyncio.wait_for(self.client.close(code, reason), 2)
        except Exception:
            transport = self.client.transport
            if transport is not None:
                transport.abort()


def _ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 1)


def limit_message_size(ws: ServerConnection, size: int) -> None:
    """Per-connection cap on incoming messages (websockets >= 16 calls it max_message_size, older max_size)."""
    protocol: Any = ws.protocol
    if hasattr(protocol, "max_message_size"):
        protocol.max_message_size = size
    else:
        protocol.max_size = size


class Bridge:
    """The loopback WebSocket server mitmproxy's matched flows are pointed at."""

    def __init__(self) -> None:
        self._server: Server | None = None
        self._starting: asyncio.Lock | None = None
        self.port: int = 0
        self.pending: dict[str, tuple[Session, asyncio.TimerHandle]] = {}
        self.active: set[Session] = set()

    async def ensure_started(self) -> int:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._server is None:
                self._server = await serve(
                    self._handler,
                    "127.0.0.1",
                    0,
                    process_request=self._process_request,
                    process_response=self._process_response,
                    select_subprotocol=self._select_subprotocol,
                    ping_interval=None,
                    max_size=None,  # per session, set in the handler
                    max_queue=64,
                )
                self.port = self._server.sockets[0].getsockname()[1]
                log.debug("replayguard bridge listening on 127.0.0.1:%d", self.port)
        return self.port

    def register(self, session: Session) -> str:
        token = secrets.token_urlsafe(18)
        handle = asyncio.get_running_loop().call_later(PENDING_TTL, self._expire, token)
        self.pending[token] = (session, handle)
        return token

    def discard(self, flow_id: str) -> None:
        """The flow ended before it reached the bridge (client gone, or an error)."""
        for token, (session, _) in list(self.pending.items()):
            if session.flow_id == flow_id:
                self._expire(token)

    def _expire(self, token: str) -> None:
        entry = self.pending.pop(token, None)
        if entry is not None:
            entry[1].cancel()
            asyncio.ensure_future(entry[0].close())

    def _session(self, request: Any) -> Session | None:
        entry = self.pending.get(request.headers.get(TOKEN_HEADER, ""))
        return entry[0] if entry else None

    def _process_request(self, connection: ServerConnection, request: Any) -> Any:
        if self._session(request) is None:
            return connection.respond(HTTPStatus.FORBIDDEN, "unknown or expired replayguard session\n")
        return None

    def _process_response(self, connection: ServerConnection, request: Any, response: Any) -> None:
        session = self._session(request)
        if session is None or session.upstream is None:
            return
        # Hand the upstream's handshake headers (x-codex-turn-state, request ids, ...) to the client.
        for name, value in session.upstream.response_headers():
            response.headers[name] = value

    def _select_subprotocol(self, connection: ServerConnection, subprotocols: Any) -> Any:
        session = self._session(connection.request)
        if session is None or session.upstream is None:
            return None
        return session.upstream.ws.subprotocol

    async def _handler(self, ws: ServerConnection) -> None:
        token = ws.request.headers.get(TOKEN_HEADER, "") if ws.request else ""
        entry = self.pending.pop(token, None)
        if entry is None:
            await ws.close(1008, "unknown replayguard session")
            return
        session, handle = entry
        handle.cancel()
        limit_message_size(ws, session.target.max_size)
        self.active.add(session)
        try:
            await session.run(ws)
        finally:
            self.active.discard(session)

    async def stop(self) -> None:
        for token in list(self.pending):
            self._expire(token)
        for session in list(self.active):
            await session.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
