"""A session as mitmproxy shows it: in mitmweb, the console, saved flow files and HAR exports.

The client's own messages are in the flow as mitmproxy relayed them, untouched. Beside them, :class:`FlowView`
keeps what replayguard did on the client's behalf, as messages of the flow marked ``injected`` whose JSON is a
chain trace record with ``"type": "replayguard.<record>"``: each upstream connection opened and closed, each
request rewritten or replayed with exactly what was ``sent`` upstream, each upstream message consumed instead of
forwarded (its ``message``), each injected fault, each fail-close. A saved flow file keeps them, mitmweb shows them
(rendered by the Responses contentview) and ``replayguard trace flows.mitm`` rebuilds the chain trace from them.
The flow's server connection shows where replayguard really connected (not the loopback bridge), and a marker and
comment lines sum up recoveries, fail-closes and faults.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Iterable

from cryptography import x509
from mitmproxy import certs, ctx, http
from mitmproxy.connection import Server
from mitmproxy.hooks import UpdateHook
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from ..core import events as ev
from ..core.messages import is_delta, parse
from ..core.records import FLOW_RECORD, Bodies, record_of
from ..core.recovery import Trigger
from ..core.redact import scrub
from .destination import Destination

log = logging.getLogger(__name__)

MARK_RECOVERED = ":recycle:"
MARK_FAILED = ":no_entry:"
MARK_FAULT = ":zap:"
MAX_COMMENT_LINES = 20
UPDATE_DELAY = 0.2  # seconds: mitmweb hears of replayguard's changes to a flow at most this often
SKIPPED = frozenset({"turn.start", "turn.end"})  # the flow holds the client's own requests and events
FROM_CLIENT = frozenset({"recovery"})  # requests replayguard sent upstream in the client's place
NOT_ON_THE_WIRE = "replayguard's own record: not a message on the wire"


def _default(value: Any) -> Any:
    return getattr(value, "value", repr(value))  # enums by value


class FlowView:
    """The listener that keeps one session's flow showing what happened."""

    def __init__(self, flow: http.HTTPFlow, destination: Destination, bodies: Bodies = Bodies.SUMMARY,
                 secrets: Iterable[str] = ()) -> None:
        self.flow = flow
        self.secrets = list(secrets)  # the session's credential values: never in a record
        self.destination = destination
        self.bodies = bodies
        self.pending: list[WebSocketMessage] = []  # records made before the WebSocket existed (open, handshake)
        # Where a record goes among the messages: mitmproxy relays what the session sent its client a little later
        # than the session sent it, so a record made after the session's Nth message to the client waits until
        # mitmproxy has relayed that message (counted in websocket_message), and goes right after it.
        self.sent = 0  # messages the session sent its client (through mitmproxy)
        self.relayed = 0  # of them, relayed by mitmproxy so far
        self.waiting: list[tuple[int, bytes, bool]] = []  # (after how many relayed, content, from_client)
        self.notes: list[str] = []  # comment lines
        self.counts = {"recoveries": 0, "faults": 0, "failed closed": 0}
        self.dropped = 0  # messages dropped from the flow under limits.flow_messages
        self._server: tuple[ev.Handshake, float] | None = None  # the upstream connection shown, and when it opened
        self._update_pending = False

    # -- the listener -----------------------------------------------------------------------------
    def __call__(self, event: ev.Event) -> None:
        self._note(event)
        if isinstance(event, ev.Handshake) and event.ok:
            self._server = (event, time.time())
            self._describe_server()
        record = record_of(event, self.bodies)
        if record is None or record[0] in SKIPPED:
            return
        name, fields = record
        content: dict[str, Any] = {"type": FLOW_RECORD + name, "ts": round(time.time(), 6), "session": self.flow.id,
                                   "event": name, **fields}
        if isinstance(event, ev.Recovered) and event.sent:
            content["sent"] = _json_or_text(event.sent)
        elif isinstance(event, ev.UpstreamLost) and event.raw is not None:
            content["message"] = _json_or_text(event.raw)
        content["replayguard"] = NOT_ON_THE_WIRE
        text = scrub(json.dumps(content, ensure_ascii=False, default=_default), self.secrets).encode()
        ws = self.flow.websocket
        if ws is not None and ws.timestamp_end is None and self.sent > self.relayed:
            self.waiting.append((self.sent, text, name in FROM_CLIENT))  # after the messages still on their way
        else:
            self.append(text, name in FROM_CLIENT)

    def relayed_one(self, message: WebSocketMessage) -> None:
        """mitmproxy's websocket_message for this flow: a message the session sent its client has been relayed;
        the records made after it go right after it."""
        if message.from_client or message.injected:
            return  # the client's own (already in the flow when the session heard it), or someone's injection
        self.relayed += 1
        while self.waiting and self.waiting[0][0] <= self.relayed:
            _, content, from_client = self.waiting.pop(0)
            self.append(content, from_client)

    def flush(self) -> None:
        """The WebSocket ended: records still waiting for a message that never came through go last."""
        while self.waiting:
            _, content, from_client = self.waiting.pop(0)
            self.append(content, from_client)

    def append(self, content: bytes, from_client: bool) -> None:
        """A record into the flow, now: after every message mitmproxy relayed for the session (or first, before the
        WebSocket started)."""
        message = WebSocketMessage(Opcode.TEXT, from_client, content, time.time(), injected=True)
        message.dropped = True  # it never crossed the wire
        if self.flow.websocket is None:
            self.pending.append(message)
        else:
            self.flow.websocket.messages.append(message)
            self._update()

    def attach(self) -> None:
        """The WebSocket exists (mitmproxy's websocket_start): the records made before it go first."""
        if self.flow.websocket is None:
            return
        if self.pending:
            self.flow.websocket.messages[:0] = self.pending
            self.pending.clear()
        self._describe_server()  # mitmproxy's own websocket_start update, right after this hook, shows it all

    def trim(self, limit: int) -> None:
        """Keep at most ``limit`` messages of the live flow (limits.flow_messages; mitmproxy keeps them all): the
        oldest delta events go first, then the oldest upstream events; the client's own messages and replayguard's
        records last. The count dropped is shown on the flow."""
        ws = self.flow.websocket
        if ws is None or len(ws.messages) <= limit:
            return
        excess = len(ws.messages) - limit
        ranks = []  # (rank, index): lower ranks go first, and older before newer
        for index, message in enumerate(ws.messages[:-1]):  # never the message being handled now
            if message.from_client or message.injected:
                rank = 2
            elif message.is_text and is_delta(message.content[:96].decode("utf-8", "replace")):
                rank = 0
            else:
                rank = 1
            ranks.append((rank, index))
        drop = {index for _, index in sorted(ranks)[:excess]}
        ws.messages[:] = [m for i, m in enumerate(ws.messages) if i not in drop]
        self.dropped += len(drop)
        self.flow.metadata["replayguard_dropped_messages"] = self.dropped
        self._comment()

    # -- what mitmweb shows -----------------------------------------------------------------------
    def _note(self, event: ev.Event) -> None:
        if isinstance(event, ev.Recovered):
            turn = event.turn
            if event.trigger is Trigger.RESUME:
                self.notify("recovered", f"turn {turn.number}: resumed {turn.previous_id} from chain state")
            elif event.trigger is not Trigger.ROTATION:
                self.notify("recovered", f"turn {turn.number}: {event.trigger.value} -> {event.decision.action.value}")
        elif isinstance(event, ev.FailedClosed):
            number = event.turn.number if event.turn is not None else "-"
            self.notify("failed", f"turn {number}: {event.decision.reason} -> failed closed")
        elif isinstance(event, ev.FaultFired):
            self.notify("info", f"injected fault after turn {event.fired.after_turn}: {event.fired.rule.describe()}")

    def notify(self, kind: str, text: str) -> None:
        """A marker and a comment line. mitmweb shows a comment as one paragraph, so every line starts with its
        own symbol and reads on its own; the console keeps the line breaks."""
        self.flow.marked = {"failed": MARK_FAILED, "recovered": MARK_RECOVERED}.get(kind, MARK_FAULT)
        key = {"failed": "failed closed", "recovered": "recoveries"}.get(kind, "faults")
        self.counts[key] += 1
        symbol = {"failed": "✗", "recovered": "⟲"}.get(kind, "⚡")
        self.notes.append(scrub(f"{symbol} {text}", self.secrets))
        self._comment()

    def _comment(self) -> None:
        summary = ", ".join(f"{n} {what}" for what, n in self.counts.items() if n)
        if self.dropped:
            summary += f"{', ' if summary else ''}{self.dropped} older messages dropped (limits.flow_messages)"
        lines = self.notes[-MAX_COMMENT_LINES:]
        if len(self.notes) > MAX_COMMENT_LINES:
            lines.insert(0, f"… {len(self.notes) - MAX_COMMENT_LINES} earlier (all are in the flow's messages)")
        self.flow.comment = "\n".join([f"replayguard: {summary}.", *lines])
        self._update()

    def _describe_server(self) -> None:
        """The flow's server connection shows the upstream connection replayguard made, not the loopback bridge
        mitmproxy talks to. mitmproxy only uses its own connection object (the context's) once the WebSocket is
        up, so the flow gets a description of ours in its place."""
        if self._server is None or self.flow.websocket is None:
            return
        hs, opened = self._server
        d = self.destination
        server = Server(address=d.address)
        server.via = d.via  # type: ignore[assignment]  # the same (scheme, address) mitmproxy's mode gave it
        server.peername = hs.peer
        server.sockname = hs.local
        server.sni = d.server_name
        server.tls = d.secure
        server.timestamp_start = opened - hs.ms / 1000
        server.timestamp_tcp_setup = opened
        if hs.tls is not None:
            server.tls_version = hs.tls.get("version")
            server.cipher = hs.tls.get("cipher")
            server.timestamp_tls_setup = opened
        if hs.certificate:
            try:
                server.certificate_list = [certs.Cert(x509.load_der_x509_certificate(hs.certificate))]
            except ValueError:
                log.debug("flow %s: upstream certificate not readable", self.flow.id)
        self.flow.server_conn = server

    def _update(self) -> None:
        """Tell mitmweb and the console the flow changed: at most one update per UPDATE_DELAY, since an update is a
        round through every addon and records can come in bursts."""
        if self._update_pending or self.flow.websocket is None or self.flow.websocket.timestamp_end is not None:
            return  # before it starts and once it ended, mitmproxy's own websocket_start/end update shows it all
        try:
            asyncio.get_running_loop().call_later(UPDATE_DELAY, self._send_update)
        except RuntimeError:  # no event loop (unit tests)
            return
        self._update_pending = True

    def _send_update(self) -> None:
        self._update_pending = False
        try:
            ctx.master.addons.trigger(UpdateHook([self.flow]))
        except Exception:  # no master (unit tests) or shutting down
            pass


def _json_or_text(text: str) -> Any:
    obj = parse(text)
    return text if obj is None else obj
