"""A faithful fake of the OpenAI Responses API over WebSocket, for tests and offline reproduction
(`python -m replayguard fake-upstream`).

What it models (see ../shared/notes/responses-websocket.md): a connection-local cache holding only the last
response of each connection, store=true responses kept server-wide, previous_response_not_found (and eviction
after any error), the call_id validation ("No tool call found ...", "No tool output found ..."), item references
under store=false, generate:false warm-ups, and the real event sequence with sequence_number. A scripted model
answers deterministically. Test controls break connections the ways production does.

Scripted mode (:class:`Script`, for `replayguard reproduce`): each turn is answered with recorded output items,
usage and event order instead of the scripted model, and recorded failures are injected at the same turn and the
same point within it (before the first event, after N events, or while idle after the turn), handshakes included.
The connection-local cache and the call_id validation stay in force, so a reproduction meets the same checks.
"""

from __future__ import annotations

import asyncio
import itertools
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

logging.getLogger("websockets").setLevel(logging.WARNING)

OUTPUT_CALLS = {
    "function_call_output": ("function_call", "local_shell_call"),
    "custom_tool_call_output": ("custom_tool_call",),
    "tool_search_output": ("tool_search_call",),
    "computer_call_output": ("computer_call",),
}
NEEDS_OUTPUT = ("function_call", "custom_tool_call", "local_shell_call")


CONNECTION_LIMIT_EVENT = {"type": "error", "status": 400, "error": {
    "type": "invalid_request_error", "code": "websocket_connection_limit_reached",
    "message": "Responses websocket connection limit reached (60 minutes). Create a new websocket connection to "
               "continue.", "param": None}}


