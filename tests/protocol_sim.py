"""An in-process driver for the protocol core against the model of the upstream: no sockets, no event loop, a clock
the test moves. It does what :mod:`replayguard.proxy.session` does with real connections, one input at a time, so a
test decides every interleaving: which lane's next event the upstream sends, when a connection dies, when a
handshake completes, when a timer fires."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from replayguard.core import events as ev
from replayguard.core import protocol as p
from replayguard.core.chain import Chain, ChainStore
from replayguard.core.faults import FaultInjector
from replayguard.core.recovery import Refusal
from replayguard.tools.upstream_model import Connection, Model

FAST = p.Settings(ping_idle=20, ping_timeout=1, keepalive_interval=0, first_event_timeout=2, rotation_age=3300,
                  max_retries=1)


@dataclass
class Upstream:
    """One upstream connection as the simulated network sees it."""

    id: int
    model: Connection
    open: bool = True
    paused: bool = False  # black-holed: nothing is read or answered
    sent: list[str] = field(default_factory=list)  # what replayguard sent on it


class Sim:
    def __init__(self, settings: p.Settings = FAST, model: Model | None = None, store: ChainStore | None = None,
                 principal: str = "client-a", faults: FaultInjector | None = None, auto_open: bool = True) -> None:
        self.model = model or Model()
        self.store = store if store is not None else ChainStore()
        self.chain = Chain(self.store, principal=principal)
        self.now = 0.0
        self.protocol = p.Protocol(self.chain, settings, faults, clock=lambda: self.now)
        self.settings = settings
        self.upstreams: dict[int, Upstream] = {}
        self.client: list[dict[str, Any]] = []  # what the client received
        self.client_raw: list[str | bytes] = []
        self.closed: tuple[int, str] | None = None  # how replayguard closed the client
        self.records: list[ev.Event] = []
        self.timers: dict[tuple[Any, ...], float] = {}
        self.pings: list[tuple[float, int, str]] = []  # (when it is answered or times out, conn, purpose)
        self.opening: deque[p.OpenUpstream] = deque()  # handshakes in progress (auto_open completes them)
        self.auto_open = auto_open
        self.finished: str | None = None
        self.inbox: deque[Callable[[], list[p.Command]]] = deque()
        self.client_gone = False
        self.pings_unanswered = False  # the client stopped answering pings: replayguard treats it as gone
        self.sent_after_gone: list[str] = []
        self.turn_sends: dict[int, int] = {}  # turn number -> creates sent upstream for it

    # -- running -------------------------------------------------------------------------------------------
    def feed(self, commands: list[p.Command]) -> None:
        for command in commands:
            self._do(command)
        self.settle()

    def settle(self) -> None:
        while self.inbox:
            self.feed_one(self.inbox.popleft())

    def feed_one(self, step: Callable[[], list[p.Command]]) -> None:
        for command in step():
            self._do(command)

    def start(self) -> "Sim":
        self.feed(self.protocol.start("ws://upstream.test/v1/responses", "127.0.0.1:1", None))
        return self

    def _do(self, c: p.Command) -> None:
        if isinstance(c, p.OpenUpstream):
            self.opening.append(c)
            if self.auto_open:
                self.inbox.append(lambda: self.complete_open())
        elif isinstance(c, p.SendUpstream):
            text = c.text if c.text is not None else json.dumps(c.body)
            if c.recovered is not None:
                self.records.append(replace(c.recovered, sent=text if isinstance(text, str) else "", size=len(text)))
            if self.client_gone or self.pings_unanswered:
                self.sent_after_gone.append(str(text))
            if c.turn is not None:
                self.turn_sends[c.turn] = self.turn_sends.get(c.turn, 0) + 1
            up = self.upstreams.get(c.conn)
            if up is not None and up.open:
                up.sent.append(text if isinstance(text, str) else text.decode("utf-8", "replace"))
                if not up.paused:
                    up.model.receive(text)
        elif isinstance(c, p.SendClient):
            self.client_raw.append(c.text)
            try:
                self.client.append(json.loads(c.text))
            except ValueError:
                self.client.append({"_raw": c.text})
        elif isinstance(c, p.CloseUpstream):
            self._gone(c.conn, c.code, c.reason, dropped=False)
        elif isinstance(c, p.AbortUpstream):
            self._gone(c.conn, None, "", dropped=True)
        elif isinstance(c, p.PauseUpstream):
            if c.conn in self.upstreams:
                self.upstreams[c.conn].paused = True
        elif isinstance(c, p.Ping):
            up = self.upstreams.get(c.conn)
            if up is not None and up.open and not up.paused:
                self.inbox.append(lambda conn=c.conn, purpose=c.purpose: self.protocol.ping_result(conn, True, purpose))
            else:
                self.pings.append((self.now + c.timeout, c.conn, c.purpose))
        elif isinstance(c, p.CloseClient):
            if self.closed is None:
                self.closed = (c.code, c.reason)
        elif isinstance(c, p.StartTimer):
            self.timers[c.key] = self.now + c.seconds
        elif isinstance(c, p.Emit):
            self.records.append(c.event)
        elif isinstance(c, p.Finished):
            self.finished = c.reason
            self.timers.clear()
        else:  # pragma: no cover - a new command the simulation must learn
            raise AssertionError(f"unknown command {c!r}")

    def _gone(self, conn: int, code: int | None, reason: str, dropped: bool) -> None:
        up = self.upstreams.get(conn)
        if up is None or not up.open:
            return
        up.open = False
        self.inbox.append(lambda: self.protocol.upstream_closed(conn, code, reason, dropped))

    # -- the network, as a test moves it ----------------------------------------------------------------------
    def complete_open(self, refuse: Refusal | None = None) -> list[p.Command]:
        c = self.opening.popleft()
        refusal = refuse
        if refusal is None and c.refuse is not None:
            refusal = Refusal(f"upstream answered HTTP {c.refuse} (injected)", c.refuse, injected=True)
        if refusal is None:
            answer = self.model.handshake()
            if answer is not None:
                ctype = dict((k.lower(), v) for k, v in answer.headers).get("content-type", "")
                refusal = Refusal(f"upstream answered HTTP {answer.status}", answer.status, answer.body, ctype,
                                  tuple(answer.headers))
        if refusal is not None:
            handshake = ev.Handshake("ws://upstream.test", c.purpose, None, False, refusal.status, 1.0, [],
                                     error=refusal.detail, injected=refusal.injected)
            return self.protocol.upstream_refused(c.conn, handshake, refusal)
        self.upstreams[c.conn] = Upstream(c.conn, self.model.connect("client-a"))
        return self.protocol.upstream_opened(c.conn, ev.Handshake("ws://upstream.test", c.purpose, c.conn, True, 101,
                                                                  1.0, []))

    def current(self) -> Upstream | None:
        conn = self.protocol.current
        return self.upstreams.get(conn.id) if conn is not None else None

    def deliver(self, lane: str | None = None, conn: int | None = None) -> dict[str, Any] | None:
        """The upstream sends the next event of ``lane`` (or an answer to a message) on ``conn`` (default: the
        current connection)."""
        up = self.upstreams.get(conn) if conn is not None else self.current()
        if up is None or not up.open or up.paused:
            return None
        event = up.model.next_event(lane)
        if event is None:
            return None
        text = json.dumps(event)
        self.feed(self.protocol.upstream_message(up.id, text))
        return event

    def ready_lanes(self) -> list[str | None]:
        up = self.current()
        if up is None or not up.open or up.paused:
            return []
        lanes = list(up.model.ready())
        if up.model.immediate and not lanes:
            lanes = [None]
        return lanes

    def run_upstream(self, limit: int = 10_000) -> None:
        """The upstream sends everything it has, lanes in turn."""
        for _ in range(limit):
            lanes = self.ready_lanes()
            if not lanes:
                return
            for lane in lanes:
                self.deliver(lane)

    def kill(self, how: str = "drop", conn: int | None = None) -> None:
        """The upstream connection dies: ``drop`` (TCP, no close frame), ``close`` (1011), or ``silence``."""
        up = self.upstreams.get(conn) if conn is not None else self.current()
        assert up is not None
        if how == "silence":
            up.paused = True
            return
        up.open = False
        self.feed_one(lambda: self.protocol.upstream_closed(up.id, None if how == "drop" else 1011,
                                                            "" if how == "drop" else "keepalive ping timeout",
                                                            dropped=how == "drop"))
        self.settle()

    def advance(self, seconds: float) -> None:
        """Time passes: due pings time out and due timers fire, in time order."""
        end = self.now + seconds
        while True:
            due = [(t, "ping", i) for i, (t, _, _) in enumerate(self.pings) if t <= end]
            due += [(t, "timer", k) for k, t in self.timers.items() if t <= end]
            if not due:
                break
            when, kind, what = min(due, key=lambda d: d[0])
            self.now = max(self.now, when)
            if kind == "ping":
                _, conn, purpose = self.pings.pop(what)
                self.feed(self.protocol.ping_result(conn, False, purpose))
            else:
                del self.timers[what]
                self.feed(self.protocol.timer_expired(what))
        self.now = end

    # -- the client ----------------------------------------------------------------------------------------------
    def send(self, message: dict[str, Any] | str) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        self.feed(self.protocol.client_message(text))

    def create(self, **body: Any) -> None:
        self.send({"type": "response.create", "model": "m", "store": False, **body})

    def leave(self) -> None:
        self.client_gone = True
        self.feed(self.protocol.client_gone("client closed (1000)"))

    def stop_answering_pings(self, timeout: float = 1.0) -> None:
        """The client keepalive's pong timeout ran out: the client is still connected and reads what it is sent."""
        self.pings_unanswered = True
        self.feed(self.protocol.client_unresponsive(timeout))

    # -- reading what happened ------------------------------------------------------------------------------------
    def terminals(self, lane: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.client if e.get("type") in TERMINAL and e.get("stream_id") == lane]

    def last_response(self, lane: str | None = None) -> dict[str, Any]:
        done = [e for e in self.terminals(lane) if e["type"] in ("response.completed", "response.incomplete")]
        assert done, f"no response ended on lane {lane}: {[e.get('type') for e in self.client]}"
        return done[-1]["response"]

    def creates_sent(self) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for up in self.upstreams.values():
            for text in up.sent:
                obj = json.loads(text)
                if obj.get("type") == "response.create":
                    out.append((up.id, obj))
        return out

    def of(self, kind: type) -> list[Any]:
        return [r for r in self.records if isinstance(r, kind)]


TERMINAL = {"response.completed", "response.failed", "response.incomplete", "error"}


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text}
