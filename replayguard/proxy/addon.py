"""The mitmproxy addon: options, rules, which upgrades are Responses sessions, and opening each session; the
router (:mod:`replayguard.proxy.routing`) takes a matched flow to the bridge."""

from __future__ import annotations

import asyncio
import difflib
import errno
import os
import logging
import secrets
from pathlib import Path
from typing import Any, Awaitable

from mitmproxy import ctx, http
from mitmproxy.exceptions import OptionsError

from ..core.chain import ChainStore
from ..core.errors import INTERNAL, http_error_body
from ..core.events import Listener
from ..core.faults import FaultInjector
from ..core.redact import Credentials, redact_url, scrub
from . import contentview
from .bridge import Bridge
from .clock import CLOCK
from .commands import SessionCommands
from .destination import Destination, destination_of
from .exposure import exposed
from .flowview import MARK_FAILED, FlowView
from .live import Live, Match
from .reporting import SessionLog
from .routing import Router
from .rules import DEFAULT_RULES, Rules, RulesError, load_rules
from .session import Session
from .tracing import SessionTrace, TraceFile
from .resources import DescriptorAlarm, raise_open_files_limit
from .upstream import OVERLOADED, HandshakeFailed, Target, TlsSettings, forwardable, tls_context

log = logging.getLogger(__name__)

RULES_POLL_SECONDS = 1.0
PRINCIPAL_KEY = secrets.token_bytes(32)  # keys the fingerprints that keep one principal's chains from another
SESSION_CLOSE_WAIT = 3.0  # seconds websocket_end waits for a session to finish closing


def is_websocket_upgrade(request: http.Request) -> bool:
    return request.headers.get("upgrade", "").lower() == "websocket"


