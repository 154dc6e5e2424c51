"""How a matched flow reaches its session.

:class:`Router` is added at the end of mitmproxy's addon chain, so its ``request`` hook runs after every other
addon's (map_remote, modify_headers, other scripts, intercept) and, for a flow held by intercept, only once the
flow is resumed. There it opens the session's first upstream connection where mitmproxy's own would have gone
(:mod:`replayguard.proxy.destination`) and points the request at the loopback bridge, without touching its
headers. mitmproxy then connects to the bridge directly (never through an upstream proxy); at ``server_connect``
the request is given back what the client addressed, so the flow never shows the bridge, and at
``server_connected`` the bridge learns which of its incoming connections belongs to which session: by the address
mitmproxy connects from, so no routing token travels in the request.

Every per-flow entry is freed on every path: the WebSocket ending, a non-101 answer, a flow error or kill, a
client gone.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from mitmproxy import ctx, hooks, http
from mitmproxy.connection import Server

from .bridge import Bridge
from .destination import Destination, destination_of
from .live import Live, Match
from .session import Session


class Guard(Protocol):
    """What the router needs of the addon: which flows matched, and making and opening their sessions."""

    matched: dict[str, Match]
    flows: dict[str, Live]
    bridge: Bridge

    def new_session(self, flow: http.HTTPFlow, match: Match, destination: Destination) -> Session: ...

    async def open_session(self, session: Session, flow: http.HTTPFlow) -> http.Response | None: ...

    def internal_error(self, flow: http.HTTPFlow, where: str, exc: BaseException,
                       answer: bool = True) -> http.Response: ...

log = logging.getLogger(__name__)

STALE_ROUTE = 120.0  # seconds a route may wait for mitmproxy to reach the bridge before it is freed anyway


@dataclass(eq=False)
class Route:
    flow: http.HTTPFlow
    session: Session
    scheme: bytes  # what the request addressed, given back once mitmproxy connects to the bridge
    host: str
    port: int
    restored: bool = False
    timer: asyncio.TimerHandle | None = None

    def restore(self) -> None:
        if not self.restored:
            self.restored = True
            data = self.flow.request.data
            data.scheme, data.host, data.port = self.scheme, self.host, self.port


class Router:
    """The tail addon: runs last, points matched flows at the bridge, and keeps the flow showing the upstream."""

    name = "replayguard-router"  # unique in mitmproxy's addon registry

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.routes: dict[str, Route] = {}  # client connection id -> the flow being routed on it

    # -- installing -------------------------------------------------------------------------------
    def install(self) -> None:
        addons = ctx.master.addons
        stale = addons.get(self.name)
        if stale is not None:  # left over from a script that failed to unload
            addons.remove(stale)
        addons.add(self)

    def ensure_last(self) -> None:
        addons = ctx.master.addons
        if addons.chain and addons.chain[-1] is not self and self in addons.chain:
            addons.chain = [a for a in addons.chain if a is not self] + [self]  # rebound: it may be iterated

    def uninstall(self) -> None:
        addons = ctx.master.addons
        if addons.get(self.name) is self:
            addons.remove(self)

    def done(self) -> None:  # called again by mitmproxy's own done round at shutdown: idempotent
        for route in list(self.routes.values()):
            self._drop(route)

    # -- hooks ------------------------------------------------------------------------------------
    async def request(self, flow: http.HTTPFlow) -> None:
        match = self.guard.matched.pop(flow.id, None)
        if match is None:
            return
        if flow.intercepted:
            # Intercepted by an addon before us: mitmweb learns it only when this hook round ends, so tell it now,
            # then wait until the user resumes (or kills) the flow; what they edited applies to the session.
            await ctx.master.addons.trigger_event(hooks.UpdateHook([flow]))
            await _resumed(flow)
        if flow.response is not None or flow.error is not None or not flow.live:
            return  # answered, killed or gone: nothing to route
        try:
            await self._route(flow, match)
        except Exception as e:  # never let a matched upgrade through unguarded on our own bug
            self.guard.internal_error(flow, "routing the flow", e)

    async def _route(self, flow: http.HTTPFlow, match: Match) -> None:
        session = self.guard.new_session(flow, match, destination_of(flow, ctx.options.upstream_auth))
        try:
            port = await self.guard.bridge.ensure_started(match.rules.client.compression)
        except BaseException:
            self.guard.bridge.discard(session)
            self.guard.flows.pop(flow.id, None)
            raise
        # The upstream handshake runs while mitmproxy reaches the bridge; the bridge answers the client's upgrade
        # when it is done: the 101, or the refusal in its place.
        session.opening = asyncio.ensure_future(self.guard.open_session(session, flow))
        request = flow.request.data
        route = Route(flow, session, request.scheme, request.host, request.port)
        route.timer = asyncio.get_running_loop().call_later(STALE_ROUTE, self._expire, route)
        self.routes[flow.client_conn.id] = route
        # Point the request at the bridge without touching its headers, and reach the bridge directly: a fresh
        # server spec without the upstream proxy of upstream mode (mitmproxy replaces flow.server_conn anyway).
        request.scheme, request.host, request.port = b"http", "127.0.0.1", port
        flow.server_conn = Server(address=None)

    def server_connect(self, data: Any) -> None:
        route = self.routes.get(data.client.id)
        if route is not None and self.guard.bridge.is_bridge(data.server.address):
            route.restore()  # before the request is written: the flow shows what the client addressed

    def server_connected(self, data: Any) -> None:
        route = self.routes.get(data.client.id)
        if route is not None and self.guard.bridge.is_bridge(data.server.address):
            # mitmproxy writes the request only after this hook: the bridge is told first who is coming.
            self.guard.bridge.expect(data.server.sockname, route.session)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        route = self._route_of(flow)
        if route is not None:
            route.restore()

    def response(self, flow: http.HTTPFlow) -> None:
        route = self._route_of(flow)
        if route is None:
            return
        route.restore()
        self._forget(route)
        if flow.response is not None and flow.response.status_code != 101:
            log.warning("flow %s: the bridge answered HTTP %d; session closed", flow.id, flow.response.status_code)
            self._drop(route)

    def error(self, flow: http.HTTPFlow) -> None:
        route = self._route_of(flow)
        if route is not None:
            route.restore()
            self._forget(route)
            self._drop(route)

    # -- helpers ----------------------------------------------------------------------------------
    def _route_of(self, flow: http.HTTPFlow) -> Route | None:
        route = self.routes.get(flow.client_conn.id)
        return route if route is not None and route.flow is flow else None

    def _forget(self, route: Route) -> None:
        if self.routes.get(route.flow.client_conn.id) is route:
            del self.routes[route.flow.client_conn.id]
        if route.timer is not None:
            route.timer.cancel()

    def _drop(self, route: Route) -> None:
        """The flow will never become this session's WebSocket: free everything it holds."""
        self._forget(route)
        self.guard.bridge.discard(route.session)
        self.guard.flows.pop(route.flow.id, None)

    def _expire(self, route: Route) -> None:
        if self.routes.get(route.flow.client_conn.id) is route:
            log.warning("flow %s: mitmproxy never reached the bridge within %gs; session closed", route.flow.id,
                        STALE_ROUTE)
            route.restore()
            self._drop(route)


async def _resumed(flow: http.HTTPFlow) -> None:
    """Wait until an intercepted flow is resumed or killed (a kill does not wake wait_for_resume, mitmproxy#8045)."""
    waiter = asyncio.ensure_future(flow.wait_for_resume())
    try:
        while not waiter.done() and flow.intercepted:
            await asyncio.wait([waiter], timeout=0.1)
    finally:
        waiter.cancel()
