"""The loopback bridge: a WebSocket server inside the mitmproxy process that owns the client side of every
matched flow, so the client's connection can outlive any number of upstream connections.

mitmproxy relays (and records) messages between the client and this server; each connection is handed to its
:class:`~replayguard.proxy.session.Session`, found by the address mitmproxy connects from
(announced by :mod:`replayguard.proxy.routing`).
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Response

from .session import Session

log = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT = 3.0  # seconds every session together has to close when mitmproxy stops
logging.getLogger("websockets").setLevel(logging.WARNING)  # it logs every frame at DEBUG otherwise

def limit_message_size(ws: ServerConnection, size: int) -> None:
    """Per-connection cap on incoming messages (websockets >= 16 calls it max_message_size, older max_size)."""
    protocol: Any = ws.protocol
    if hasattr(protocol, "max_message_size"):
        protocol.max_message_size = size
    else:
        protocol.max_size = size


class Bridge:
    """The loopback WebSocket server mitmproxy's matched flows are pointed at.

    An incoming connection is handed to the session the router announced for the address it comes from
    (mitmproxy's own socket for that flow); anything else is refused.

    The loopback hop does not compress: mitmproxy would inflate and deflate every message on both of its legs and
    the bridge again, and each compressing connection holds zlib state (hundreds of KiB a session). The client's
    leg follows, since mitmproxy negotiates end to end. ``client.compression`` in rules.yaml turns it back on (a
    client on another machine), through a second listener that offers permessage-deflate.
    """

    def __init__(self) -> None:
        self._servers: dict[bool, Server] = {}  # compression -> listener
        self._starting: asyncio.Lock | None = None
        self.ports: dict[bool, int] = {}
        self.expected: dict[tuple[str, int], Session] = {}  # mitmproxy's address -> the session it brings
        self.active: set[Session] = set()

    def is_bridge(self, address: Any) -> bool:
        return address is not None and address[0] == "127.0.0.1" and address[1] in self.ports.values()

    async def ensure_started(self, compression: bool = False) -> int:
        """The port of the listener with or without compression (started the first time it is needed)."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if compression not in self._servers:
                server = await serve(
                    self._handler,
                    "127.0.0.1",
                    0,
                    process_request=self._process_request,
                    process_response=self._process_response,
                    select_subprotocol=self._select_subprotocol,
                    ping_interval=None,
                    max_size=None,  # per session, set in the handler
                    max_queue=64,
                    compression="deflate" if compression else None,
                )
                self._servers[compression] = server
                self.ports[compression] = server.sockets[0].getsockname()[1]
                log.debug("replayguard bridge listening on 127.0.0.1:%d (compression %s)", self.ports[compression],
                          "on" if compression else "off")
        return self.ports[compression]

    def expect(self, address: tuple[str, int], session: Session) -> None:
        """mitmproxy is connecting from ``address`` for ``session`` (its request follows)."""
        self.expected[(address[0], address[1])] = session

    def discard(self, session: Session) -> None:
        """The session's flow will never reach (or stay on) the bridge: forget it and close it."""
        for address, expected in list(self.expected.items()):
            if expected is session:
                del self.expected[address]
        if session not in self.active:
            asyncio.ensure_future(session.close())

    def _session(self, connection: ServerConnection) -> Session | None:
        return self.expected.get(connection.remote_address[:2])

    async def _process_request(self, connection: ServerConnection, request: Any) -> Any:
        session = self._session(connection)
        if session is None:
            return connection.respond(HTTPStatus.FORBIDDEN, "unknown replayguard session\n")
        refusal = await session.opening if session.opening is not None else None
        if refusal is not None:  # the upstream refused, or could not be reached: the client gets that instead
            headers = Headers([(k, v) for k, v in refusal.headers.items(multi=True)
                               if k.lower() not in ("content-length", "transfer-encoding", "connection")])
            headers["Content-Length"] = str(len(refusal.content or b""))
            return Response(refusal.status_code, refusal.reason or HTTPStatus(refusal.status_code).phrase, headers,
                            refusal.content or b"")
        return None

    def _process_response(self, connection: ServerConnection, request: Any, response: Any) -> None:
        session = self._session(connection)
        if session is None or session.upstream is None:
            return
        # Hand the upstream's handshake headers (x-codex-turn-state, request ids, ...) to the client.
        for name, value in session.upstream.response_headers():
            response.headers[name] = value

    def _select_subprotocol(self, connection: ServerConnection, subprotocols: Any) -> Any:
        session = self._session(connection)
        if session is None or session.upstream is None:
            return None
        return session.upstream.ws.subprotocol

    async def _handler(self, ws: ServerConnection) -> None:
        session = self.expected.pop(ws.remote_address[:2], None)
        if session is None:
            await ws.close(1008, "unknown replayguard session")
            return
        limit_message_size(ws, session.target.max_size)
        self.active.add(session)
        try:
            await session.run(ws)
        finally:
            self.active.discard(session)

    async def stop(self, timeout: float = SHUTDOWN_TIMEOUT, reloading: bool = False) -> None:
        """Stop accepting, and shut every session down at once (a silent upstream must not hold the others up)."""
        for session in list(self.expected.values()):
            self.discard(session)
        for server in self._servers.values():
            server.close(close_connections=False)  # the sessions close their clients themselves
        tasks = [asyncio.ensure_future(session.shutdown(reloading)) for session in list(self.active)]
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("replayguard: %d session(s) did not close within %gs at shutdown", len(pending), timeout)
        for server in self._servers.values():
            try:
                await asyncio.wait_for(server.wait_closed(), 1)
            except asyncio.TimeoutError:
                pass
        self._servers.clear()
        self.ports.clear()