class RequestFailed(Exception):
    def __init__(self, status: int, code: str | None, message: str, param: str | None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.event = {"type": "error", "status": status,
                      "error": {"type": type_, "code": code, "message": message, "param": param}}


def _text(item: dict[str, Any]) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def validate(context: list[Any], store: bool) -> None:
    """The upstream's input validation, in the order it reports problems."""
    calls: set[str] = set()
    approvals: set[str] = set()
    for index, item in enumerate(context):
        if not isinstance(item, dict):
            raise RequestFailed(400, None, "Invalid input item.", "input")
        kind = item.get("type")
        for key in ("type", "call_id"):
            if key in item and not isinstance(item[key], str):
                got = {dict: "an object", list: "an array"}.get(type(item[key]), type(item[key]).__name__)
                raise RequestFailed(400, "invalid_type", f"Invalid type for 'input[{index}].{key}': expected a string, "
                                    f"but got {got} instead.", f"input[{index}].{key}")
        if kind == "item_reference" or (set(item) <= {"id", "type"} and "id" in item):
            if not store:
                raise RequestFailed(400, None, f"Item with id '{item.get('id')}' not found. Items are not persisted "
                                    "when store is false.", "input")
        if kind in ("function_call", "custom_tool_call", "local_shell_call", "tool_search_call", "computer_call"):
            calls.add(f"{kind}:{item.get('call_id')}")
        elif kind == "mcp_approval_request":
            approvals.add(str(item.get("id")))
        elif kind in OUTPUT_CALLS:
            if not any(f"{c}:{item.get('call_id')}" in calls for c in OUTPUT_CALLS[kind]):
                raise RequestFailed(400, None, "No tool call found for function call output with call_id "
                                    f"{item.get('call_id')}.", "input")
        elif kind == "mcp_approval_response" and str(item.get("approval_request_id")) not in approvals:
            raise RequestFailed(400, None, "No approval request found for approval_request_id "
                                f"{item.get('approval_request_id')}.", "input")
    answered = {i.get("call_id") for i in context if isinstance(i, dict) and i.get("type") in OUTPUT_CALLS}
    for item in context:
        if isinstance(item, dict) and item.get("type") in NEEDS_OUTPUT and item.get("call_id") not in answered:
            raise RequestFailed(400, None, f"No tool output found for function call {item.get('call_id')}.", "input")


class _Dropped(Exception):
    """The connection was cut in the middle of a response (drop_after_events)."""


class _Conn:
    def __init__(self, cid: int, ws: ServerConnection) -> None:
        self.id = cid
        self.ws = ws
        self.cache: dict[str, list[Any]] = {}  # only the last response of this connection
        self.responses = 0
        self.lock = asyncio.Lock()


class FakeUpstream:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None,
                 max_size: int = 64 * 2**20, expect_name: str | None = None) -> None:
        self.host = host
        self.ssl_context = ssl_context
        self.max_size = max_size
        self.port = port
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
        self.reply_deltas: int | None = None  # when set, every text reply streams exactly this many deltas
        self.delta_interval = 0.0  # seconds between text deltas (a paced stream, as a model produces tokens)
        self.stamp_deltas = False  # add "t_ns" (CLOCK_MONOTONIC at send) to deltas, for latency measurements
        self.drop_after_events: int | None = None  # one-shot: cut TCP after this many events of the next response
        self.stall_after_events: int | None = None  # one-shot: go silent after this many events of the next response
        self.script: Script | None = None  # scripted mode: recorded answers and failures, turn by turn
        # A name-checking front end (as api.openai.com's CDN): a handshake whose TLS server name or Host header
        # names another host is answered 421 Misdirected Request.
        self.expect_name = expect_name
        self._sni: dict[int, str | None] = {}  # id(SSLObject) -> the server name the client sent
        self._refuse: list[tuple[int, bytes | None]] = []
        self._stored: dict[str, list[Any]] = {}  # store=true responses, server-wide
        self._tokens: dict[str, int] = {}  # response id -> tokens of its full context and output
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._calls = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

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

    def refuse_next(self, count: int, status: int = 503, body: bytes | None = None) -> None:
        with self._lock:
            self._refuse.extend([(status, body)] * count)

    def send_connection_limit_all(self) -> None:
        async def go() -> None:
            for conn in list(self._conns.values()):
                await self._send(conn, CONNECTION_LIMIT_EVENT)
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
        self._call(lambda: [c.cache.clear() for c in self._conns.values()])

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
            refusal = self._refuse.pop(0) if self._refuse else None
        if refusal is None and self.script is not None:
            status = self.script.handshake()
            refusal = (status, None) if status is not None else None
        if refusal is not None:
            status, body = refusal
            if body is None:
                body = json.dumps({"error": {"type": "server_error", "code": None,
                                             "message": f"fake upstream refused with {status}", "param": None}}).encode()
            self.handshakes.append({"conn": None, "path": request.path, "headers": headers, "status": status, **peer})
            return Response(status, HTTPStatus(status).phrase,
                            Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))]), body)
        return None

    def _process_response(self, connection: ServerConnection, request: Any, response: Response) -> None:
        cid = next(self._ids)
        connection.fake_id = cid  # type: ignore[attr-defined]
        headers = {k.lower(): v for k, v in request.headers.raw_items()}
        self.handshakes.append({"conn": cid, "path": request.path, "headers": headers, "status": response.status_code,
                                **self._peer(connection)})
        response.headers["x-codex-turn-state"] = headers.get("x-codex-turn-state", f"{self.turn_state_prefix}-{cid}")

    # -- messages ---------------------------------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        conn = _Conn(ws.fake_id, ws)  # type: ignore[attr-defined]
        self._conns[conn.id] = conn
        if self.mute:
            ws.transport.pause_reading()  # 101, then nothing: no events, no pongs
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
            if limit is not None:
                limit.cancel()

    async def _age_limit(self, conn: _Conn) -> None:
        """At the age limit the upstream sends websocket_connection_limit_reached and closes (after the response
        in flight, if any)."""
        assert self.max_connection_age is not None
        await asyncio.sleep(self.max_connection_age)
        async with conn.lock:
            self.limit_errors += 1
            try:
                await self._send(conn, CONNECTION_LIMIT_EVENT)
                await conn.ws.close(1000, "connection limit reached")
            except ConnectionClosed:
                pass

    async def _send(self, conn: _Conn, event: dict[str, Any]) -> None:
        self.sent.append((conn.id, event))
        await conn.ws.send(json.dumps(event))
        if self.stall_after_events is not None and "sequence_number" in event:
            if event["sequence_number"] + 1 >= self.stall_after_events:
                self.stall_after_events = None
                conn.ws.transport.pause_reading()  # silent mid-response: no more events, no pongs
                await conn.ws.wait_closed()
                raise _Dropped()
        if self.drop_after_events is not None and "sequence_number" in event:
            if event["sequence_number"] + 1 >= self.drop_after_events:
                self.drop_after_events = None
                conn.ws.transport.abort()
                raise _Dropped()

    async def _error(self, conn: _Conn, failure: RequestFailed) -> None:
        conn.cache.clear()  # after any 4xx/5xx the referenced response is evicted
        await self._send(conn, failure.event)

    async def _on_message(self, conn: _Conn, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self.received.append((conn.id, {"_binary": len(message)}))
            await self._error(conn, RequestFailed(400, None, "Binary frames are not supported.", None))
            return
        try:
            obj = json.loads(message)
        except (ValueError, RecursionError):  # the upstream answers too-deep JSON as invalid, too
            self.received.append((conn.id, {"_raw": message}))
            await self._error(conn, RequestFailed(400, None, "Invalid JSON.", None))
            return
        self.received.append((conn.id, obj))
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "response.create":
            if self.silent_next_requests > 0:
                self.silent_next_requests -= 1
                conn.ws.transport.pause_reading()
                return
            async with conn.lock:
                try:
                    await self._create(conn, obj)
                except _Dropped:
                    return
            if self.close_after_responses and conn.responses >= self.close_after_responses:
                await conn.ws.close(1011, "keepalive ping timeout")
            elif self.drop_after_responses and conn.responses >= self.drop_after_responses:
                conn.ws.transport.abort()  # TCP cut: no close frame
            elif self.blackhole_after_responses and conn.responses >= self.blackhole_after_responses:
                conn.ws.transport.pause_reading()  # silent: no pongs, no answers
        elif kind in ("response.processed",):
            return
        else:
            await self._error(conn, RequestFailed(400, "unknown_event_type", f"Unknown event type: {kind!r}.", "type"))

    def _context(self, conn: _Conn, req: dict[str, Any], store: bool) -> tuple[list[Any], list[Any]]:
        """The request's input items and the whole context the upstream sees for it (raises RequestFailed as the
        upstream answers: an unreadable input, an unknown previous_response_id, a broken call pairing)."""
        raw_input = req.get("input", [])
        items = [{"type": "message", "role": "user", "content": raw_input}] if isinstance(raw_input, str) else raw_input
        if not isinstance(items, list):
            raise RequestFailed(400, None, "Invalid type for 'input'.", "input")
        previous = req.get("previous_response_id")
        context: list[Any] = []
        if previous:
            base = conn.cache.get(previous, self._stored.get(previous))
            if base is None:
                raise RequestFailed(400, "previous_response_not_found",
                                    f"Previous response with id '{previous}' not found.", "previous_response_id")
            context = list(base)
        context += items
        validate(context, store)
        return items, context

    async def _create(self, conn: _Conn, req: dict[str, Any]) -> None:
        if self.script is not None and await self._scripted_create(conn, req):
            return
        store = req.get("store", True) is not False
        previous = req.get("previous_response_id")
        try:
            items, context = self._context(conn, req, store)
        except RequestFailed as failure:
            await self._error(conn, failure)
            return
        if self.response_delay:
            await asyncio.sleep(self.response_delay)
        rid = "resp_" + secrets.token_hex(8)
        output = self._model(context, req) if req.get("generate", True) is not False else []
        seq = itertools.count()
        base_response = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
                         "model": req.get("model"), "output": [], "store": store,
                         "previous_response_id": previous}
        await self._send(conn, {"type": "response.created", "response": base_response, "sequence_number": next(seq)})
        await self._send(conn, {"type": "response.in_progress", "response": base_response, "sequence_number": next(seq)})
        for index, item in enumerate(output):
            await self._stream_item(conn, index, item, seq)
        # Token counts grow with the chain: counted incrementally, so a long chain costs the fake O(1) per turn.
        base_tokens = self._tokens.get(previous, 0) if previous else 0
        new_tokens = (len(json.dumps(items)) if previous else len(json.dumps(context))) // 4
        usage = {"input_tokens": base_tokens + new_tokens, "output_tokens": len(json.dumps(output)) // 4}
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        final = dict(base_response, status="completed", output=output, usage=usage)
        full = context + output
        conn.cache.clear()
        conn.cache[rid] = full
        if store:
            self._stored[rid] = full
        self._tokens[rid] = usage["input_tokens"] + usage["output_tokens"]
        conn.responses += 1
        await self._send(conn, {"type": "response.completed", "response": final, "sequence_number": next(seq)})

    async def _stream_item(self, conn: _Conn, index: int, item: dict[str, Any], seq: Any) -> None:
        added = dict(item, status="in_progress")
        if item["type"] == "message":
            added["content"] = []
        await self._send(conn, {"type": "response.output_item.added", "output_index": index, "item": added,
                                "sequence_number": next(seq)})
        if item["type"] == "message":
            text = item["content"][0]["text"]
            part = {"type": "output_text", "text": "", "annotations": []}
            common = {"item_id": item["id"], "output_index": index, "content_index": 0}
            await self._send(conn, {"type": "response.content_part.added", **common, "part": part,
                                    "sequence_number": next(seq)})
            for i in range(0, len(text), 5):
                delta = {"type": "response.output_text.delta", **common, "delta": text[i:i + 5],
                         "sequence_number": next(seq)}
                if self.delta_interval:
                    await asyncio.sleep(self.delta_interval)
                if self.stamp_deltas:
                    delta["t_ns"] = time.monotonic_ns()
                await self._send(conn, delta)
            await self._send(conn, {"type": "response.output_text.done", **common, "text": text,
                                    "sequence_number": next(seq)})
            await self._send(conn, {"type": "response.content_part.done", **common, "part": item["content"][0],
                                    "sequence_number": next(seq)})
        elif item["type"] == "function_call":
            args = item["arguments"]
            for i in range(0, len(args), 8):
                await self._send(conn, {"type": "response.function_call_arguments.delta", "item_id": item["id"],
                                        "output_index": index, "delta": args[i:i + 8], "sequence_number": next(seq)})
            await self._send(conn, {"type": "response.function_call_arguments.done", "item_id": item["id"],
                                    "output_index": index, "arguments": args, "sequence_number": next(seq)})
        await self._send(conn, {"type": "response.output_item.done", "output_index": index, "item": item,
                                "sequence_number": next(seq)})

    def _model(self, context: list[Any], req: dict[str, Any]) -> list[dict[str, Any]]:
        """A deterministic script standing in for the model."""
        out: list[dict[str, Any]] = []
        if "reasoning.encrypted_content" in (req.get("include") or []):
            out.append({"type": "reasoning", "id": "rs_" + secrets.token_hex(6), "summary": [],
                        "encrypted_content": "enc_" + secrets.token_hex(12)})
        last = context[-1] if context else {}
        if isinstance(last, dict) and last.get("type") in OUTPUT_CALLS:
            outputs = []
            for item in reversed(context):
                if not (isinstance(item, dict) and item.get("type") in OUTPUT_CALLS):
                    break
                outputs.append(str(item.get("output")))
            out.append(self._message("tool said: " + "; ".join(reversed(outputs))))
            return out
        text = _text(last) if isinstance(last, dict) and last.get("type", "message") == "message" else ""
        if "TOOL2" in text:
            out += [self._tool_call("echo a"), self._tool_call("echo b")]
        elif "TOOL" in text:
            out.append(self._tool_call("ls" if " ls" in text else "echo a"))
        else:
            if self.reply_deltas:
                out.append(self._message("tok0 " * self.reply_deltas))  # 5 chars per delta
            else:
                out.append(self._message("reply to: " + text[:80]))  # bounded: a huge input is not echoed back
        return out

    def _tool_call(self, cmd: str) -> dict[str, Any]:
        return {"type": "function_call", "id": "fc_" + secrets.token_hex(6), "call_id": f"call_{next(self._calls)}",
                "name": "exec_command", "arguments": json.dumps({"cmd": cmd}), "status": "completed"}

    @staticmethod
    def _message(text: str) -> dict[str, Any]:
        return {"type": "message", "id": "msg_" + secrets.token_hex(6), "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}

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
        try:
            items, context = self._context(conn, req, store)
        except RequestFailed as failure:
            await self._error(conn, failure)
            return True
        if answer.status == "error":
            conn.cache.clear()
            error = answer.error or RequestFailed(500, "server_error", "error", None, "server_error").event
            await self._send(conn, error)
            if _error_code(answer.error) == "websocket_connection_limit_reached":
                await conn.ws.close(1000, "connection limit reached")
            await self._idle_breaks(conn, key, turn)
            return True
        if self.response_delay:
            await asyncio.sleep(self.response_delay)
        rid = "resp_" + secrets.token_hex(8)
        output = [dict(i) for i in answer.output]
        base_response = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
                         "model": req.get("model"), "output": [], "store": store, "previous_response_id": previous}
        usage = answer.usage
        if usage is None:
            usage = {"input_tokens": len(json.dumps(context)) // 4, "output_tokens": len(json.dumps(output)) // 4}
            usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
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
            if event.get("type") == "response.completed":
                full = context + output
                conn.cache.clear()
                conn.cache[rid] = full
                if store:
                    self._stored[rid] = full
                conn.responses += 1
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
            conn.cache.clear()  # after any error the referenced response is evicted
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
