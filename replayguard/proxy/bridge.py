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
    """

    def __init__(self) -> None:
        self._server: Server | None = None
        self._starting: asyncio.Lock | None = None
        self.port: int = 0
        self.expected: dict[tuple[str, int], Session] = {}  # mitmproxy's address -> the session it brings
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

    def expect(self, address: tuple[str, int], session: Session) -> None:
        """mitmproxy is connecting from ``address`` for ``session`` (its request follows)."""
        self.expected[tuple(address[:2])] = session  # type: ignore[assignment]

    def discard(self, session: Session) -> None:
        """The session's flow will never reach (or stay on) the bridge: forget it and close it."""
        for address, expected in list(self.expected.items()):
            if expected is session:
                del self.expected[address]
        if session not in self.active:
            asyncio.ensure_future(session.close())

    def _session(self, connection: ServerConnection) -> Session | None:
        return self.expected.get(connection.remote_address[:2])

    def _process_request(self, connection: ServerConnection, request: Any) -> Any:
        if self._session(connection) is None:
            return connection.respond(HTTPStatus.FORBIDDEN, "unknown replayguard session\n")
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

    async def stop(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Stop accepting, and shut every session down at once (a silent upstream must not hold the others up)."""
        for session in list(self.expected.values()):
            self.discard(session)
        if self._server is not None:
            self._server.close(close_connections=False)  # the sessions close their clients themselves
        tasks = [asyncio.ensure_future(session.shutdown()) for session in list(self.active)]
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("replayguard: %d session(s) did not close within %gs at shutdown", len(pending), timeout)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1)
            except asyncio.TimeoutError:
                pass
            self._server = None
