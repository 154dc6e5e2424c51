"""One client session: the driver of its turn protocol.

Every rule of the protocol (what a message or an event means, when a turn ends, when to recover and how) is in
:class:`replayguard.core.protocol.Protocol`. This module owns what the core cannot: the client's WebSocket (through
the bridge), the upstream connections and their readers, pings and timers. It feeds the core one input at a time,
under one lock, and carries out the commands it returns in order; it never decides anything itself. An exception
anywhere names where it happened (the driver knows which input or command it was running) and fails the session
closed; other sessions go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace
from typing import Any, Coroutine, Generator, TypeVar

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..core import events as ev
from ..core import protocol as p
from ..core.chain import Chain, ChainStore
from ..core.faults import FaultInjector, FaultRule
from ..core.messages import STEP, dumps_steps, is_delta, parse_steps
from ..core.recovery import Refusal
from ..core.redact import redact_url
from .clock import CLOCK
from .flowview import FlowView
from .rules import Rules
from .upstream import OVERLOADED, HandshakeFailed, Target, Upstream, ms_since, open_upstream

log = logging.getLogger(__name__)
T = TypeVar("T")

# What each of the core's timers is, for an error that happens when one expires.
TIMERS = {"keepalive": "the keepalive", "first": "the first-event watchdog", "delay": "a held frame"}


def settings_of(rules: Rules) -> p.Settings:
    u, r = rules.upstream, rules.recovery
    return p.Settings(ping_idle=u.ping_idle, ping_timeout=u.ping_timeout, keepalive_interval=u.keepalive_interval,
                      first_event_timeout=u.first_event_timeout, rotation_age=u.rotation_age, policy=r.policy,
                      max_retries=r.max_retries)


class Session:
    def __init__(self, flow_id: str, target: Target, rules: Rules, store: ChainStore,
                 listeners: list[ev.Listener] | None = None, faults: FaultInjector | None = None,
                 principal: str = "", client_keepalive: float = 0.0, view: FlowView | None = None) -> None:
        self.flow_id = flow_id
        self.target = target
        self.rules = rules
        self.chain = Chain(store, rules.limits.max_chain_bytes, principal)
        self.emit = ev.Emitter(listeners)
        self.protocol = p.Protocol(self.chain, settings_of(rules), faults, CLOCK.now)
        self.client: ServerConnection | None = None
        self.opening: asyncio.Future[Any] | None = None  # the first upstream handshake, while it runs (the router's)
        self.client_keepalive = client_keepalive  # seconds between pings to the client (0: none)
        self._lock = asyncio.Lock()  # one input at a time, its commands carried out in order
        self._conns: dict[int, Upstream] = {}  # open upstream connections, by the protocol's number
        self._timers: dict[tuple[Any, ...], asyncio.Task[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closers: set[asyncio.Task[Any]] = set()
        self._early: list[str | bytes] = []  # for the client before it attached (nothing, in practice)
        self._client_closed = False  # replayguard closed the client itself
        self._finished = asyncio.Event()
        self._crashing = False
        self.view = view  # the flow mitmproxy keeps: it places records after the messages sent before them

    # -- what the rest of the proxy asks ---------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.protocol.closed

    @property
    def upstream(self) -> Upstream | None:
        """The current upstream connection (its handshake headers and subprotocol go to the client's 101)."""
        conn = self.protocol.current
        return self._conns.get(conn.id) if conn is not None else None

    @property
    def recoveries(self) -> int:
        return self.protocol.recoveries

    def describe(self) -> str:
        """One line for replayguard.sessions."""
        conn = self.protocol.current
        upstream = "no upstream connection"
        if conn is not None:
            state = "alive" if conn.state is p.ConnState.OPEN else f"lost: {getattr(conn.lost, 'value', conn.state.value)}"
            upstream = f"upstream #{conn.id} ({state}, {CLOCK.now() - conn.opened_at:.0f}s old)"
        flying = self.protocol.turns_in_flight()
        turns = f"{self.chain.completed} turns completed" + (
            f", turn {', '.join(str(t.number) for t in flying)} in flight" if flying else "")
        last = f"; last recovery: {self.protocol.last_recovery}" if self.protocol.last_recovery else ""
        return f"{self.flow_id}  {self.target.url}  {turns}; {upstream}; {self.recoveries} recoveries{last}"

    def inject(self, rule: FaultRule) -> None:
        """A fault asked for now (a mitmproxy command), carried out like one a rule fired."""
        self._spawn(self._input("the fault command", self.protocol.inject, rule))

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def open(self, client: str = "") -> None:
        """Open the first upstream connection (raises HandshakeFailed: the client gets the refusal instead of its
        101)."""
        async with self._lock:
            commands = self.protocol.start(redact_url(self.target.url), client, self.rules.snapshot())
            opens = [c for c in commands if isinstance(c, p.OpenUpstream)]
            await self._do_all([c for c in commands if not isinstance(c, p.OpenUpstream)], "opening the session")
        for command in opens:
            refusal = await self._open(command)
            if refusal is not None:
                raise refusal

    async def run(self, client: ServerConnection) -> None:
        self.client = client
        early, self._early = self._early, []
        for message in early:
            await self._to_client(message)
        if self.client_keepalive > 0:
            self._spawn(self._keep_client_alive())
        reason = "closed"
        try:
            async for message in client:
                obj: Any = p._MISSING
                if isinstance(message, str) and len(message) >= STEP:
                    obj = await in_steps(parse_steps(message))  # a large message, in steps: others go on meanwhile
                await self._input("the client reader", self.protocol.client_message, message, obj)
            reason = f"client closed ({client.close_code})" if client.close_code is not None else "closed"
        except ConnectionClosed:
            reason = f"client closed ({client.close_code})"
        except Exception as e:  # our own bug: fail closed, never leave the client waiting
            await self._crashed("the client reader", e)
        finally:
            if not self.closed:
                await self._input("closing the session", self.protocol.client_gone, reason)
            if not await self.wait_closed(5):  # pragma: no cover - the core always finishes a closed session
                log.error("flow %s: the session did not finish after its client left", self.flow_id)
                self._finish()

    async def close(self) -> None:
        """End the session now (its flow will never reach, or stay on, the bridge)."""
        if not self.closed:
            await self._input("closing the session", self.protocol.client_gone, "closed")
        self._finished.set()

    async def shutdown(self, reloading: bool = False) -> None:
        """The proxy stops (or the addon is reloaded): the core says what each client gets."""
        if not self.closed:
            await self._input("shutting down", self.protocol.shutdown, reloading)
        self._finished.set()

    async def wait_closed(self, timeout: float) -> bool:
        """Wait until the session has closed (True), or ``timeout`` seconds (False)."""
        try:
            await asyncio.wait_for(self._finished.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    # -- feeding the core ---------------------------------------------------------------------------------------
    async def _input(self, where: str, method: Any, *args: Any) -> None:
        """Feed one input to the core and carry out its commands, one input at a time."""
        try:
            async with self._lock:
                for command in method(*args):
                    if type(command) is p.SendClient:  # most of a stream: no detour through _do
                        await self._to_client(command.text)
                    else:
                        await self._do(command)
        except Exception as e:
            await self._crashed(where, e)

    async def _do_all(self, commands: list[p.Command], where: str) -> None:
        for command in commands:
            await self._do(command)

    async def _do(self, c: p.Command) -> None:
        if isinstance(c, p.SendClient):
            await self._to_client(c.text)
        elif isinstance(c, p.Emit):
            self.emit(c.event)
        elif isinstance(c, p.SendUpstream):
            await self._send_upstream(c)
        elif isinstance(c, p.StartTimer):
            old = self._timers.pop(c.key, None)
            if old is not None:
                old.cancel()
            self._timers[c.key] = self._spawn(self._timer(c.key, c.seconds))
        elif isinstance(c, p.OpenUpstream):
            self._spawn(self._open(c))
        elif isinstance(c, p.CloseUpstream):
            conn = self._conns.get(c.conn)
            if conn is not None:
                self._spawn(conn.close(c.code, c.reason), closing=True)
        elif isinstance(c, p.AbortUpstream):
            conn = self._conns.get(c.conn)
            if conn is not None:
                conn.abort()
        elif isinstance(c, p.PauseUpstream):
            conn = self._conns.get(c.conn)
            if conn is not None and conn.ws.transport is not None:
                conn.ws.transport.pause_reading()
        elif isinstance(c, p.Ping):
            conn = self._conns.get(c.conn)
            if conn is not None:
                self._spawn(self._ping(conn, c))
            else:
                self._spawn(self._input("a ping", self.protocol.ping_result, c.conn, False, c.purpose))
        elif isinstance(c, p.CloseClient):
            self._client_closed = True
            await self._close_client(c.code, c.reason)
        elif isinstance(c, p.Finished):
            self._finish()
        else:  # pragma: no cover - a command the driver does not know is a bug of ours
            raise TypeError(f"unknown command {c!r}")

    async def _send_upstream(self, c: p.SendUpstream) -> None:
        conn = self._conns.get(c.conn)
        text: str | bytes
        if c.body is not None:
            text = await in_steps(dumps_steps(c.body))  # a replay of a long chain, in steps
        else:
            assert c.text is not None
            text = c.text
        if c.recovered is not None:
            self.emit(replace(c.recovered, sent=text if isinstance(text, str) else "", size=len(text)))
        if conn is None:
            return  # it closed meanwhile: its reader reports that, and the core recovers what was on it
        try:
            await conn.ws.send(text)
        except ConnectionClosed:
            pass  # its reader reports the loss

    async def _to_client(self, message: str | bytes) -> None:
        if self.client is None:
            self._early.append(message)
            return
        try:
            await self.client.send(message)
        except ConnectionClosed:
            return  # the client reader reports the client gone
        if self.view is not None:
            self.view.sent += 1  # records made from now on go after this message in the flow

    # -- upstream connections -------------------------------------------------------------------------------------
    async def _open(self, c: p.OpenUpstream) -> HandshakeFailed | None:
        """Open connection ``c.conn`` and report it to the core; returns the refusal, if refused."""
        started = time.monotonic()
        sent = self.target.request_headers()
        url = redact_url(self.target.url)
        try:
            if c.refuse is not None:
                body = json.dumps({"error": {"type": "server_error", "code": None, "param": None,
                                             "message": f"injected by replayguard: HTTP {c.refuse}"}}).encode()
                raise HandshakeFailed(f"upstream answered HTTP {c.refuse} (injected)", c.refuse, body,
                                      "application/json")
            conn = await open_upstream(self.target, c.conn)
        except HandshakeFailed as e:
            handshake = ev.Handshake(url, c.purpose, None, False, e.status, ms_since(started), sent, error=e.detail,
                                     injected=c.refuse is not None)
            code = e.code if e.code == OVERLOADED else "upstream_unavailable"  # what a client gets when no code
            refusal = Refusal(e.detail, e.status, e.body, e.content_type, tuple(e.headers), code, c.refuse is not None)
            await self._input("a refused handshake", self.protocol.upstream_refused, c.conn, handshake, refusal)
            return e
        self._conns[c.conn] = conn
        handshake = ev.Handshake(url, c.purpose, conn.id, True, 101, ms_since(started), sent,
                                 response_headers=list(conn.response_headers()), peer=conn.peer, local=conn.local,
                                 tls=conn.tls_info(), certificate=conn.certificate())
        self._spawn(self._read(conn))
        await self._input("an opened handshake", self.protocol.upstream_opened, c.conn, handshake)
        return None

    async def _read(self, conn: Upstream) -> None:
        """Read ``conn`` until it ends, and report its end (close frame or drop)."""
        try:
            async for message in conn.ws:
                conn.last_heard = time.monotonic()
                obj: Any = p._MISSING
                if isinstance(message, str) and len(message) >= STEP and not is_delta(message):
                    obj = await in_steps(parse_steps(message))
                await self._input("the upstream reader", self.protocol.upstream_message, conn.id, message, obj)
        except ConnectionClosed:
            pass
        finally:
            self._conns.pop(conn.id, None)
            ws = conn.ws
            dropped = ws.protocol.close_rcvd is None
            code = None if dropped else ws.close_code
            await self._input("the upstream reader", self.protocol.upstream_closed, conn.id, code,
                              ws.close_reason or "", dropped)

    async def _ping(self, conn: Upstream, c: p.Ping) -> None:
        ok = await conn.ping(c.timeout)
        await self._input("a ping", self.protocol.ping_result, c.conn, ok, c.purpose)

    async def _timer(self, key: tuple[Any, ...], seconds: float) -> None:
        await CLOCK.sleep(seconds)  # a stall of our own does not count against the upstream
        if self._timers.get(key) is asyncio.current_task():
            del self._timers[key]
        await self._input(TIMERS.get(key[0], "a timer"), self.protocol.timer_expired, key)

    # -- the client ---------------------------------------------------------------------------------------------
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
                await self._input("the client keepalive", self.protocol.client_unresponsive, timeout)
                return

    async def _close_client(self, code: int, reason: str) -> None:
        if self.client is None:
            return
        try:
            await asyncio.wait_for(self.client.close(code, reason), 2)
        except Exception:
            transport = self.client.transport
            if transport is not None:
                transport.abort()

    # -- the end -----------------------------------------------------------------------------------------------
    def _finish(self) -> None:
        """The core says the session is over: timers stop, connections close, the chain stays resumable."""
        current = asyncio.current_task()
        for task in list(self._timers.values()):
            if task is not current:
                task.cancel()
        self._timers.clear()
        for conn in list(self._conns.values()):
            self._spawn(conn.close(1000, "client went away"), closing=True)
        if self.client is not None and not self._client_closed and self.client.close_code is None:
            self._spawn(self._close_client(1000, ""), closing=True)
        self._retire_chain()
        self._finished.set()
        for task in list(self._tasks - self._closers):
            if task is not current:
                task.cancel()

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

    # -- supervision -------------------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any], closing: bool = False) -> asyncio.Task[Any]:
        """Run ``coro`` as one of this session's tasks (kept, so it is not collected mid-way). ``closing``: it closes
        a connection, and finishes on its own (within 2 s) even after the session ended."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if closing:
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)
        return task

    async def _crashed(self, where: str, exc: BaseException) -> None:
        """Any exception in the session's own work ends the session, closed with an error that names the cause;
        other sessions go on."""
        if self._crashing:
            return
        self._crashing = True
        where = getattr(exc, "replayguard_where", where)  # the core names its own part (recovery)
        log.error("flow %s: replayguard internal error in %s; session failed closed", self.flow_id, where,
                  exc_info=exc)
        try:
            for command in self.protocol.crashed(where, exc):
                await self._do(command)
        except Exception:
            log.exception("flow %s: failing closed failed too; connections dropped", self.flow_id)
            for ws in (self.client, *(c.ws for c in self._conns.values())):
                if ws is not None and ws.transport is not None:
                    ws.transport.abort()
            self._finish()


async def in_steps(steps: Generator[None, None, T]) -> T:
    """Run a stepwise parse or encoding (core.messages), letting other sessions run between its steps."""
    try:
        while True:
            next(steps)
            await asyncio.sleep(0)
    except StopIteration as done:
        return done.value
