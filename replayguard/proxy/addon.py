"""The mitmproxy addon: matches Responses WebSocket upgrades and hands them to the bridge."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.exceptions import OptionsError
from mitmproxy.hooks import UpdateHook

from ..core.chain import ChainStore
from ..core.errors import http_error_body
from ..core.events import Listener
from ..core.faults import FaultInjector
from ..core.redact import redact_url, scrub
from .bridge import TOKEN_HEADER, Bridge
from .reporting import FlowNotes, SessionLog
from .rules import DEFAULT_RULES, Rules, RulesError, load_rules
from .session import Session
from .tracing import SessionTrace, TraceWriter
from .upstream import HandshakeFailed, Target, forwardable

log = logging.getLogger(__name__)

RULES_POLL_SECONDS = 1.0
MARK_RECOVERED = ":recycle:"
MARK_FAILED = ":no_entry:"
MARK_FAULT = ":zap:"


def is_websocket_upgrade(request: http.Request) -> bool:
    return request.headers.get("upgrade", "").lower() == "websocket"


def upstream_url(request: http.Request) -> str:
    scheme = "wss" if request.scheme == "https" else "ws"
    host = request.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{request.port}{request.path}"


class ReplayGuard:
    """Keeps Responses WebSocket conversations alive across upstream connection failures."""

    def __init__(self) -> None:
        self.rules: Rules | None = None
        self.store = ChainStore()
        self.bridge = Bridge()
        self.flows: dict[str, http.HTTPFlow] = {}
        self.trace: TraceWriter | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._rules_seen: tuple[int, int] | None = None  # (mtime_ns, size) of the rules file last loaded or refused

    def load(self, loader: Any) -> None:
        loader.add_option(
            "replayguard_rules", str, "",
            "replayguard rules file (YAML). Default: rules.yaml beside addon.py.",
        )
        loader.add_option(
            "replayguard_trace", str, "",
            "Write a chain trace (JSON Lines, private to the user) to this file, or to a new file in this "
            "directory (trailing slash or an existing directory). Read it with `python -m replayguard trace FILE`.",
        )

    def configure(self, updated: set[str]) -> None:
        if "replayguard_rules" in updated or self.rules is None:
            try:
                rules = load_rules(ctx.options.replayguard_rules or None)
            except RulesError as e:
                raise OptionsError(f"replayguard: bad rules file: {e}") from None
            self._use(rules)
            self._rules_seen = self._signature()
            log.info("replayguard: rules from %s (policy %s)", rules.source, rules.recovery.policy.value)
        if "replayguard_trace" in updated:
            self._open_trace(ctx.options.replayguard_trace)

    async def request(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        if flow.response is not None or self.rules is None or not is_websocket_upgrade(request):
            return
        if not self.rules.matches(request.host, request.path, flow):
            return
        rules = self.rules
        await self.bridge.ensure_started()
        protocols = request.headers.get("sec-websocket-protocol")
        target = Target(
            url=upstream_url(request),
            headers=forwardable(request.headers.items(multi=True), drop=[TOKEN_HEADER]),
            user_agent=request.headers.get("user-agent"),
            subprotocols=[p.strip() for p in protocols.split(",")] if protocols else None,
            ssl_context=self._ssl_context(),
            connect_timeout=rules.upstream.connect_timeout,
            max_size=rules.upstream.max_message_size,
        )
        listeners: list[Listener] = []
        if self.trace is not None:
            listeners.append(SessionTrace(self.trace, flow.id, target.headers, rules.trace.bodies))
        listeners += [SessionLog(flow.id), FlowNotes(flow.id, self._notify)]
        faults = rules.faults_for(request.host, request.path, flow)
        session = Session(flow.id, target, rules, self.store, listeners, FaultInjector(faults) if faults else None)
        client = flow.client_conn.peername
        try:
            await session.open(f"{client[0]}:{client[1]}" if client else "")
        except Exception as e:
            if not isinstance(e, HandshakeFailed):  # never leave the client hanging on our own bug
                log.exception("flow %s: opening the upstream connection failed", flow.id)
                e = HandshakeFailed(f"replayguard internal error: {type(e).__name__}")
            flow.response = self._refusal(e)
            log.warning("flow %s: upstream handshake to %s failed: %s -> HTTP %d to client",
                        flow.id, redact_url(target.url), scrub(e.detail), flow.response.status_code)
            flow.marked = MARK_FAILED
            flow.comment = f"replayguard: upstream handshake failed: {scrub(e.detail)}"
            return
        token = self.bridge.register(session)
        self.flows[flow.id] = flow
        flow.metadata["replayguard_upstream"] = target.url
        request.headers[TOKEN_HEADER] = token
        request.scheme = "http"
        request.host = "127.0.0.1"
        request.port = self.bridge.port

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.flows.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self.bridge.discard(flow.id)
        self.flows.pop(flow.id, None)

    def running(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch_rules())

    def state_counts(self) -> dict[str, int]:
        """Per-flow state the addon holds right now (all zero once every session ended and resume_ttl passed)."""
        return {"sessions": len(self.bridge.active), "pending": len(self.bridge.pending), "flows": len(self.flows),
                "saved_responses": len(self.store), "retired": self.store.retired}

    async def done(self) -> None:
        counts = ", ".join(f"{k} {v}" for k, v in self.state_counts().items())
        log.info("replayguard: state at exit: %s", counts)
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        await self.bridge.stop()
        if self.trace is not None:
            self.trace.close()
            self.trace = None

    def _open_trace(self, path: str) -> None:
        old, self.trace = self.trace, None
        if old is not None:
            old.close()
        if not path:
            return
        try:
            self.trace = TraceWriter(path)
        except OSError as e:
            raise OptionsError(f"replayguard: cannot write trace file {path}: {e.strerror or e}") from None
        log.info("replayguard: writing chain trace to %s", self.trace.path)

    # -- rules reload ------------------------------------------------------------------------------
    def _use(self, rules: Rules) -> None:
        self.rules = rules
        self.store.max_records = rules.limits.max_saved_responses
        if rules.faults:
            log.warning("replayguard: %d fault rule(s) active: failures will be injected on purpose", len(rules.faults))

    def _rules_path(self) -> Path:
        return Path(ctx.options.replayguard_rules or DEFAULT_RULES)

    def _signature(self) -> tuple[int, int] | None:
        try:
            st = self._rules_path().stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    async def _watch_rules(self) -> None:
        """Reload the rules file when it changes on disk. New flows get the new rules; a bad file is reported
        (file, line, reason) once and the last good rules stay in force."""
        while True:
            await asyncio.sleep(RULES_POLL_SECONDS)
            signature = self._signature()
            if signature is None or signature == self._rules_seen:
                continue
            self._rules_seen = signature
            try:
                rules = load_rules(self._rules_path())
            except RulesError as e:
                log.warning("replayguard: %s; keeping the last good rules (from %s)", e,
                            self.rules.source if self.rules else "-")
                continue
            self._use(rules)
            log.info("replayguard: reloaded rules from %s (policy %s)", rules.source, rules.recovery.policy.value)

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _refusal(e: HandshakeFailed) -> http.Response:
        status = e.status if e.status and e.status >= 400 else 502
        if e.status and e.body and "json" in e.content_type:
            body = e.body  # the upstream's own error, unchanged
        else:
            body = http_error_body(status, "upstream_handshake_failed", e.detail)
        return http.Response.make(status, body, {"content-type": "application/json"})

    @staticmethod
    def _ssl_context() -> ssl.SSLContext:
        """TLS for the addon's own upstream connections, following mitmproxy's options."""
        opts = ctx.options
        cafile = getattr(opts, "ssl_verify_upstream_trusted_ca", None)
        capath = getattr(opts, "ssl_verify_upstream_trusted_confdir", None)
        if not cafile and not capath:
            try:
                import certifi

                cafile = certifi.where()
            except ImportError:  # pragma: no cover - certifi comes with mitmproxy
                pass
        context = ssl.create_default_context(cafile=cafile or None, capath=capath or None)
        if getattr(opts, "ssl_insecure", False):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _notify(self, flow_id: str, kind: str, text: str) -> None:
        """Show what happened in mitmweb: a marker and a comment line on the flow."""
        flow = self.flows.get(flow_id)
        if flow is None:
            return
        flow.marked = {"failed": MARK_FAILED, "recovered": MARK_RECOVERED}.get(kind, MARK_FAULT)
        line = f"replayguard: {text}"
        flow.comment = f"{flow.comment}\n{line}" if flow.comment else line
        try:
            ctx.master.addons.trigger(UpdateHook([flow]))
        except Exception:  # no master (unit tests) or shutting down
            pass
