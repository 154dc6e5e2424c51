"""One upstream WebSocket connection of the addon's own: where to open it (:class:`Target`), opening it, and the
health of an open one (:class:`Upstream`)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import ssl
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidProxy, InvalidStatus, InvalidURI

from ..core.redact import redact_url, scrub
from .clock import CLOCK
from .destination import Destination, bracket_host
from .resources import is_exhaustion

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

# mitmproxy's tls_version_server_min/max names -> Python's
_TLS_VERSIONS = {"SSL3": ssl.TLSVersion.SSLv3, "TLS1": ssl.TLSVersion.TLSv1, "TLS1_1": ssl.TLSVersion.TLSv1_1,
                 "TLS1_2": ssl.TLSVersion.TLSv1_2, "TLS1_3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """mitmproxy's options for its server-side TLS, as they apply to replayguard's own upstream connections."""

    cafile: str | None = None  # ssl_verify_upstream_trusted_ca (default: certifi's bundle, as mitmproxy)
    capath: str | None = None  # ssl_verify_upstream_trusted_confdir
    insecure: bool = False  # ssl_insecure
    ciphers: str | None = None  # ciphers_server
    min_version: str = "TLS1_2"  # tls_version_server_min
    max_version: str = "UNBOUNDED"  # tls_version_server_max
    client_cert: str | None = None  # client_certs: a file, or the <server name>.pem of a directory

    def for_server(self, server_name: str | None) -> "TlsSettings":
        """The settings with ``client_certs`` resolved for one server name (mitmproxy's file-or-directory rule)."""
        path = self.client_cert
        if not path:
            return self
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            candidate = os.path.join(path, f"{server_name}.pem")
            path = candidate if server_name and os.path.isfile(candidate) else None
        return replace(self, client_cert=path)


@functools.lru_cache(maxsize=32)
def tls_context(settings: TlsSettings) -> ssl.SSLContext:
    """One client SSLContext per distinct settings, built once and shared by every connection that uses them
    (loading a CA bundle costs milliseconds of event-loop time)."""
    cafile, capath = settings.cafile, settings.capath
    if not cafile and not capath:
        try:
            import certifi

            cafile = certifi.where()
        except ImportError:  # pragma: no cover - certifi comes with mitmproxy
            pass
    context = ssl.create_default_context(cafile=cafile or None, capath=capath or None)
    if settings.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.ciphers:
        context.set_ciphers(settings.ciphers)
    if settings.min_version in _TLS_VERSIONS:
        context.minimum_version = _TLS_VERSIONS[settings.min_version]
    if settings.max_version in _TLS_VERSIONS:
        context.maximum_version = _TLS_VERSIONS[settings.max_version]
    if settings.client_cert:
        context.load_cert_chain(settings.client_cert)
    return context


class HandshakeFailed(Exception):
    """The upstream refused the WebSocket upgrade, or could not be reached."""

    def __init__(self, detail: str, status: int | None = None, body: bytes = b"", content_type: str = "",
                 code: str = "upstream_handshake_failed", headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.body = body
        self.content_type = content_type
        self.code = code  # the error code a client gets when this refuses its handshake
        self.headers = headers or []  # the upstream's response headers (Retry-After, ...)


OVERLOADED = "replayguard_out_of_descriptors"


@dataclass(slots=True)
class Target:
    """Where and how to open upstream connections for one client session."""

    destination: Destination
    headers: list[tuple[str, str]]
    user_agent: str | None = None
    subprotocols: list[str] | None = None
    ssl_context: ssl.SSLContext | None = None
    connect_timeout: float = 10.0
    max_size: int = 64 * 2**20
    turn_state: str | None = None  # sticky-routing token the upstream returned; sent on reconnects

    @property
    def url(self) -> str:
        return self.destination.url

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
        """True when a pong arrives within ``timeout`` seconds (of time our own loop was free to read it)."""
        try:
            waiter: asyncio.Future[float] = asyncio.ensure_future(await self.ws.ping())
            if not await CLOCK.wait(waiter, timeout):
                waiter.cancel()
                return False
            waiter.result()
        except Exception:
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

    @property
    def peer(self) -> tuple[str, int] | None:
        address = self.ws.transport.get_extra_info("peername") if self.ws.transport is not None else None
        return tuple(address[:2]) if address else None

    @property
    def local(self) -> tuple[str, int] | None:
        address = self.ws.transport.get_extra_info("sockname") if self.ws.transport is not None else None
        return tuple(address[:2]) if address else None

    def tls_info(self) -> dict[str, Any] | None:
        """Version, cipher and server name of the TLS session, None for plain ws://."""
        transport = self.ws.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return {"version": ssl_object.version(), "cipher": cipher[0] if cipher else None,
                "sni": ssl_object.server_hostname}

    def certificate(self) -> bytes | None:
        """The upstream's certificate (DER), for mitmweb's Connection tab."""
        transport = self.ws.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None

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


async def open_upstream(target: Target, conn_id: int | None = None) -> Upstream:
    """Open a connection to ``target``; raise HandshakeFailed with the upstream's status when refused."""
    d = target.destination
    kwargs: dict[str, Any] = {}
    if d.secure:
        kwargs["ssl"] = target.ssl_context or ssl.create_default_context()
        kwargs["server_hostname"] = d.server_name
    scheme = "wss" if d.secure else "ws"
    if d.via is not None:
        # Through the upstream proxy with CONNECT to the address mitmproxy would have asked it for.
        uri = f"{scheme}://{bracket_host(d.address[0])}:{d.address[1]}{d.path}"
        kwargs["proxy"] = d.proxy_url
        if d.via[0] == "https":
            kwargs["proxy_ssl"] = kwargs.get("ssl") or target.ssl_context or ssl.create_default_context()
    else:
        # The Host header is the client's; the TCP connection goes to the address (an IP in transparent mode).
        uri = f"{scheme}://{d.host_header}{d.path}"
        kwargs["proxy"] = None  # never follow HTTPS_PROXY: it may point back at mitmproxy itself
        kwargs["host"], kwargs["port"] = d.address
    try:
        ws = await connect(
            uri,
            additional_headers=target.request_headers(),
            user_agent_header=target.user_agent,
            subprotocols=target.subprotocols,  # type: ignore[arg-type]
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
            headers=list(response.headers.raw_items()),
        ) from None
    except OSError as e:
        if is_exhaustion(e):  # our process, not the upstream: a clean 503 the client may retry
            raise HandshakeFailed(f"replayguard is out of file descriptors ({e.strerror})", 503,
                                  code=OVERLOADED) from None
        raise _unreachable(e, uri, target) from None
    except (InvalidHandshake, InvalidURI, InvalidProxy, asyncio.TimeoutError, EOFError, ValueError) as e:
        raise _unreachable(e, uri, target) from None
    upstream = Upstream(ws) if conn_id is None else Upstream(ws, id=conn_id)
    state = ws.response.headers.get(TURN_STATE) if ws.response is not None else None
    if state:
        target.turn_state = state
    return upstream


def _unreachable(e: BaseException, uri: str, target: Target) -> HandshakeFailed:
    """The upstream could not be reached: the cause, with any credential in a URL redacted."""
    d = target.destination
    detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    for url in (uri, target.url, d.proxy_url or ""):  # a URL may carry a key, a proxy URL a password
        if url:
            detail = detail.replace(url, redact_url(url))
    if d.proxy_auth:
        detail = detail.replace(d.proxy_auth, "[redacted]")
    return HandshakeFailed(f"cannot connect to upstream: {scrub(detail)}")
