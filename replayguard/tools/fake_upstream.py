"""A faithful fake of the OpenAI Responses API over WebSocket, for tests and offline reproduction
(`python -m replayguard fake-upstream`).

What the upstream does with each message is :mod:`replayguard.tools.upstream_model`'s (the same model the in-process
protocol tests drive): lanes, the connection-local cache, store semantics, call_id validation, steering and its
automatic successors, incomplete and failed responses, errors that answer one message while other responses stream,
refused handshakes, the connection-age limit, and events the openai SDK's types accept. This module puts it on a
real WebSocket server, streams each lane's events side by side, and adds the test controls that break connections
the ways production does.

Scripted mode (:class:`Script`, for `replayguard reproduce`): each turn is answered with recorded output items,
usage and event order instead of the scripted model, and recorded failures are injected at the same turn and the
same point within it (before the first event, after N events, or while idle after the turn), handshakes included.
The connection-local cache and the call_id validation stay in force, so a reproduction meets the same checks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response
from websockets.protocol import State

from .upstream_model import (CONNECTION_LIMIT_EVENT, OUTPUT_CALLS, TERMINAL_TYPES, Connection, Model, RequestFailed,
                             response_object, usage_of, validate)
from .upstream_model import refusal as make_refusal

__all__ = ["FakeUpstream", "RequestFailed", "validate", "OUTPUT_CALLS", "Answer", "Break", "Script", "ScriptedTurn"]

logging.getLogger("websockets").setLevel(logging.WARNING)


class _Dropped(Exception):
    """The connection was cut in the middle of a response (drop_after_events)."""


class _Conn:
    def __init__(self, cid: int, ws: ServerConnection, model: Connection) -> None:
        self.id = cid
        self.ws = ws
        self.model = model  # what the upstream does with this connection's messages
        self.lock = asyncio.Lock()  # one sender at a time
        self.wake = asyncio.Event()  # something to send
        self.limit_due = False  # the age limit passed: the error and the close follow the responses in flight
        self.events = 0  # events of the response being sent (for drop/stall_after_events)

    @property
    def responses(self) -> int:
        return self.model.responses


def _owner(headers: dict[str, str], path: str) -> str:
    """Whose stored responses a connection sees: its credential, wherever it carried it."""
    for name in ("authorization", "api-key", "x-api-key", "cookie", "sec-websocket-protocol"):
        if headers.get(name):
            return f"{name}:{headers[name]}"
    return f"query:{path.partition('?')[2]}"


class FakeUpstream:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None,
                 max_size: int = 64 * 2**20, expect_name: str | None = None) -> None:
        self.host = host
        self.ssl_context = ssl_context
        self.max_size = max_size
        self.port = port
        self.model = Model(seed=secrets.randbits(16))  # response ids unique across fakes, as the upstream's are
        self.handshakes: list[dict[str, Any]] = []
        self.received: list[tuple[int, dict[str, Any]]] = []
        self.sent: list[tuple[int, dict[str, Any]]] = []
        self.close_after_responses: int | None = None
        self.mute = False  # new connections complete the handshake and then never speak
        self.max_connection_age: float | None = None  # the upstream's 60-minute limit, shortened for tests
        self.limit_errors = 0  # websocket_connection_limit_reached events sent
        self.drop_after_responses: int | None = None  # cut each connection's TCP after its Nth response
        self.blackhole_after_responses: int | None = None  # each connection goes silent after its Nth response
        self.silent_next_requests = 0
        self.turn_state_prefix = "ts"
        self.response_delay = 0.0
        self.handshake_delay = 0.0  # seconds before each handshake is answered (a slow upstream)
        self.handshakes_begun = 0  # handshake requests received (answered or not yet)
        self.delta_interval = 0.0  # seconds between text deltas (a paced stream, as a model produces tokens)
        self.stamp_deltas = False  # add "t_ns" (CLOCK_MONOTONIC at send) to deltas, for latency measurements
        self.drop_after_events: int | None = None  # one-shot: cut TCP after this many events of the next response
        self.stall_after_events: int | None = None  # one-shot: go silent after this many events of the next response
        self.script: Script | None = None  # scripted mode: recorded answers and failures, turn by turn
        # A name-checking front end (as api.openai.com's CDN): a handshake whose TLS server name or Host header
        # names another host is answered 421 Misdirected Request.
        self.expect_name = expect_name
        self._reply_deltas: int | None = None
        self._sni: dict[int, str | None] = {}  # id(SSLObject) -> the server name the client sent
        self._conns: dict[int, _Conn] = {}
        self._owners: dict[int, str] = {}  # connection id -> whose credential opened it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._next_id = 0

    @property
    def reply_deltas(self) -> int | None:
        """When set, every text reply streams exactly this many deltas (5 characters each)."""
        return self._reply_deltas

    @reply_deltas.setter
    def reply_deltas(self, value: int | None) -> None:
        self._reply_deltas = value
        self.model.reply_text = (lambda text: "tok0 " * value) if value else (lambda text: "reply to: " + text[:80])

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'wss' if self.ssl_context else 'ws'}://{self.host}:{self.port}"

    def start(self) -> "FakeUpstream":
        """Listen; an OSError of the listening socket (port in use, unknown host) is raised here, as is."""
        ready = threading.Event()
        failed: list[OSError] = []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._start())
            except OSError as e:
                failed.append(e)
                self._loop.close()
                return
            finally:
                ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="fake-upstream")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake upstream did not start")
        if failed:
            raise failed[0]
        return self

    async def _start(self) -> None:
        if self.ssl_context is not None:
            self.ssl_context.sni_callback = self._on_sni
        self._server = await serve(
            self._handler, self.host, self.port, ssl=self.ssl_context, process_request=self._process_request,
            process_response=self._process_response, ping_interval=None, max_size=self.max_size,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._loop is None or not self._loop.is_running():
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for conn in list(self._conns.values()):
                conn.ws.transport.abort()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 3)
            except asyncio.TimeoutError:
                pass

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)

    def __enter__(self) -> "FakeUpstream":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's loop and wait for it."""
        assert self._loop is not None

        async def wrapper() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(10)

    # -- controls ---------------------------------------------------------------------------------
    def close_all(self, code: int = 1011, reason: str = "keepalive ping timeout") -> None:
        async def go() -> None:
            await asyncio.gather(*(c.ws.close(code, reason) for c in list(self._conns.values())),
                                 return_exceptions=True)
        self._call(go)

    def drop_all(self) -> None:
        self._call(lambda: [c.ws.transport.abort() for c in list(self._conns.values())])

    def blackhole_all(self) -> None:
        self._call(lambda: [c.ws.transport.pause_reading() for c in list(self._conns.values())])

    def refuse_next(self, count: int, status: int = 503, body: bytes | None = None,
                    headers: list[tuple[str, str]] | None = None) -> None:
        """Refuse the next ``count`` handshakes with ``status`` (the upstream's JSON body for it, Retry-After on a
        429, unless given)."""
        with self._lock:
            self.model.refuse_next(count, status, body, headers)

    def send_connection_limit_all(self) -> None:
        async def go() -> None:
            for conn in list(self._conns.values()):
                await self._send(conn, dict(CONNECTION_LIMIT_EVENT))
                await conn.ws.close(1000, "connection limit reached")
        self._call(go)

    def send_raw_all(self, message: str | bytes) -> None:
        """Send a raw frame (garbage, truncated JSON, binary) on every open connection."""
        async def go() -> None:
            for conn in list(self._conns.values()):
                await conn.ws.send(message)
        self._call(go)

    def break_one(self, kind: str, pick: float) -> bool:
        """Break one open connection, chosen by ``pick`` in [0, 1): close (1011), drop (TCP) or blackhole."""
        async def go() -> bool:
            conns = [c for c in self._conns.values() if c.ws.state is State.OPEN]
            if not conns:
                return False
            conn = conns[min(len(conns) - 1, int(pick * len(conns)))]
            if kind == "close":
                asyncio.ensure_future(conn.ws.close(1011, "keepalive ping timeout"))
            elif kind == "drop":
                conn.ws.transport.abort()
            elif kind == "blackhole":
                conn.ws.transport.pause_reading()
            else:
                raise ValueError(kind)
            return True
        return bool(self._call(go))

    def forget_responses(self) -> None:
        """Every connection loses its cache (as when a request lands on another upstream host)."""
        self._call(lambda: [c.model.cache.clear() for c in self._conns.values()])

    def open_connections(self) -> int:
        """Connections whose WebSocket is still open (a closing handshake or a drop ends it)."""
        return sum(1 for c in list(self._conns.values()) if c.ws.state is State.OPEN)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    # -- handshake --------------------------------------------------------------------------------
    def _on_sni(self, ssl_object: Any, server_name: str | None, context: Any) -> None:
        self._sni[id(ssl_object)] = server_name

    def _peer(self, connection: ServerConnection) -> dict[str, Any]:
        """Who connected: the peer address and, over TLS, the server name it asked for."""
        info: dict[str, Any] = {"peer": tuple(connection.remote_address[:2])}
        ssl_object = connection.transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            info["sni"] = self._sni.get(id(ssl_object))
        return info

    async def _process_request(self, connection: ServerConnection, request: Any) -> Response | None:
        self.handshakes_begun += 1
        if self.handshake_delay:
            await asyncio.sleep(self.handshake_delay)
        headers = {k.lower(): v for k, v in request.headers.raw_items()}
        peer = self._peer(connection)
        if self.expect_name is not None:
            host = headers.get("host", "")
            host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host.lower() != self.expect_name or (self.ssl_context is not None and peer.get("sni") != self.expect_name):
                self.handshakes.append({"conn": None, "path": request.path, "headers": headers, "status": 421, **peer})
                body = f"misdirected: this is {self.expect_name}, not Host {host!r} / SNI {peer.get('sni')!r}\n"
                return Response(421, "Misdirected Request", Headers([("Content-Type", "text/plain"),
                                                                     ("Content-Length", str(len(body)))]), body.encode())
        with self._lock:
            refusal = self.model.handshake()
        if refusal is None and self.script is not None:
            status = self.script.handshake()
            if status is not None:
                refusal = make_refusal(status)
        if refusal is not None:
            self.handshakes.append({"conn": None, "path": request.path, "headers": headers, "status": refusal.status,
                                    **peer})
            return Response(refusal.status, HTTPStatus(refusal.status).phrase,
                            Headers([*refusal.headers, ("Content-Length", str(len(refusal.body)))]), refusal.body)
        return None

    def _process_response(self, connection: ServerConnection, request: Any, response: Response) -> None:
        with self._lock:
            self._next_id += 1
            cid = self._next_id
        connection.fake_id = cid  # type: ignore[attr-defined]
        headers = {k.lower(): v for k, v in request.headers.raw_items()}
        self._owners[cid] = _owner(headers, request.path)
        self.handshakes.append({"conn": cid, "path": request.path, "headers": headers, "status": response.status_code,
                                **self._peer(connection)})
        response.headers["x-codex-turn-state"] = headers.get("x-codex-turn-state", f"{self.turn_state_prefix}-{cid}")

    # -- messages ---------------------------------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        cid = ws.fake_id  # type: ignore[attr-defined]
        conn = _Conn(cid, ws, self.model.connect(self._owners.pop(cid, "")))
        self._conns[conn.id] = conn
        if self.mute:
            ws.transport.pause_reading()  # 101, then nothing: no events, no pongs
        pump = asyncio.ensure_future(self._pump(conn))
        limit = asyncio.ensure_future(self._age_limit(conn)) if self.max_connection_age else None
        if self.script is not None:
            asyncio.ensure_future(self._scripted_open(conn))
        try:
            async for message in ws:
                await self._on_message(conn, message)
        except ConnectionClosed:
            pass
        finally:
            self._conns.pop(conn.id, None)
            pump.cancel()
            if limit is not None:
                limit.cancel()

    async def _age_limit(self, conn: _Conn) -> None:
        """At the age limit the upstream sends websocket_connection_limit_reached and closes (after the responses
        in flight, if any)."""
        assert self.max_connection_age is not None
        await asyncio.sleep(self.max_connection_age)
        conn.limit_due = True
        conn.wake.set()

    async def _send(self, conn: _Conn, event: dict[str, Any]) -> None:
        self.sent.append((conn.id, event))
        await conn.ws.send(json.dumps(event))

    async def _pump(self, conn: _Conn) -> None:
        """Send what the model has for this connection: answers to messages first, then the lanes' responses one
        event at a time in turn (so lanes stream side by side), with the test controls applied."""
        model = conn.model
        try:
            while True:
                await conn.wake.wait()
                conn.wake.clear()
                while True:
                    lanes = model.ready()
                    if not model.immediate and not lanes:
                        break
                    for lane in lanes or [None]:
                        event = model.next_event(lane)
                        if event is not None:
                            async with conn.lock:
                                await self._emit(conn, event)
                if conn.limit_due and not model.ready():
                    async with conn.lock:
                        self.limit_errors += 1
                        await self._send(conn, model.limit_reached())
                        await conn.ws.close(1000, "connection limit reached")
                    return
        except (ConnectionClosed, _Dropped):
            return

    async def _emit(self, conn: _Conn, event: dict[str, Any]) -> None:
        """Send one event of the model's, as the test controls shape it."""
        kind = event.get("type")
        if kind == "response.created":
            conn.events = 0
            if self.response_delay:
                await asyncio.sleep(self.response_delay)
        if kind == "response.output_text.delta":
            if self.delta_interval:
                await asyncio.sleep(self.delta_interval)
            if self.stamp_deltas:
                event = dict(event, t_ns=time.monotonic_ns())
        await self._send(conn, event)
        if "sequence_number" in event and kind != "error":
            conn.events += 1
            if self.stall_after_events is not None and conn.events >= self.stall_after_events:
                self.stall_after_events = None
                conn.ws.transport.pause_reading()  # silent mid-response: no more events, no pongs
                await conn.ws.wait_closed()
                raise _Dropped()
            if self.drop_after_events is not None and conn.events >= self.drop_after_events:
                self.drop_after_events = None
                conn.ws.transport.abort()
                raise _Dropped()
        if kind in TERMINAL_TYPES:
            await self._after_response(conn)

    async def _after_response(self, conn: _Conn) -> None:
        if self.close_after_responses and conn.responses >= self.close_after_responses:
            await conn.ws.close(1011, "keepalive ping timeout")
            raise _Dropped()
        if self.drop_after_responses and conn.responses >= self.drop_after_responses:
            conn.ws.transport.abort()  # TCP cut: no close frame
            raise _Dropped()
        if self.blackhole_after_responses and conn.responses >= self.blackhole_after_responses:
            conn.ws.transport.pause_reading()  # silent: no pongs, no answers
            raise _Dropped()

    async def _on_message(self, conn: _Conn, message: str | bytes) -> None:
        obj: Any = None
        if isinstance(message, str):
            try:
                obj = json.loads(message)
            except (ValueError, RecursionError):
                obj = None
        self.received.append((conn.id, obj if isinstance(obj, dict) else
                              {"_binary": len(message)} if isinstance(message, bytes) else {"_raw": message}))
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "response.create":
            if self.silent_next_requests > 0:
                self.silent_next_requests -= 1
                conn.ws.transport.pause_reading()
                return
            if self.script is not None:
                async with conn.lock:
                    try:
                        if await self._scripted_create(conn, obj):
                            return
                    except _Dropped:
                        return
        conn.model.receive(message)
        conn.wake.set()

    # -- scripted mode ----------------------------------------------------------------------------
    async def _scripted_open(self, conn: _Conn) -> None:
        """A failure recorded right after the session's connection opened (idle after turn 0)."""
        assert self.script is not None
        key = self.script.current
        if key[1] == 0:
            turn = self.script.turns.get(key)
            if turn is not None and turn.idle and not self.script.idle_event(key).is_set():
                async with conn.lock:
                    await self._idle_breaks(conn, key, turn)

    async def _scripted_create(self, conn: _Conn, req: dict[str, Any]) -> bool:
        """Answer a response.create from the script; False when the script has nothing for it (the model answers)."""
        assert self.script is not None
        key, turn, answer = self.script.next_answer()
        if turn is None or answer is None:
            return False
        if answer.cut is not None and answer.after == 0:
            self.script.note(key, f"{answer.cut.describe()} before the first event")
            await self._break(conn, answer.cut)
            return True
        store = req.get("store", True) is not False
        previous = req.get("previous_response_id")
        model = conn.model
        try:
            context = model.context_of(req, store)
        except RequestFailed as failure:
            model.cache.clear()  # after any error the referenced response is evicted
            await self._send(conn, failure.event)
            return True
        if answer.status == "error":
            model.cache.clear()
            error = answer.error or RequestFailed(500, "server_error", "error", None, "server_error").event
            await self._send(conn, error)
            if _error_code(answer.error) == "websocket_connection_limit_reached":
                await conn.ws.close(1000, "connection limit reached")
            await self._idle_breaks(conn, key, turn)
            return True
        if self.response_delay:
            await asyncio.sleep(self.response_delay)
        rid = self.model.new_id("resp")
        output = [dict(i) for i in answer.output]
        base_response = response_object(rid, req, "in_progress", [], created_at=int(time.time()), previous=previous)
        usage = answer.usage
        if usage is None:
            usage = usage_of(len(json.dumps(context)) // 4, len(json.dumps(output)) // 4)
        status = {"completed": "completed", "response.failed": "failed", "response.incomplete": "incomplete"}.get(
            answer.status, "completed")
        final = dict(base_response, status=status, output=output, usage=usage)
        events = scripted_events(answer.events, output, base_response, final)
        # Never past the terminal event: a cut answer's client must not get its end.
        last = len(events) - (1 if events and events[-1]["type"] in TERMINAL_STATUS else 0)
        for index, event in enumerate(events):
            if answer.cut is not None and index >= max(1, min(answer.after, last)):
                self.script.note(key, f"{answer.cut.describe()} after {index} events")
                await self._break(conn, answer.cut)
                return True
            if event.get("type") in ("response.completed", "response.incomplete"):
                model.remember(rid, req, context + output)
            await self._send(conn, event)
        if answer.cut is not None:  # every recorded event of a broken-off answer was sent: now it breaks
            self.script.note(key, f"{answer.cut.describe()} after {len(events)} events")
            await self._break(conn, answer.cut)
            return True
        await self._idle_breaks(conn, key, turn)
        return True

    async def _idle_breaks(self, conn: _Conn, key: tuple[int, int], turn: "ScriptedTurn") -> None:
        """The turn is answered: the failures recorded while idle after it happen now."""
        assert self.script is not None
        done = self.script.idle_event(key)
        if done.is_set():
            return
        try:
            for brk in turn.idle:
                self.script.note(key, f"{brk.describe()} while idle")
                await self._break(conn, brk, idle=True)
        except (_Dropped, ConnectionClosed):
            pass
        finally:
            done.set()

    async def _break(self, conn: _Conn, brk: "Break", idle: bool = False) -> None:
        """Break the connection as recorded; raises _Dropped when the answer in progress must stop."""
        ws = conn.ws
        if brk.kind == "close":
            await ws.close(brk.code, brk.reason)
        elif brk.kind == "drop":
            await asyncio.sleep(0.05)  # what was sent before the cut reaches the peer, as it did when recorded
            ws.transport.abort()
        elif brk.kind == "silence":
            ws.transport.pause_reading()  # no more events, no pongs
            if not idle:
                await ws.wait_closed()
        elif brk.kind == "error":
            conn.model.cache.clear()  # after any error the referenced response is evicted
            event = brk.error or CONNECTION_LIMIT_EVENT
            await self._send(conn, event)
            if _error_code(event) == "websocket_connection_limit_reached":
                self.limit_errors += 1
                await ws.close(1000, "connection limit reached")
            return
        else:
            raise ValueError(f"unknown break kind {brk.kind!r}")
        if not idle:
            raise _Dropped()


def _error_code(event: dict[str, Any] | None) -> str | None:
    error = event.get("error") if isinstance(event, dict) else None
    return error.get("code") if isinstance(error, dict) else None


@dataclass
class Break:
    """How the upstream breaks a connection, as recorded: ``close`` (with ``code``), ``drop`` (TCP cut, no close
    frame), ``silence`` (no events, no pongs), or ``error`` (an error event; websocket_connection_limit_reached
    closes the connection after it, as the upstream does)."""

    kind: str
    code: int = 1011
    reason: str = "keepalive ping timeout"
    error: dict[str, Any] | None = None

    def describe(self) -> str:
        if self.kind == "close":
            return f"close {self.code}"
        if self.kind == "error":
            return f"error {_error_code(self.error) or 'event'}"
        return {"drop": "TCP drop", "silence": "silence"}.get(self.kind, self.kind)


@dataclass
class Answer:
    """The upstream's answer to one response.create: the recorded output items and usage in the recorded event
    order (``events``: event types; None: the usual sequence for the output), or an ``error`` event
    (``status`` "error"). With ``cut``, the answer breaks off after ``after`` events (0: before the first)."""

    status: str = "completed"  # completed | response.failed | response.incomplete | error
    output: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    events: list[str] | None = None
    error: dict[str, Any] | None = None
    after: int = 0
    cut: Break | None = None


@dataclass
class ScriptedTurn:
    """One turn of a reproduction: an answer per response.create of the turn, in order (more creates than answers
    get the last whole answer again, or the scripted model when there is none), the failures while idle after the
    turn, and each handshake made while the turn is current (None accepts, a status refuses)."""

    answers: list[Answer] = field(default_factory=list)
    idle: list[Break] = field(default_factory=list)
    handshakes: list[int | None] = field(default_factory=list)

    def answer(self, index: int) -> Answer | None:
        if index < len(self.answers):
            return self.answers[index]
        whole = [a for a in self.answers if a.cut is None]
        return whole[-1] if whole else None


class Script:
    """What the upstream does in a reproduction, keyed by (session index, turn number). The client driving the
    reproduction says which turn is current (:meth:`begin`) before it sends it: every response.create and handshake
    the fake sees until the next turn begins belongs to that turn (the proxy runs one turn at a time)."""

    def __init__(self, turns: dict[tuple[int, int], ScriptedTurn]) -> None:
        self.turns = turns
        self.current: tuple[int, int] = (0, 0)
        self.applied: list[tuple[tuple[int, int], str]] = []  # what the fake injected, for the report
        self._creates: dict[tuple[int, int], int] = {}
        self._handshakes: dict[tuple[int, int], int] = {}
        self._idle: dict[tuple[int, int], threading.Event] = {}
        self._lock = threading.Lock()

    def begin(self, session: int, turn: int) -> None:
        with self._lock:
            self.current = (session, turn)

    def next_answer(self) -> tuple[tuple[int, int], ScriptedTurn | None, Answer | None]:
        with self._lock:
            key = self.current
            index = self._creates.get(key, 0)
            self._creates[key] = index + 1
        turn = self.turns.get(key)
        return key, turn, turn.answer(index) if turn is not None else None

    def handshake(self) -> int | None:
        """The status to refuse the handshake being made with, or None to accept it."""
        with self._lock:
            key = self.current
            index = self._handshakes.get(key, 0)
            self._handshakes[key] = index + 1
        turn = self.turns.get(key)
        status = turn.handshakes[index] if turn is not None and index < len(turn.handshakes) else None
        if status is not None:
            self.note(key, f"handshake refused with HTTP {status}")
        return status

    def idle_event(self, key: tuple[int, int]) -> threading.Event:
        with self._lock:
            return self._idle.setdefault(key, threading.Event())

    def wait_idle(self, session: int, turn: int, timeout: float) -> bool:
        """Wait until the failures recorded while idle after this turn were carried out."""
        return self.idle_event((session, turn)).wait(timeout)

    def note(self, key: tuple[int, int], what: str) -> None:
        with self._lock:
            self.applied.append((key, what))
        logging.getLogger(__name__).info("fake upstream (scripted): session %d turn %d: %s", key[0] + 1, key[1], what)


# -- events rebuilt from a recorded order ------------------------------------------------------------
TERMINAL_STATUS = {"response.completed": "completed", "response.failed": "failed",
                   "response.incomplete": "incomplete"}
# Delta and done event types, and what of the item (at the current content part or summary part) they carry.
_TEXT_EVENTS: dict[str, tuple[str, bool]] = {
    "response.output_text.delta": ("content", True), "response.output_text.done": ("content", False),
    "response.refusal.delta": ("content", True), "response.refusal.done": ("content", False),
    "response.reasoning_text.delta": ("content", True), "response.reasoning_text.done": ("content", False),
    "response.function_call_arguments.delta": ("arguments", True),
    "response.function_call_arguments.done": ("arguments", False),
    "response.custom_tool_call_input.delta": ("input", True), "response.custom_tool_call_input.done": ("input", False),
    "response.reasoning_summary_text.delta": ("summary", True),
    "response.reasoning_summary_text.done": ("summary", False),
}


def usual_event_types(output: list[dict[str, Any]], terminal: str = "response.completed") -> list[str]:
    """The event sequence this fake streams for ``output`` (as the unscripted answer does)."""
    types = ["response.created", "response.in_progress"]
    for item in output:
        types.append("response.output_item.added")
        if item.get("type") == "message":
            text = _part_text(item, 0, "content")
            types += ["response.content_part.added", *["response.output_text.delta"] * len(range(0, len(text), 5)),
                      "response.output_text.done", "response.content_part.done"]
        elif item.get("type") == "function_call":
            args = str(item.get("arguments", ""))
            types += [*["response.function_call_arguments.delta"] * len(range(0, len(args), 8)),
                      "response.function_call_arguments.done"]
        types.append("response.output_item.done")
    types.append(terminal)
    return types


def _part_text(item: dict[str, Any] | None, part: int, what: str) -> str:
    if not isinstance(item, dict):
        return ""
    if what in ("arguments", "input"):
        return str(item.get(what) or "")
    parts = item.get(what)
    if isinstance(parts, str):
        return parts
    if isinstance(parts, list) and 0 <= part < len(parts) and isinstance(parts[part], dict):
        value = parts[part].get("text", parts[part].get("refusal", ""))
        return value if isinstance(value, str) else ""
    return ""


def scripted_events(types: list[str] | None, output: list[dict[str, Any]], base: dict[str, Any],
                    final: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of an answer, in the recorded order of ``types``, rebuilt from the output items: deltas carry
    the item's text split over as many deltas as were recorded, so the client gets the same items."""
    usual = types is None  # the usual sequence chunks as the unscripted answer does: 5 characters, 8 for arguments
    if types is None:
        types = usual_event_types(output, "response." + final["status"] if final["status"] != "completed"
                                  else "response.completed")

    def walk() -> Any:
        index, part, summary = -1, -1, -1
        for kind in types:
            if kind == "response.output_item.added":
                index, part, summary = index + 1, -1, -1
            elif kind == "response.content_part.added":
                part += 1
            elif kind == "response.reasoning_summary_part.added":
                summary += 1
            yield kind, index, max(part, 0), max(summary, 0)

    counts: dict[tuple[int, int, str], int] = {}
    for kind, index, part, summary in walk():
        spec = _TEXT_EVENTS.get(kind)
        if spec is not None and spec[1]:
            key = (index, summary if spec[0] == "summary" else part, spec[0])
            counts[key] = counts.get(key, 0) + 1
    sent: dict[tuple[int, int, str], int] = {}
    events: list[dict[str, Any]] = []
    for seq, (kind, index, part, summary) in enumerate(walk()):
        item = output[index] if 0 <= index < len(output) else None
        event: dict[str, Any] = {"type": kind}
        if kind in ("response.created", "response.in_progress", "response.queued"):
            event["response"] = base
        elif kind in TERMINAL_STATUS:
            event["response"] = final
        elif kind == "error":
            event.update({"status": 500, "error": {"type": "server_error", "code": "server_error",
                                                   "message": "recorded error", "param": None}})
        elif index >= 0:
            item = item or {"type": "message", "id": f"msg_{index}", "role": "assistant", "content": []}
            event["output_index"] = index
            if kind == "response.output_item.added":
                added = dict(item, status="in_progress")
                for key in ("content", "summary"):
                    if isinstance(added.get(key), list):
                        added[key] = []
                event["item"] = added
            elif kind == "response.output_item.done":
                event["item"] = item
            else:
                event["item_id"] = item.get("id")
                spec = _TEXT_EVENTS.get(kind)
                if kind.startswith("response.content_part."):
                    event["content_index"] = part
                    whole = (item.get("content") or [{}])[part] if isinstance(item.get("content"), list) and \
                        part < len(item["content"]) else {"type": "output_text", "text": "", "annotations": []}
                    event["part"] = dict(whole, text="") if kind.endswith(".added") and "text" in whole else whole
                elif kind.startswith("response.reasoning_summary_part."):
                    event["summary_index"] = summary
                    text = _part_text(item, summary, "summary")
                    event["part"] = {"type": "summary_text", "text": "" if kind.endswith(".added") else text}
                elif spec is not None:
                    what, is_delta = spec
                    at = summary if what == "summary" else part
                    if what == "summary":
                        event["summary_index"] = summary
                    elif what == "content":
                        event["content_index"] = part
                    text = _part_text(item, at, what)
                    if kind in ("response.output_text.delta", "response.output_text.done"):
                        event["logprobs"] = []
                    if is_delta:
                        key = (index, at, what)
                        n, i = counts[key], sent.get(key, 0)
                        sent[key] = i + 1
                        size = (8 if what == "arguments" else 5) if usual else -(-len(text) // n)
                        event["delta"] = text[i * size:(i + 1) * size]
                    else:
                        event["text" if what in ("content", "summary") else what] = text
        event["sequence_number"] = seq
        events.append(event)
    return events
