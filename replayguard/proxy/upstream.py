"""One upstream WebSocket connection of the addon's own: where to open it (:class:`Target`), opening it, and the
health of an open one (:class:`Upstream`)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Iterable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from ..core.redact import redact_url, scrub

log = logging.getLogger(__name__)

TURN_STATE = "x-codex-turn-state"

# Headers that belong to one hop of the handshake, never forwarded.
HOP_HEADERS = frozenset(
    {
        "host",
        "connection",
        "upgrade",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "content-length",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-accept",
        "sec-websocket-protocol",
        "user-agent",
        "date",
        "server",
    }
)

_ids = itertools.count(1)


class HandshakeFailed(Exception):
    """The upstream refused the WebSocket upgrade, or could not be reached."""

    def __init__(self, detail: str, status: int | None = None, body: bytes = b"", content_type: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.body = body
        self.content_type = content_type


@dataclass(slots=True)
class Target:
    """Where and how to open upstream connections for one client session."""

    url: str
    headers: list[tuple[str, str]]
    user_agent: str | None = None
    subprotocols: list[str] | None = None
    ssl_context: ssl.SSLContext | None = None
    connect_timeout: float = 10.0
    max_size: int = 64 * 2**20
    turn_state: str | None = None  # sticky-routing token the upstream returned; sent on reconnects

    def request_headers(self) -> list[tuple[str, str]]:
        headers = [(k, v) for k, v in self.headers if k.lower() != TURN_STATE]
        if self.turn_state is not None:
            headers.append((TURN_STATE, self.turn_state))
        return headers


@dataclass(eq=False)
class Upstream:
    """One upstream connection and what is known about its health."""

    ws: ClientConnection
    id: int = field(default_factory=lambda: next(_ids))
    opened_at: float = field(default_factory=time.monotonic)
    last_heard: float = field(default_factory=time.monotonic)
    lost: str | None = None  # why it is considered dead; None while healthy

    @property
    def alive(self) -> bool:
        return self.lost is None

    def idle_for(self) -> float:
        return time.monotonic() - self.last_heard

    def age(self) -> float:
        return time.monotonic() - self.opened_at

    async def ping(self, timeout: float) -> bool:
        """True when a pong arrives within ``timeout`` seconds."""
        try:
            waiter = await self.ws.ping()
            await asyncio.wait_for(waiter, timeout)
        except (asyncio.TimeoutError, Exception):
            return False
        self.last_heard = time.monotonic()
        return True

    def abort(self) -> None:
        """Drop the connection without a closing handshake (it is dead or silent)."""
        transport = self.ws.transport
        if transport is not None:
            transport.abort()

    async def close(self, code: int, reason: str) -> None:
        """Close with a closing handshake, or drop it when the upstream does not answer within 2 s."""
        try:
            await asyncio.wait_for(self.ws.close(code, reason), 2)
        except Exception:
            self.abort()

    def response_headers(self) -> Iterable[tuple[str, str]]:
        response = self.ws.response
        if response is None:
            return ()
        return [(k, v) for k, v in response.headers.raw_items() if k.lower() not in HOP_HEADERS]


def ms_since(started: float) -> float:
    """Milliseconds since a time.monotonic() reading, for logs and traces."""
    return round((time.monotonic() - started) * 1000, 1)


def forwardable(headers: Iterable[tuple[str, str]], drop: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Client handshake headers the upstream needs (Authorization, OpenAI-Beta, session headers, ...)."""
    skip = HOP_HEADERS | {d.lower() for d in drop}
    return [(k, v) for k, v in headers if k.lower() not in skip]


async def open_upstream(target: Target) -> Upstream:
    """Open a connection to ``target``; raise HandshakeFailed with the upstream's status when refused."""
    kwargs = {}
    if target.url.startswith("wss:"):
        kwargs["ssl"] = target.ssl_context or ssl.create_default_context()
    try:
        ws = await connect(
            target.url,
            additional_headers=target.request_headers(),
            user_agent_header=target.user_agent,
            subprotocols=target.subprotocols,  # type: ignore[arg-type]
            proxy=None,  # never follow HTTPS_PROXY: it may point back at mitmproxy itself
            open_timeout=target.connect_timeout,
            ping_interval=None,  # pings are ours: keepalive pings must not kill long turns
            close_timeout=2,
            max_size=target.max_size,
            max_queue=64,
            **kwargs,
        )
    except InvalidStatus as e:
        response = e.response
        raise HandshakeFailed(
            f"upstream answered HTTP {response.status_code}",
            response.status_code,
            bytes(response.body or b""),
            response.headers.get("Content-Type", ""),
        ) from None
    except (InvalidHandshake, OSError, asyncio.TimeoutError, EOFError) as e:
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        detail = scrub(detail.replace(target.url, redact_url(target.url)))  # the URL may carry a key
        raise HandshakeFailed(f"cannot connect to upstream: {detail}") from None
    upstream = Upstream(ws)
    state = ws.response.headers.get(TURN_STATE) if ws.response is not None else None
    if state:
        target.turn_state = state
    return upstream
