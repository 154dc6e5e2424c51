"""One client WebSocket session: the turn loop.

The client's messages go upstream in order (a response.create waits for the turn in flight, as the upstream runs
one response at a time); the upstream's events feed the replay state and go back to the client. When the link
(:mod:`replayguard.proxy.link`) reports the connection lost, or the upstream answers that it cannot serve the
chain, the session asks :func:`replayguard.core.recovery.decide` what to do and does it: resend, replay on a fresh
connection, or fail closed with an error event the client understands. Everything that happens is emitted as a
:mod:`~replayguard.core.events` record; the trace, the log and mitmweb listen.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Coroutine, Generator, TypeVar

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..core import events as ev
from ..core.chain import Chain, ChainStore, RequestError, Turn
from ..core.faults import FaultInjector, FaultRule
from ..core.messages import STEP, dumps_steps, is_delta, parse, parse_steps
from ..core.records import error_fields
from ..core.errors import CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART
from ..core.recovery import (Action, Decision, Situation, Trigger, decide, handshake_failed, internal_error,
                             shutting_down)
from ..core.recovery import reloading as reloading_decision
from ..core.redact import redact_url
from .clock import CLOCK
from .injection import CONNECTION_FAULTS, FaultActions
from .link import UpstreamLink
from .rules import Rules
from .upstream import HandshakeFailed, Target, Upstream, ms_since

log = logging.getLogger(__name__)
T = TypeVar("T")

# Where an internal error happened, by the task's coroutine (for the error event and the log line).
WHERE = {"_read": "the upstream reader", "keepalive": "the keepalive", "_recover": "recovery",
         "_watch_first_event": "the first-event watchdog", "upstream_message": "the upstream reader",
         "close": "closing an upstream connection"}


class Session:
    def __init__(self, flow_id: str, target: Target, rules: Rules, store: ChainStore,
                 listeners: list[ev.Listener] | None = None, faults: FaultInjector | None = None,
                 principal: str = "", client_keepalive: float = 0.0) -> None:
        self.flow_id = flow_id
        self.target = target
        self.rules = rules
        self.chain = Chain(store, rules.limits.max_chain_bytes, principal)
        self.emit = ev.Emitter(listeners)
        self.faults = FaultActions(faults, self.emit, self.spawn) if faults is not None else None
        self.link = UpstreamLink(flow_id, self, target, rules.upstream, self.emit, self.spawn, self.faults)
        self.client: ServerConnection | None = None
        self.closed = False
        self.recoveries = 0
        self.last_recovery: str | None = None  # for replayguard.sessions
        self.opening: asyncio.Future[Any] | None = None  # the first upstream handshake, while it runs
        self.client_keepalive = client_keepalive  # seconds between pings to the client (0: none)
        self._lock = asyncio.Lock()  # one writer of the upstream side at a time
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inflight: tuple[Turn, Upstream] | None = None  # the turn in flight and where it was sent
        self._event_seen = False  # an upstream event arrived since the turn was sent
        self._turn_t0 = 0.0  # when the turn in flight was sent by the client
        self._failed_closed: Decision | None = None
        self._turn_ended = asyncio.Event()  # set whenever the turn in flight ends
        self._finished = asyncio.Event()  # set when close() is done
        self._crashing = False  # an internal error is failing the session closed
        self._client_gone = False  # the client stopped answering pings
        self._shutdown = ""  # why the proxy closed it (stopping, or the addon reloaded)

    @property
    def upstream(self) -> Upstream | None:
        return self.link.current

    # -- lifecycle --------------------------------------------------------------------------------
    async def open(self, client: str = "") -> None:
        """Open the first upstream connection (raises HandshakeFailed)."""
        self.emit(ev.SessionStarted(redact_url(self.target.url), client, self.rules.snapshot()))
        later = self.faults.session_starting() if self.faults is not None else []
        try:
            conn = await self.link.open("open")
        except HandshakeFailed as e:
            self.emit(ev.SessionEnded(0, 0, 0, f"upstream handshake failed: {e.detail}"))
            self.closed = True  # it never started: nothing to close later
            self._finished.set()
            raise
        if self.closed:  # the client went away while the handshake ran
            await conn.close(1000, "client went away")
            return
        self.link.current = conn
        for fired in later:
            assert self.faults is not None
            self.faults.fire(fired, conn)

    async def run(self, client: ServerConnection) -> None:
        self.client = client
        if self.link.current is not None:
            self.link.start(self.link.current)
        if self.rules.upstream.keepalive_interval > 0:
            self.spawn(self.link.keepalive(lambda: self.chain.turn))
        if self.client_keepalive > 0:
            self.spawn(self._keep_client_alive())
        try:
            async for message in client:
                await self._from_client(message)
        except ConnectionClosed:
            pass
        except Exception as e:  # our own bug: fail closed, never leave the client waiting
            await self._crashed("the client reader", e)
        finally:
            await self.close()

    async def _keep_client_alive(self) -> None:
        """Ping the client through mitmproxy, whose idle timeout would otherwise cut a client that is only thinking
        between turns (any frame resets it); a client that stops answering is gone: the session ends, its chain
        stays resumable for resume_ttl."""
        timeout = self.rules.client.pong_timeout
        while not self.closed and self.client is not None:
            await asyncio.sleep(self.client_keepalive)
            try:
                pong = await self.client.ping()
                if not await CLOCK.wait(pong, timeout):
                    raise asyncio.TimeoutError
            except ConnectionClosed:
                return
            except asyncio.TimeoutError:
                log.info("flow %s: the client answered no ping within %gs; treated as gone", self.flow_id, timeout)
                self._client_gone = True
                await self._close_client(1011, "client did not answer pings")
                await self.close()
                return

    async def shutdown(self, reloading: bool = False) -> None:
        """The proxy is stopping (or the addon is being reloaded): a client mid-turn gets a retryable error event,
        every client close 1001 (going away; 1012, service restart, for a reload); a silent upstream is dropped, not
        waited for."""
        if self.closed:
            return
        turn = self.chain.turn
        if turn is not None:
            await self._fail(turn, reloading_decision() if reloading else shutting_down())
        else:
            self._shutdown = "the addon was reloaded" if reloading else "the proxy shut down"
            if reloading:
                await self._close_client(CLOSE_SERVICE_RESTART, "replayguard reloaded; reconnect")
            else:
                await self._close_client(CLOSE_GOING_AWAY, "replayguard is shutting down")
        if self.upstream is not None:
            self.upstream.abort()
        await self.close()

    async def close(self) -> None:
        """Free everything; closing the upstream stops a response still being generated."""
        if self.closed:
            return
        self.closed = True
        aborted = self.chain.abort_turn()
        self._turn_ended.set()
        if aborted is not None:
            self.emit(ev.TurnEnded(aborted, None, None, ev.CLIENT_LEFT, ms_since(self._turn_t0)))
        self._retire_chain()
        await self.link.close("session closed")  # stops a response still being generated
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self.emit(ev.SessionEnded(self.chain.completed, self.chain.failed, self.recoveries, self._end_reason()))
        if self.client is not None:
            await self._close_client(1000, "")
        self._inflight = None
        self._finished.set()

    async def wait_closed(self, timeout: float) -> bool:
        """Wait until the session has closed (True), or ``timeout`` seconds (False)."""
        try:
            await asyncio.wait_for(self._finished.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

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

    def inject(self, rule: FaultRule) -> None:
        """A fault asked for now (a mitmproxy command), carried out like one a rule fired."""
        if self.faults is None:
            self.faults = FaultActions(FaultInjector([]), self.emit, self.spawn)
            self.link.faults = self.faults
        fired = self.faults.injector.fire_now(rule, self.chain.completed)
        self.faults.fire(fired, self.upstream if rule.kind in CONNECTION_FAULTS else None)

    def describe(self) -> str:
        """One line for replayguard.sessions."""
        conn = self.upstream
        upstream = "no upstream connection"
        if conn is not None:
            state = "alive" if conn.alive else f"lost: {getattr(conn.lost, 'value', conn.lost)}"
            upstream = f"upstream #{conn.id} ({state}, {conn.age():.0f}s old)"
        turn = self.chain.turn
        turns = f"{self.chain.completed} turns completed" + (f", turn {turn.number} in flight" if turn else "")
        last = f"; last recovery: {self.last_recovery}" if self.last_recovery else ""
        return f"{self.flow_id}  {self.target.url}  {turns}; {upstream}; {self.recoveries} recoveries{last}"

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as one of this session's tasks: cancelled when the session closes, and supervised: an
        exception in it fails the session closed (one structured error event, a non-1000 close, one log line)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._supervise)
        return task

    def _supervise(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        where = getattr(task.get_coro(), "__qualname__", "a session task")
        asyncio.ensure_future(self._crashed(WHERE.get(where.rsplit(".", 1)[-1], where), task.exception()))

    async def _crashed(self, where: str, exc: BaseException) -> None:
        """Any exception in the session's own work ends the session, closed with an error that names the cause;
        other sessions go on."""
        if self._crashing:
            return
        self._crashing = True
        where = getattr(exc, "replayguard_where", where)
        log.error("flow %s: replayguard internal error in %s; session failed closed", self.flow_id, where,
                  exc_info=exc)
        if self.closed:
            return
        try:
            await self._fail(self.chain.turn, internal_error(where, exc))
        except Exception:
            log.exception("flow %s: failing closed failed too; connections dropped", self.flow_id)
            for ws in (self.client, self.upstream.ws if self.upstream is not None else None):
                if ws is not None and ws.transport is not None:
                    ws.transport.abort()
        await self.close()

    def _end_reason(self) -> str:
        if self._failed_closed is not None:
            return f"failed closed: {self._failed_closed.reason}"
        if self._client_gone:
            return "client stopped answering pings"
        if self._shutdown:
            return self._shutdown
        ws = self.client
        code = ws.close_code if ws is not None else None
        return f"client closed ({code})" if code is not None else "closed"

    # -- client -> upstream -----------------------------------------------------------------------
    async def _from_client(self, message: str | bytes) -> None:
        if isinstance(message, str):
            obj = parse(message) if len(message) < STEP else await in_steps(parse_steps(message))
            if self.closed:
                return
            if isinstance(obj, dict) and obj.get("type") == "response.create":
                if self.chain.turn is not None:
                    await self._wait_for_turn_end()
                    if self.closed:
                        return
                await self._create(obj, message)
                return
        await self._forward(message)

    async def _forward(self, message: str | bytes) -> None:
        """A message the state does not need, on the current connection (reconnected if it died)."""
        async with self._lock:
            conn = await self._usable_upstream()
            if conn is not None:
                await self.link.send(conn, message)

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
        except RequestError as e:
            log.debug("flow %s: passing unreadable response.create through: %s", self.flow_id, e)
            await self._forward(raw)
            return
        self._turn_t0 = time.monotonic()
        self.emit(ev.TurnStarted(turn, self.upstream.id if self.upstream is not None else None, len(raw)))
        async with self._lock:
            trigger = await self.link.preflight(turn)
            if trigger is not None:
                await self._recover_locked(turn, trigger)
                return
            assert self.upstream is not None
            payload = raw
            if self.chain.needs_rewrite(turn):
                payload = await self._resume_payload(turn, raw)
            await self._send_turn(self.upstream, turn, payload)

    async def _resume_payload(self, turn: Turn, raw: str) -> str:
        """previous_response_id names a response this connection does not hold (a client that reconnected,
        or a retry after an error): rebuild the request from the chain state when that is safe."""
        decision = decide(self._situation(turn, Trigger.RESUME, attempts=0))
        if decision.action is not Action.REPLAY:
            return raw  # the upstream answers for itself
        body = turn.replay_request()
        payload = await in_steps(dumps_steps(body))
        conn = self.upstream.id if self.upstream is not None else None
        self.last_recovery = f"turn {turn.number}: resumed {turn.previous_id} from chain state"
        self.emit(ev.Recovered(turn, Trigger.RESUME, decision, conn, conn, body, len(payload), sent=payload))
        return payload

    async def _usable_upstream(self) -> Upstream | None:
        """The current upstream connection, reconnected if it died (for messages other than response.create)."""
        if self.upstream is not None and self.upstream.alive:
            return self.upstream
        try:
            conn = await self.link.open("reconnect")
        except HandshakeFailed as e:
            await self._fail(None, handshake_failed(Trigger.CLOSED, e.status, e.detail))
            return None
        self._adopt(conn)
        return conn

    async def _send_turn(self, conn: Upstream, turn: Turn, payload: str) -> None:
        self._inflight = (turn, conn)
        self._event_seen = False
        turn.events = 0
        attempt = turn.attempts
        injected = self.faults.take_error(turn, conn) if self.faults is not None else None
        if injected is not None:
            # Answered as the upstream would, without sending: the error arrives on this connection.
            self.spawn(self.upstream_message(conn, json.dumps(injected)))
        else:
            await self.link.send(conn, payload)
        self.link.watch_first_event(
            conn, lambda: self._inflight == (turn, conn) and turn.attempts == attempt and not self._event_seen)

    # -- upstream -> client -----------------------------------------------------------------------
    def turn_on(self, conn: Upstream) -> Turn | None:
        """The turn in flight on ``conn``, if any."""
        inflight = self._inflight
        return inflight[0] if inflight is not None and inflight[1] is conn else None

    async def upstream_message(self, conn: Upstream, message: str | bytes) -> None:
        inflight = self._inflight is not None and self._inflight[1] is conn
        if inflight:
            self._event_seen = True
            self._inflight[0].events += 1  # type: ignore[index]
        if isinstance(message, bytes):
            await self._to_client(message)
            return
        turn = self.chain.turn
        result = None
        event: dict[str, Any] | None = None
        if not is_delta(message):  # deltas, most of a stream, are never needed by the state: not decoded
            event = parse(message) if len(message) < STEP else await in_steps(parse_steps(message))
            if self.closed:
                return
            if not isinstance(event, dict):
                await self._to_client(message)
                return
            if event.get("type") == "error" and self._swallow_error(conn, event, turn if inflight else None, message):
                return
            result = self.chain.on_event(event, len(message))
        if turn is not None and inflight:
            turn.forwarded = True
        await self._to_client(message)
        if result is not None:
            self._inflight = None
            self._turn_ended.set()
            self.emit(ev.TurnEnded(result.turn, conn.id, event, None, ms_since(self._turn_t0)))
            if result.ok and self.faults is not None:
                self.faults.turn_completed(self.chain.completed, conn)
            if result.evicted_bytes or result.evicted_records:
                self.emit(ev.ChainEvicted(result.turn.number, result.evicted_bytes, self.chain.max_chain_bytes,
                                          result.evicted_records))

    def _swallow_error(self, conn: Upstream, event: dict[str, Any], turn: Turn | None, raw: str) -> bool:
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
            self.emit(ev.UpstreamLost(conn.id, trigger, error_fields(event), None, by_error=True, raw=raw))
            self.link.retire(conn, trigger, "connection limit")
            return True
        if turn.forwarded:
            return False
        self.emit(ev.UpstreamLost(conn.id, trigger, error_fields(event), turn.number, by_error=True, raw=raw,
                                  events=turn.events - 1))  # the error event itself is not one the turn had
        self.link.retire(conn, trigger, "replaced")
        self.spawn(self._recover(turn, trigger))
        return True

    async def _to_client(self, message: str | bytes) -> None:
        if self.client is None:
            return
        try:
            await self.client.send(message)
        except ConnectionClosed:
            await self.close()

    # -- loss and recovery ------------------------------------------------------------------------
    def upstream_lost(self, conn: Upstream, trigger: Trigger, detail: str) -> None:
        """The link found the current connection dead: recover the turn on it, if any."""
        inflight = self._inflight
        turn = inflight[0] if inflight is not None and inflight[1] is conn else None
        self.emit(ev.UpstreamLost(conn.id, trigger, detail, turn.number if turn is not None else None,
                                  events=turn.events if turn is not None else None))
        if turn is not None and self.chain.turn is turn:
            self.spawn(self._recover(turn, trigger, detail))

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
        try:
            await self._carry_over(turn, trigger, detail)
        except Exception as e:
            e.replayguard_where = "recovery"  # type: ignore[attr-defined]  # named for the log and the client
            raise

    async def _carry_over(self, turn: Turn, trigger: Trigger, detail: str) -> None:
        decision = decide(self._situation(turn, trigger, turn.attempts))
        if decision.fails:
            await self._fail(turn, decision)
            return
        if trigger is not Trigger.ROTATION:
            turn.attempts += 1
        try:
            conn = await self.link.open("recovery")
        except HandshakeFailed as e:
            await self._fail(turn, handshake_failed(trigger, e.status, e.detail))
            return
        if self.closed:
            await conn.close(1000, "client went away")
            return
        old = self.upstream.id if self.upstream is not None else None
        self._adopt(conn)
        body = None
        if decision.action is Action.REPLAY:
            body = turn.replay_request()
            payload = await in_steps(dumps_steps(body))
        else:
            payload = turn.raw
        self.recoveries += 1
        if trigger is not Trigger.ROTATION:
            self.last_recovery = f"turn {turn.number}: {trigger.value} -> {decision.action.value}"
        self.emit(ev.Recovered(turn, trigger, decision, old, conn.id, body, len(payload), detail, sent=payload))
        await self._send_turn(conn, turn, payload)

    def _adopt(self, conn: Upstream) -> None:
        """A fresh connection replaces the current one; its cache is empty."""
        self.link.replace(conn)
        self.chain.connection_reset()

    async def _fail(self, turn: Turn | None, decision: Decision) -> None:
        """Fail closed: tell the client why (an upstream-shaped error event), then close it."""
        aborted = self.chain.abort_turn()
        self._inflight = None
        self._turn_ended.set()
        self._failed_closed = decision
        self.last_recovery = f"turn {turn.number if turn is not None else '-'}: {decision.reason} -> failed closed"
        if aborted is not None:
            self.emit(ev.TurnEnded(aborted, None, None, ev.FAILED_CLOSED, ms_since(self._turn_t0)))
        self.emit(ev.FailedClosed(turn, decision))
        if self.client is not None and decision.error is not None:
            try:
                await self.client.send(json.dumps(decision.error))
            except ConnectionClosed:
                pass
        await self._close_client(decision.close_code, decision.close_reason)
        if self.upstream is not None:
            self.link.retire(self.upstream, self.upstream.lost or "failed closed", "failed closed")

    async def _close_client(self, code: int, reason: str) -> None:
        if self.client is None:
            return
        try:
            await asyncio.wait_for(self.client.close(code, reason), 2)
        except Exception:
            transport = self.client.transport
            if transport is not None:
                transport.abort()


async def in_steps(steps: Generator[None, None, T]) -> T:
    """Run a stepwise parse or encoding (core.messages), letting other sessions run between its steps."""
    try:
        while True:
            next(steps)
            await asyncio.sleep(0)
    except StopIteration as done:
        return done.value