class ReplayGuard:
    """Keeps Responses WebSocket conversations alive across upstream connection failures."""

    def __init__(self, script: str | None = None) -> None:
        # The script that loaded us (addon.py): an edit of the package touches it, so mitmproxy reloads both.
        self.script = Path(script) if script else None
        self._package_seen: tuple[int, int] | None = None
        self._unknown_reported: set[str] = set()
        self.rules: Rules | None = None
        self.store = ChainStore()
        self.bridge = Bridge()
        self.router = Router(self)
        self.contentview: object | None = None
        self.alarm: DescriptorAlarm | None = None  # reports running out of file descriptors once per burst
        self.matched: dict[str, Match] = {}  # flow id -> match, until the router takes the flow
        self.flows: dict[str, Live] = {}  # live sessions, by flow id
        self.addons = [SessionCommands(self.flows)]  # mitmproxy registers these beside the addon
        self.tls = TlsSettings()
        self.trace = TraceFile()  # where every session's records go (nowhere while replayguard_trace is "")
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
        raised = raise_open_files_limit()  # a session holds several descriptors
        if raised is not None:
            log.info("replayguard: raised the open-files limit from %d to %d", *raised)
        self.router.install()  # last in mitmproxy's chain: after every other addon's request hook
        self.contentview = contentview.register()  # "Responses", chosen automatically for Responses messages

    def configure(self, updated: set[str]) -> None:
        self._check_option_names()
        if "replayguard_rules" in updated or self.rules is None:
            try:
                rules = load_rules(ctx.options.replayguard_rules or None)
            except RulesError as e:
                self._refuse_rules(e)  # raises, exits, or leaves replayguard idle until the file is fixed
                rules = None
            if rules is not None:
                self._use(rules)
                self._rules_seen = self._signature()
                log.info("replayguard: rules from %s (policy %s)", rules.source, rules.recovery.policy.value)
        if "replayguard_trace" in updated:
            self._open_trace(ctx.options.replayguard_trace)
        self.tls = _tls_settings(ctx.options)

    def _check_option_names(self) -> None:
        """An option named replayguard_* that replayguard does not define is a misspelling (mitmproxy keeps unknown
        --set options aside in case a script defines them later, silently). Logged as an error: at startup that stops
        mitmproxy before it listens, with the options that do exist."""
        ours = sorted(name for name in ctx.options.keys() if name.startswith("replayguard"))
        for name in sorted(getattr(ctx.options, "deferred", {})):
            if name.startswith("replayguard") and name not in self._unknown_reported:
                self._unknown_reported.add(name)
                close = difflib.get_close_matches(name, ours, n=1)
                log.error("replayguard: unknown option %r%s; replayguard's options are: %s", name,
                          f" (did you mean {close[0]}?)" if close else "", ", ".join(ours))

    def request(self, flow: http.HTTPFlow) -> None:
        """Which upgrades are Responses sessions, decided on the request as the client sent it (host: the name it
        used, its SNI or Host, in every mode). The router, last in mitmproxy's chain, takes them from here."""
        request = flow.request
        if flow.response is not None or self.rules is None or not is_websocket_upgrade(request):
            return
        try:
            name = destination_of(flow).name
            if self.rules.matches(name, request.path, flow):
                self.matched[flow.id] = Match(self.rules, name, request.path)
        except Exception as e:  # an upgrade that may be a session is never let through unguarded on our bug
            self.internal_error(flow, "matching the rules", e)

    def internal_error(self, flow: http.HTTPFlow, where: str, exc: BaseException, answer: bool = True) -> http.Response:
        """replayguard failed on a flow before it became a session: the client gets a 500 that says so (set as the
        flow's response with ``answer``; else the bridge answers with it)."""
        log.error("flow %s: replayguard internal error in %s", flow.id, where, exc_info=exc)
        self.matched.pop(flow.id, None)
        detail = scrub(f"internal error in {where}: {type(exc).__name__}: {exc}")[:300]
        response = http.Response.make(500, http_error_body(500, INTERNAL, detail), {"content-type": "application/json"})
        if answer and flow.response is None:
            flow.response = response
        flow.marked = MARK_FAILED
        flow.comment = f"replayguard: {detail}"
        return response

    def new_session(self, flow: http.HTTPFlow, match: Match, destination: Destination) -> Session:
        """The session for a matched flow, with everything that listens to it (not yet connected)."""
        rules = match.rules
        request = flow.request
        protocols = request.headers.get("sec-websocket-protocol")
        target = Target(
            destination=destination,
            headers=forwardable(request.headers.items(multi=True)),
            user_agent=request.headers.get("user-agent"),
            subprotocols=[p.strip() for p in protocols.split(",")] if protocols else None,
            ssl_context=tls_context(self.tls.for_server(destination.server_name)) if destination.secure else None,
            connect_timeout=rules.upstream.connect_timeout,
            max_size=rules.upstream.max_message_size,
        )
        # Who is asking, wherever the client carries it (headers, the URL's query, subprotocol entries): it keys the
        # chains this session may resume, and its secret values are scrubbed from everything written about it.
        credentials = Credentials.of(request.headers.items(multi=True), destination.url)
        secrets = credentials.secrets()
        view = FlowView(flow, destination, rules.trace.bodies, secrets)
        listeners: list[Listener] = [SessionTrace(self.trace, flow.id, secrets, rules.trace.bodies),
                                     SessionLog(flow.id, secrets), view]
        faults = rules.faults_for(match.name, match.path, flow)
        session = Session(flow.id, target, rules, self.store, listeners, FaultInjector(faults) if faults else None,
                          credentials.principal(PRINCIPAL_KEY), rules.client.interval(idle_timeout()), view)
        self.flows[flow.id] = Live(session, view)
        flow.metadata["replayguard_upstream"] = redact_url(target.url)
        return session

    async def open_session(self, session: Session, flow: http.HTTPFlow) -> http.Response | None:
        """Open the session's first upstream connection. None when it is open; else the answer the client gets
        instead of its 101: the upstream's own refusal, or a 502/503/500 of ours with a JSON body."""
        client = flow.client_conn.peername
        try:
            await session.open(f"{client[0]}:{client[1]}" if client else "")
            return None
        except HandshakeFailed as e:
            refusal = self._refusal(e)
            if e.code == OVERLOADED and self.alarm is not None:
                self.alarm.note(OSError(errno.EMFILE, os.strerror(errno.EMFILE)))  # one line a burst, not a flow
            else:
                log.warning("flow %s: upstream handshake to %s failed: %s -> HTTP %d to client",
                            flow.id, redact_url(session.target.url), scrub(e.detail), refusal.status_code)
            flow.marked = MARK_FAILED
            flow.comment = f"replayguard: upstream handshake failed: {scrub(e.detail)}"
        except Exception as e:  # never leave the client hanging on our own bug
            refusal = self.internal_error(flow, "opening the session", e, answer=False)
        self.flows.pop(flow.id, None)
        return refusal

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        live = self.flows.get(flow.id)
        if live is not None:
            live.view.attach()


    def websocket_message(self, flow: http.HTTPFlow) -> None:
        live = self.flows.get(flow.id)
        if live is None or flow.websocket is None:
            return
        live.view.relayed_one(flow.websocket.messages[-1])  # records made after this message go after it
        limit = live.session.rules.limits.flow_messages
        if limit and len(flow.websocket.messages) > limit + limit // 10:  # trimmed in batches: O(1) a message
            live.view.trim(limit)

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        live = self.flows.pop(flow.id, None)
        if live is not None:
            live.view.flush()  # records still waiting for messages that never came through
            # The session closes its upstream side as the client leaves; its last records (the connection closed,
            # the session's end) belong in the flow, which mitmproxy saves right after this hook (-w, mitmweb).
            await live.session.wait_closed(SESSION_CLOSE_WAIT)

    def error(self, flow: http.HTTPFlow) -> None:
        self.matched.pop(flow.id, None)
        self.flows.pop(flow.id, None)

    def running(self) -> None:
        self._warn_if_exposed()
        self.router.ensure_last()
        if self.alarm is None:
            self.alarm = DescriptorAlarm(asyncio.get_running_loop())
        CLOCK.start()  # timers that discount stalls of our own loop
        if self._watcher is None:
            self._package_seen = _package_signature()
            self._watcher = asyncio.ensure_future(self._watch_files())

    def state_counts(self) -> dict[str, int]:
        """Per-flow state the addon holds right now (all zero once every session ended and resume_ttl passed)."""
        return {"sessions": len(self.bridge.active), "pending": len(self.router.routes) + len(self.bridge.expected),
                "matched": len(self.matched), "flows": len(self.flows),
                "saved_responses": len(self.store), "retired": self.store.retired}

    def done(self) -> Awaitable[None] | None:
        """Not a coroutine function on purpose: mitmproxy calls ``done`` synchronously when it reloads or removes the
        script (a coroutine there kills its file watcher for good, silently), and awaits an awaitable a hook returns
        when it shuts down. At shutdown every session closes (1001) before mitmproxy exits; on a reload they end
        with a retryable error and close 1012 (service restart) in the background, and their clients reconnect to
        the new code."""
        counts = ", ".join(f"{k} {v}" for k, v in self.state_counts().items())
        log.info("replayguard: state at exit: %s", counts)
        self._detach()
        if _shutting_down():
            return self._stop(reloading=False)
        if self.bridge.active:
            log.warning("replayguard: reloaded: %d live session(s) end with replayguard_reloaded (close 1012); their "
                        "clients reconnect to the new code", len(self.bridge.active))
        task = asyncio.ensure_future(self._stop(reloading=True))
        _STOPPING.add(task)  # the old instance is dropped by mitmproxy: keep its last work alive until it is done
        task.add_done_callback(_STOPPING.discard)
        return None

    def _detach(self) -> None:
        """Leave mitmproxy's machinery (hooks, views, watchers) at once; sessions are closed by :meth:`_stop`."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        self.router.done()
        self.router.uninstall()
        if self.contentview is not None:
            contentview.unregister(self.contentview)
            self.contentview = None

    async def _stop(self, reloading: bool) -> None:
        try:
            await self.bridge.stop(reloading=reloading)
        finally:
            CLOCK.stop()
            self.trace.close()
            # At exit the alarm stays: asyncio may still retry an accept after the servers closed (see its note).
            if reloading and self.alarm is not None:
                self.alarm.uninstall()
                self.alarm = None

    def _open_trace(self, path: str) -> None:
        """Trace to ``path`` ("" = stop): live sessions move to the new file."""
        if not path:
            self.trace.close()
            return
        try:
            writer = self.trace.open(path)
        except OSError as e:
            raise OptionsError(f"replayguard: cannot write trace file {path}: {e.strerror or e}") from None
        log.info("replayguard: writing chain trace to %s", writer.path)

    def _refuse_rules(self, error: RulesError) -> None:
        """A rules file with mistakes. Once rules are in force (the option set at runtime), it is refused and the
        last good rules stay. Without any: mitmproxy would log an OptionsError raised while it loads the script
        inside a traceback and, at startup, go on to say it listens before exiting; so each mistake is logged as
        one line instead, and at startup the process exits now, with status 1. replayguard loaded into a running
        mitmproxy stays idle (matches nothing) until the watched file is fixed."""
        loader = ctx.master.addons.get("scriptloader")
        if self.rules is not None or loader is None:
            raise OptionsError(f"replayguard: bad rules file: {error}") from None
        for line in error.lines():
            log.error("replayguard: bad rules file: %s", line)
        if not getattr(loader, "is_running", True):
            log.error("replayguard: not starting: fix the rules file (every mistake is listed above)")
            raise SystemExit(1)
        log.error("replayguard: handling no flow until the rules file is fixed (it is watched)")
        self._rules_seen = self._signature()

    @staticmethod
    def _warn_if_exposed() -> None:
        """One warning at startup when mitmproxy listens beyond loopback (its default: every interface)."""
        listeners = exposed(ctx.options)
        if listeners:
            log.warning("replayguard: mitmproxy listens beyond this machine on %s: anyone who reaches it can use the "
                        "API keys that pass through; --listen-host 127.0.0.1 keeps it local", ", ".join(listeners))

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

    async def _watch_files(self) -> None:
        while True:
            await asyncio.sleep(RULES_POLL_SECONDS)
            try:
                self._check_package()
                self._check_rules()
            except OSError as e:  # out of descriptors, a file being replaced: look again in a second
                log.debug("replayguard: cannot look at the rules or the package now: %s", e)

    def _check_package(self) -> None:
        """mitmproxy reloads the script file it was given when that file changes, not the package behind it: an
        edited package file touches the script, so mitmproxy reloads it (and addon.py imports the package anew)."""
        if self.script is None:
            return
        signature = _package_signature()
        if signature is None or self._package_seen is None or signature == self._package_seen:
            self._package_seen = self._package_seen or signature
            return
        self._package_seen = signature
        log.info("replayguard: the package changed on disk; reloading %s", self.script)
        try:
            os.utime(self.script)
        except OSError as e:
            log.warning("replayguard: cannot touch %s to reload it: %s", self.script, e.strerror or e)

    def _check_rules(self) -> None:
        """Reload the rules file when it changes on disk. New flows get the new rules; a bad file is reported
        (file, line, reason) once and the last good rules stay in force."""
        signature = self._signature()
        if signature is None or signature == self._rules_seen:
            return
        self._rules_seen = signature
        try:
            rules = load_rules(self._rules_path())
        except RulesError as e:
            log.warning("replayguard: %s; keeping the last good rules (from %s)", e,
                        self.rules.source if self.rules else "-")
            return
        self._use(rules)
        log.info("replayguard: reloaded rules from %s (policy %s)", rules.source, rules.recovery.policy.value)

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _refusal(e: HandshakeFailed) -> http.Response:
        status = e.status if e.status and e.status >= 400 else 502
        if e.status and e.body and "json" in e.content_type:
            body = e.body  # the upstream's own error, unchanged
        else:
            body = http_error_body(status, e.code, e.detail)
        return http.Response.make(status, body, {"content-type": "application/json"})


def _package_signature() -> tuple[int, int] | None:
    """(newest mtime, number of files) of the package's Python files: changes when one is edited, added or removed.
    None when it cannot be read now (out of file descriptors, say): that is no change."""
    try:
        files = list(Path(__file__).resolve().parents[1].rglob("*.py"))
        return max(path.stat().st_mtime_ns for path in files), len(files)
    except (OSError, ValueError):
        return None


_STOPPING: set[asyncio.Task[None]] = set()  # the last work of instances a reload replaced


def _shutting_down() -> bool:
    """mitmproxy is exiting (not reloading the script): it sets should_exit before its done round."""
    should_exit = getattr(ctx.master, "should_exit", None)
    return should_exit is None or should_exit.is_set()


def idle_timeout() -> float:
    """Seconds mitmproxy lets a connection sit idle before it closes it: the tcp_timeout option (mitmproxy >= 12.2),
    a constant before that."""
    value = getattr(ctx.options, "tcp_timeout", None)
    if value:
        return float(value)
    from mitmproxy.proxy import server

    return float(getattr(server, "TCP_TIMEOUT", 600))


def _tls_settings(options: Any) -> TlsSettings:
    """mitmproxy's server-side TLS options, for replayguard's own upstream connections."""
    return TlsSettings(
        cafile=getattr(options, "ssl_verify_upstream_trusted_ca", None) or None,
        capath=getattr(options, "ssl_verify_upstream_trusted_confdir", None) or None,
        insecure=bool(getattr(options, "ssl_insecure", False)),
        ciphers=getattr(options, "ciphers_server", None) or None,
        min_version=getattr(options, "tls_version_server_min", "TLS1_2"),
        max_version=getattr(options, "tls_version_server_max", "UNBOUNDED"),
        client_cert=getattr(options, "client_certs", None) or None,
    )
