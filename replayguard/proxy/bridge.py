"""The loopback bridge: a WebSocket server inside the mitmproxy process that owns the client side of every
matched flow, so the client's connection can outlive any number of upstream connections.

mitmproxy relays (and records) messages between the client and this server; each connection is handed to its
:class:`~replayguard.proxy.session.Session`, found by the routing token the addon put on the request.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve

from .session import Session

log = logging.getLogger(__name__)
logging.getLogger("websockets").setLevel(logging.WARNING)  # it logs every frame at DEBUG otherwise

TOKEN_HEADER = "x-replayguard-session"
PENDING_TTL = 30.0  # seconds a registered session waits for mitmproxy to connect to the bridge

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
