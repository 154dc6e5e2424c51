"""The turn protocol of one client session, with no I/O.

What each client message, upstream event, connection loss, handshake result, ping answer and timer means, and what
to do about it, lives here and only here. In the manner of h11's ``Connection`` and the ``websockets`` library's
protocol layer, :class:`Protocol` is fed inputs by a driver (:mod:`replayguard.proxy.session`, or a test) and
returns the commands the driver carries out: send upstream on connection N, send to the client, open an upstream
connection for a purpose, close or drop one, ping one, close the client with a code, arm or cancel a timer, emit a
record (:mod:`replayguard.core.events`). It never calls back into its driver, and it reads the time only through
the clock it was given.

The rules, in one place:

* **Lanes.** A create's ``stream_id`` names its lane (none: the default lane). Lanes run side by side on one
  connection; within a lane one turn runs at a time, and a create sent while its lane is busy waits for the turn in
  flight to end (the upstream would refuse it, or queue it). Every other client message goes upstream at once, in
  the order the client sent it.
* **Which event belongs to which turn.** ``response.created``/``response.queued`` acknowledge the oldest create
  sent on their lane; other events belong to their lane's turn. An ``error`` answers the oldest unacknowledged
  create of its lane, or, naming a lane, that lane's response; otherwise it answers some other message the client
  sent (an unknown event type, say): it is forwarded and ends no turn.
* **When a turn ends**: at its own terminal event (``response.completed``, ``response.incomplete``,
  ``response.failed``, or the error that answers it), when it is failed closed, or when the client leaves.
  Completed and incomplete responses join the chain; the connection's cache then holds that response for its lane.
* **Steering.** ``response.steer`` goes upstream at once; accepted input is part of the chain: a response that
  ends ``incomplete`` (reason ``steered``) is followed by an automatic successor that continues it with the steered
  input (a turn the client never created, recovered like any other), and input the upstream keeps pending is part of
  the next explicit create on that lane that continues the same response.
* **Liveness.** A dead connection is found by its close or drop (reported by the driver), by a ping before a
  continuation on a connection silent for ``ping_idle``, by a keepalive ping whenever it was silent for
  ``keepalive_interval``, and by no event within ``first_event_timeout`` of a turn being sent. An idle connection
  older than ``rotation_age`` is replaced before the next turn.
* **Recovery.** What to do with a turn whose connection is gone is :func:`~replayguard.core.recovery.decide`'s:
  resend, replay the full input on a fresh connection, or fail closed. ``previous_response_not_found`` and
  ``websocket_connection_limit_reached`` answering a turn that showed the client nothing are recovered, not
  forwarded.
* **Failing closed**: every turn in flight gets one structured error event (on its lane), then the client is closed
  with a non-1000 code. Nothing is sent upstream after the client left, and a connection that opens after that is
  closed unused.
"""

from __future__ import annotations

import enum
import itertools
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from . import errors
from . import events as ev
from .chain import Chain, Lane, RequestError, Turn, normalize_input, resolves
from .faults import FaultInjector, FaultKind, FaultRule, Fired
from .messages import is_delta, lane_of, parse
from .recovery import (Action, Decision, Policy, Refusal, Situation, Trigger, client_unresponsive, decide,
                       handshake_failed, internal_error, reloading, shutting_down)

Clock = Callable[[], float]

CONNECTION_FAULTS = frozenset({FaultKind.CLOSE, FaultKind.DROP, FaultKind.BLACKHOLE})
LIMIT_REACHED = "websocket_connection_limit_reached"
NEEDS_OUTPUT = frozenset({"function_call", "custom_tool_call", "local_shell_call"})  # calls the client answers
NOT_FOUND = "previous_response_not_found"


# -- commands -------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """Open upstream connection ``conn`` (its number in this session) for ``purpose`` (open, reconnect,
    recovery), and report :meth:`Protocol.upstream_opened` or :meth:`Protocol.upstream_refused`. ``refuse``: a
    fault rule refuses it with this HTTP status instead (nothing is dialed)."""

    conn: int
    purpose: str
    refuse: int | None = None


@dataclass(frozen=True, slots=True)
class SendUpstream:
    """Send on connection ``conn``: ``text`` as it is, or ``body`` serialised. ``recovered``: the record of the
    recovery this send carries out, emitted with ``sent``/``size`` filled in just before it goes."""

    conn: int
    text: str | bytes | None = None
    body: dict[str, Any] | None = None
    recovered: ev.Recovered | None = None
    turn: int | None = None  # the turn it sends (None: another client message)


@dataclass(frozen=True, slots=True)
class SendClient:
    text: str | bytes


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    """Close connection ``conn`` with a closing handshake (dropped if the upstream does not answer)."""

    conn: int
    code: int = 1000
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AbortUpstream:
    """Drop connection ``conn`` without a closing handshake (it is dead or silent, or a fault drops it)."""

    conn: int


@dataclass(frozen=True, slots=True)
class PauseUpstream:
    """Stop reading connection ``conn`` (a black-hole fault: events and pongs are never seen)."""

    conn: int


@dataclass(frozen=True, slots=True)
class Ping:
    """Ping connection ``conn``; report :meth:`Protocol.ping_result` (no pong within ``timeout`` is a failure)."""

    conn: int
    timeout: float
    purpose: str  # preflight | keepalive


@dataclass(frozen=True, slots=True)
class CloseClient:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Call :meth:`Protocol.timer_expired` with ``key`` after ``seconds`` (re-arming a key replaces it)."""

    key: tuple[Any, ...]
    seconds: float


@dataclass(frozen=True, slots=True)
class Emit:
    event: ev.Event


@dataclass(frozen=True, slots=True)
class Finished:
    """The session is over: cancel every timer, close what is still open, retire the chain."""

    reason: str


Command = Union[OpenUpstream, SendUpstream, SendClient, CloseUpstream, AbortUpstream, PauseUpstream, Ping,
                CloseClient, StartTimer, Emit, Finished]


# -- state ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Settings:
    """The timers and the recovery policy (rules.yaml's ``upstream`` and ``recovery``)."""

    ping_idle: float = 20.0
    ping_timeout: float = 2.0
    keepalive_interval: float = 15.0
    first_event_timeout: float = 10.0
    rotation_age: float = 3300.0
    policy: Policy = Policy.PAIR_AWARE
    max_retries: int = 1


class State(enum.Enum):
    OPENING = "opening"  # the first upstream handshake runs; the client has no 101 yet
    OPEN = "open"
    CLOSED = "closed"


class ConnState(enum.Enum):
    OPEN = "open"
    LOST = "lost"  # found dead; what was on it is being recovered
    RETIRED = "retired"  # replaced or finished on purpose; what it still says is ignored


class Phase(enum.Enum):
    QUEUED = "queued"  # in the outbox, to be sent in client order
    PREFLIGHT = "preflight"  # a ping must answer before it is sent
    RECOVERING = "recovering"  # waiting for a fresh connection
    SENT = "sent"  # sent (or expected: an automatic successor), no event yet
    STREAMING = "streaming"


@dataclass(eq=False)
class Conn:
    """What the protocol knows of one upstream connection."""

    id: int
    purpose: str
    opened_at: float
    last_heard: float
    state: ConnState = ConnState.OPEN
    lost: Trigger | None = None
    cache: dict[Lane, str] = field(default_factory=dict)  # the last response of each lane (connection-local)
    # Messages sent on it that the upstream has yet to answer, in send order: creates (answered by response.created,
    # response.queued or an error) and other messages an answer is due for (an error, or a steer's verdict).
    awaiting: list["Flight | Expect"] = field(default_factory=list)
    pinging: bool = False
    held: list[tuple[str | bytes, Any]] | None = None  # frames held back by a delay fault


@dataclass(eq=False)
class Flight:
    """A turn from its start to its end: where it is, and on which connection."""

    turn: Turn
    phase: Phase
    started: float
    conn: Conn | None = None
    checked: bool = False  # its preflight passed
    decision: Decision | None = None  # the recovery being carried out
    trigger: Trigger | None = None
    detail: str = ""
    from_conn: int | None = None
    sends: int = 0


@dataclass(eq=False)
class Forward:
    """A client message that goes upstream as it is (not a create), in client order."""

    text: str | bytes
    answer: str | None  # the answer it draws: steer | other (an error), or None


@dataclass(eq=False)
class Expect:
    """A client message other than a create that the upstream answers: a steer (accepted or failed), or one it
    rejects with an error (an unknown event type, a binary frame, text that is not JSON)."""

    kind: str  # steer | other


# Client messages the upstream accepts without answering.
UNANSWERED = frozenset({"response.processed"})


@dataclass(eq=False)
class Steer:
    previous_id: str
    items: list[dict[str, Any]]
    accepted: bool = False


@dataclass(eq=False)
class LaneState:
    key: Lane
    flight: Flight | None = None
    held: deque[tuple[dict[str, Any], str]] = field(default_factory=deque)  # creates waiting for this lane
    pending_steer: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # parent id -> queued input
    last: Turn | None = None  # the lane's last turn that joined the chain


_MISSING = object()


class Protocol:
    """One client session's turn protocol. Every input method returns the commands it produced, in order."""

    def __init__(self, chain: Chain, settings: Settings = Settings(), faults: FaultInjector | None = None,
                 clock: Clock | None = None) -> None:
        self.chain = chain
        self.settings = settings
        self.faults = faults
        self.clock: Clock = clock or (lambda: 0.0)
        self.state = State.OPENING
        self.conns: dict[int, Conn] = {}
        self.current: Conn | None = None
        self.opening: tuple[int, str] | None = None  # (conn, purpose) of the handshake in progress
        self.lanes: dict[Lane, LaneState] = {}
        self.outbox: deque[Flight | Forward] = deque()
        self.recovering: list[Flight] = []  # flights waiting for the connection being opened
        self.steers: list[Steer] = []
        self.recoveries = 0
        self.last_recovery: str | None = None
        self.failed_closed: Decision | None = None
        self.end_reason = ""
        self._conn_ids = itertools.count(1)
        self._later: list[Fired] = []  # connection faults of the session start, done once it is open
        self._out: list[Command] = []

    # ============================================================================================ inputs
    def start(self, url: str, client: str = "", rules: dict[str, Any] | None = None) -> list[Command]:
        """The session begins: open the first upstream connection (the client gets its 101 when it opened)."""
        with self._input():
            self._emit(ev.SessionStarted(url, client, rules))
            if self.faults is not None:  # rules firing at the start: armed kinds now, connection kinds once open
                for fired in self.faults.turn_completed(0):
                    if fired.rule.kind in CONNECTION_FAULTS:
                        self._later.append(fired)
                    else:
                        self._fire(fired, None)
            self._open("open")
        return self._take()

    def upstream_opened(self, conn_id: int, handshake: ev.Handshake) -> list[Command]:
        with self._input():
            purpose = self.opening[1] if self.opening is not None and self.opening[0] == conn_id else "reconnect"
            self.opening = None
            if self.state is State.CLOSED:  # the client left while it opened: it is not used
                self._cmd(CloseUpstream(conn_id, 1000, "client went away"))
                return self._take()
            self._emit(handshake)
            now = self.clock()
            conn = Conn(conn_id, purpose, now, now)
            self.conns[conn_id] = conn
            old = self.current
            if old is not None and old.state is ConnState.OPEN:
                old.state, old.lost = ConnState.RETIRED, None
                self._cmd(CloseUpstream(old.id, 1000, "replaced"))
            self.current = conn
            if self.state is State.OPENING:
                self.state = State.OPEN
                if self.settings.keepalive_interval > 0:
                    self._cmd(StartTimer(("keepalive",), self.settings.keepalive_interval))
                for fired in self._later:
                    self._fire(fired, conn)
                self._later.clear()
            self._send_recovering(conn)
            self._pump()
        return self._take()

    def upstream_refused(self, conn_id: int, handshake: ev.Handshake, refusal: Refusal) -> list[Command]:
        with self._input():
            self.opening = None
            if self.state is State.CLOSED:
                return self._take()
            self._emit(handshake)
            if self.state is State.OPENING:  # the client gets the refusal in place of its 101
                self._end(f"upstream handshake failed: {refusal.detail}")
                return self._take()
            waiting = self.recovering[0].trigger if self.recovering else None
            lost = self.current.lost if self.current is not None else None
            self._fail_closed(handshake_failed(waiting or lost or Trigger.CLOSED, refusal))
        return self._take()

    def client_message(self, text: str | bytes, obj: Any = _MISSING) -> list[Command]:
        """A message from the client. ``obj``: its JSON, when the driver parsed it already (a large one, in steps)."""
        with self._input():
            if self.state is not State.OPEN:
                return self._take()
            if obj is _MISSING:
                obj = parse(text) if isinstance(text, str) else None
            kind = obj.get("type") if isinstance(obj, dict) else None
            if kind == "response.create" and isinstance(text, str):
                lane = obj.get("stream_id")
                if lane is not None and not isinstance(lane, str):
                    self._forward(text)  # the upstream answers an unreadable stream_id itself
                    return self._take()
                state = self._lane(lane)
                if state.flight is not None or state.held:
                    state.held.append((obj, text))  # the lane is busy: in order, after the turn in flight
                else:
                    self._start_turn(state, obj, text)
                self._pump()
                return self._take()
            if kind == "response.steer" and isinstance(obj.get("previous_response_id"), str):
                try:
                    items = normalize_input(obj.get("input"))
                except RequestError:
                    items = []
                self.steers.append(Steer(obj["previous_response_id"], items))
            self._forward(text, kind)
        return self._take()

    def upstream_message(self, conn_id: int, text: str | bytes, obj: Any = _MISSING) -> list[Command]:
        """An upstream message on connection ``conn_id``. ``obj``: its JSON when the driver parsed it already."""
        self._out = []  # (the hot path: most of a stream is delta events)
        conn = self.conns.get(conn_id)
        if conn is None or conn is not self.current or conn.state is not ConnState.OPEN or \
                self.state is not State.OPEN:
            return self._take()  # a connection replaced, lost or retired: what it still says is not the chain's
        conn.last_heard = self.clock()
        if conn.held is not None:
            conn.held.append((text, obj))
            return self._take()
        if self.faults is not None and self.faults.delay and self._on(conn):
            delay = self.faults.take_delay()
            flight = self._on(conn)[0]
            self._emit(ev.FaultApplied("delay", f"first frame of turn {flight.turn.number} held {delay:g}s",
                                       flight.turn.number, conn.id))
            conn.held = [(text, obj)]
            self._cmd(StartTimer(("delay", conn.id), delay))
            return self._take()
        self._handle(conn, text, obj)
        return self._take()

    def upstream_closed(self, conn_id: int, code: int | None, reason: str = "", dropped: bool = False) -> list[Command]:
        """Connection ``conn_id`` ended: a close frame (``code``) or a drop (``dropped``: no close frame)."""
        with self._input():
            conn = self.conns.pop(conn_id, None)
            if conn is None:
                return self._take()
            if conn.state is ConnState.OPEN and self.state is State.OPEN:
                if dropped:
                    self._declare_lost(conn, Trigger.DROPPED, "no close frame (TCP dropped)")
                else:
                    self._declare_lost(conn, Trigger.CLOSED, f"close code {code} {reason or ''}".strip())
            why = conn.lost.value if conn.lost is not None else (reason or "closed")
            self._emit(ev.UpstreamClosed(conn.id, None if dropped else code, reason or why))
        return self._take()

    def ping_result(self, conn_id: int, ok: bool, purpose: str) -> list[Command]:
        with self._input():
            conn = self.conns.get(conn_id)
            if conn is None:
                return self._take()
            conn.pinging = False
            if ok:
                conn.last_heard = self.clock()
                head = self.outbox[0] if self.outbox else None  # a turn waiting on this pong (either purpose)
                if isinstance(head, Flight) and head.phase is Phase.PREFLIGHT:
                    head.phase, head.checked = Phase.QUEUED, True
                    self._pump()
                return self._take()
            if conn is not self.current or conn.state is not ConnState.OPEN or self.state is not State.OPEN:
                return self._take()
            timeout = self.settings.ping_timeout
            if purpose == "preflight":
                detail = f"no pong within {timeout:g}s"
            else:
                flights = self._on(conn)
                during = f" during turn {flights[0].turn.number}" if flights else ""
                detail = f"keepalive{during}: no pong within {timeout:g}s"
            self._cmd(AbortUpstream(conn.id))
            self._declare_lost(conn, Trigger.PING_TIMEOUT, detail)
        return self._take()

    def timer_expired(self, key: tuple[Any, ...]) -> list[Command]:
        with self._input():
            if self.state is not State.OPEN:
                return self._take()
            if key[0] == "keepalive":
                self._cmd(StartTimer(("keepalive",), self.settings.keepalive_interval))
                conn = self.current
                interval = self.settings.keepalive_interval
                if conn is not None and conn.state is ConnState.OPEN and not conn.pinging and \
                        self.clock() - conn.last_heard >= interval:
                    conn.pinging = True
                    self._cmd(Ping(conn.id, self.settings.ping_timeout, "keepalive"))
            elif key[0] == "first":
                _, number, sends = key
                flight = self._flight_by_number(number)
                if flight is not None and flight.phase is Phase.SENT and flight.sends == sends and \
                        flight.conn is self.current and flight.conn is not None and \
                        flight.conn.state is ConnState.OPEN:
                    timeout = self.settings.first_event_timeout
                    self._cmd(AbortUpstream(flight.conn.id))
                    self._declare_lost(flight.conn, Trigger.FIRST_EVENT_TIMEOUT,
                                       f"nothing within {timeout:g}s of sending the turn")
            elif key[0] == "delay":
                conn = self.conns.get(key[1])
                if conn is not None and conn.held is not None:
                    held, conn.held = conn.held, None
                    for text, obj in held:
                        if conn is self.current and conn.state is ConnState.OPEN and self.state is State.OPEN:
                            self._handle(conn, text, obj)
        return self._take()

    def client_gone(self, reason: str) -> list[Command]:
        """The client closed its connection (``reason`` says how)."""
        with self._input():
            if self.state is State.CLOSED:
                return self._take()
            for flight in self._flights():
                self.chain.abort(flight.turn)
                self._emit(ev.TurnEnded(flight.turn, None, None, ev.CLIENT_LEFT, self._ms(flight)))
            self._end(reason)
        return self._take()

    def client_unresponsive(self, timeout: float) -> list[Command]:
        """The client answered no ping within ``timeout``: it is gone. A turn in flight fails closed with a
        retryable error (never a silent end: a client that was only slow to answer learns why); an idle client is
        closed 1011."""
        with self._input():
            if self.state is State.CLOSED:
                return self._take()
            if self._flights():
                self._fail_closed(client_unresponsive(timeout))
            else:
                self._cmd(CloseClient(errors.CLOSE_INTERNAL, "client did not answer pings"))
                self._end("client stopped answering pings")
        return self._take()

    def shutdown(self, reloading_: bool = False) -> list[Command]:
        """The proxy stops (or the addon is reloaded): a turn in flight gets a retryable error; every client is
        closed (1001 going away; 1012 service restart for a reload); a silent upstream is dropped, not awaited."""
        with self._input():
            if self.state is State.CLOSED:
                return self._take()
            if self.current is not None and self.current.state is ConnState.OPEN:
                self.current.state = ConnState.RETIRED
                self._cmd(AbortUpstream(self.current.id))
            if self._flights():
                self._fail_closed(reloading() if reloading_ else shutting_down())
            elif reloading_:
                self._cmd(CloseClient(errors.CLOSE_SERVICE_RESTART, "replayguard reloaded; reconnect"))
                self._end("the addon was reloaded")
            else:
                self._cmd(CloseClient(errors.CLOSE_GOING_AWAY, "replayguard is shutting down"))
                self._end("the proxy shut down")
        return self._take()

    def crashed(self, where: str, exc: BaseException) -> list[Command]:
        """An exception in replayguard's own work (the driver's, or this object's): the session fails closed with
        an error that names where, and other sessions go on."""
        self._out = []
        if self.state is State.CLOSED:
            return []
        self._fail_closed(internal_error(where, exc))
        return self._take()

    def inject(self, rule: FaultRule) -> list[Command]:
        """A fault asked for now (mitmproxy's replayguard.fault command), carried out like one a rule fired."""
        with self._input():
            if self.faults is None:
                self.faults = FaultInjector([])
            fired = self.faults.fire_now(rule, self.chain.completed)
            self._fire(fired, self.current if rule.kind in CONNECTION_FAULTS else None)
        return self._take()

    # ============================================================================================ queries
    def turns_in_flight(self) -> list[Turn]:
        return [flight.turn for flight in self._flights()]

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # ============================================================================================ client side
    def _lane(self, key: Lane) -> LaneState:
        state = self.lanes.get(key)
        if state is None:
            state = self.lanes[key] = LaneState(key)
        return state

    def _start_turn(self, lane: LaneState, request: dict[str, Any], text: str) -> None:
        previous = request.get("previous_response_id")
        prepend = lane.pending_steer.pop(previous, None) if isinstance(previous, str) else None
        try:
            turn = self.chain.begin_turn(request, text, lane.key, prepend)
        except RequestError:
            self._forward(text)  # the upstream answers a create replayguard cannot read
            return
        flight = Flight(turn, Phase.QUEUED, self.clock())
        lane.flight = flight
        self._emit(ev.TurnStarted(turn, self.current.id if self.current is not None else None, len(text)))
        self.outbox.append(flight)

    def _forward(self, text: str | bytes, kind: Any = _MISSING) -> None:
        if kind is _MISSING:
            obj = parse(text) if isinstance(text, str) else None
            kind = obj.get("type") if isinstance(obj, dict) else None
        if not isinstance(kind, str):
            kind = None
        answer = None if kind in UNANSWERED else "steer" if kind == "response.steer" else "other"
        self.outbox.append(Forward(text, answer))
        self._pump()

    def _release(self, lane: LaneState) -> None:
        """The lane's turn ended: its next held create starts."""
        while lane.flight is None and lane.held and self.state is State.OPEN:
            request, text = lane.held.popleft()
            self._start_turn(lane, request, text)

    def _pump(self) -> None:
        """Send what the client sent, in its order, as far as the connection allows."""
        while self.outbox and self.state is State.OPEN:
            item = self.outbox[0]
            conn = self.current
            if isinstance(item, Flight):
                if item.phase is Phase.PREFLIGHT or self.recovering:
                    return
                if conn is None or conn.state is not ConnState.OPEN:
                    if conn is not None and self.opening is None:  # it died since: the turn is recovered
                        self.outbox.popleft()
                        self._recover([item], conn.lost or Trigger.CLOSED, "")
                        continue
                    if self.opening is None:
                        self._open("reconnect")
                    return
                if not item.checked:
                    verdict = self._preflight(item, conn)
                    if verdict == "wait":
                        return
                    if verdict == "rotated":
                        continue
                self.outbox.popleft()
                self._send(item, conn)
            else:
                if conn is None or conn.state is not ConnState.OPEN or self.recovering:
                    if self.opening is None and not self.recovering:
                        self._open("reconnect")
                    return
                self.outbox.popleft()
                if item.answer is not None:
                    conn.awaiting.append(Expect(item.answer))
                self._cmd(SendUpstream(conn.id, text=item.text))

    def _preflight(self, flight: Flight, conn: Conn) -> str:
        """Is ``conn`` fit for this turn? "go", "wait" (a ping is out), or "rotated" (replaced first)."""
        s = self.settings
        age = self.clock() - conn.opened_at
        if age >= s.rotation_age:
            conn.state, conn.lost = ConnState.RETIRED, Trigger.ROTATION
            self._emit(ev.UpstreamLost(conn.id, Trigger.ROTATION, f"age {age:.0f}s", flight.turn.number))
            self._cmd(CloseUpstream(conn.id, 1000, "rotated"))
            self.outbox.popleft()
            self._recover([flight], Trigger.ROTATION, "")
            return "rotated"
        if flight.turn.previous_id is not None and self.clock() - conn.last_heard >= s.ping_idle and \
                not conn.pinging:
            flight.phase = Phase.PREFLIGHT
            conn.pinging = True
            self._cmd(Ping(conn.id, s.ping_timeout, "preflight"))
            return "wait"
        if conn.pinging and flight.turn.previous_id is not None and self.clock() - conn.last_heard >= s.ping_idle:
            flight.phase = Phase.PREFLIGHT  # a keepalive ping is out: its answer decides
            return "wait"
        flight.checked = True
        return "go"

    def _send(self, flight: Flight, conn: Conn) -> None:
        """Send a turn on ``conn``: the client's create as it is, or rebuilt from the chain when the connection
        cannot resolve its previous_response_id (or for a recovery)."""
        turn = flight.turn
        text, body, recovered = self._payload(flight, conn)
        flight.phase, flight.conn, flight.decision = Phase.SENT, conn, None
        flight.sends += 1
        turn.events = 0
        conn.awaiting.append(flight)
        injected = self.faults.take_error(turn.previous_id) if self.faults is not None else None
        if injected is not None:
            # Answered as the upstream would, without sending: the error arrives on this connection.
            if recovered is not None:
                self._emit(recovered)
            self._emit(ev.FaultApplied("error", f"turn {turn.number} answered with {injected['error']['code']}",
                                       turn.number, conn.id))
            self._handle(conn, json.dumps(injected), injected)
            return
        self._cmd(SendUpstream(conn.id, text=text, body=body, recovered=recovered, turn=turn.number))
        self._cmd(StartTimer(("first", turn.number, flight.sends), self.settings.first_event_timeout))

    def _payload(self, flight: Flight, conn: Conn) -> tuple[str | None, dict[str, Any] | None, ev.Recovered | None]:
        """(text, body, record): what goes upstream for this turn on ``conn``."""
        turn = flight.turn
        decision = flight.decision
        if decision is not None:  # a recovery on this fresh connection
            body = turn.replay_request() if decision.action is Action.REPLAY else turn.resend_request()
            trigger = flight.trigger or Trigger.CLOSED
            self.recoveries += 1
            if trigger is not Trigger.ROTATION:
                self.last_recovery = f"turn {turn.number}: {trigger.value} -> {decision.action.value}"
            record = ev.Recovered(turn, trigger, decision, flight.from_conn, conn.id,
                                  body if decision.action is Action.REPLAY else None, 0, flight.detail)
            if decision.action is Action.SEND and not turn.automatic:
                return turn.raw, None, record
            return None, body, record
        if not resolves(turn, conn.cache.values()):
            # A client that reconnected, or a retry after an error: the connection does not hold the response.
            resume = decide(self._situation(turn, Trigger.RESUME, 0))
            if resume.action is Action.REPLAY:
                body = turn.replay_request()
                self.last_recovery = f"turn {turn.number}: resumed {turn.previous_id} from chain state"
                return None, body, ev.Recovered(turn, Trigger.RESUME, resume, conn.id, conn.id, body, 0)
        if turn.automatic:
            return None, turn.resend_request(), None
        return turn.raw, None, None

    # ============================================================================================ upstream side
    def _handle(self, conn: Conn, text: str | bytes, obj: Any) -> None:
        """One upstream message: whose it is, what it means for the chain, and whether the client sees it."""
        if obj is _MISSING:
            obj = None if not isinstance(text, str) or is_delta(text) else parse(text)
        if not isinstance(obj, dict):
            if len(self.lanes) == 1:
                lane = next(iter(self.lanes))
            else:
                lane = lane_of(text) if isinstance(text, str) else None
            flight = self._streaming(conn, lane)
            if flight is not None:
                self._event_of(flight)
                flight.turn.forwarded = True
            self._cmd(SendClient(text))
            return
        kind = obj.get("type")
        lane = obj.get("stream_id") if isinstance(obj.get("stream_id"), str) else None
        if kind == "error":
            self._error(conn, text, obj, lane)
            return
        if kind in ("response.created", "response.queued"):
            flight = self._acknowledge(conn, lane)
            if flight is None and kind == "response.created":
                flight = self._streaming(conn, lane)  # the successor a steered response announced
                if flight is not None and not (flight.turn.automatic and flight.phase is Phase.SENT):
                    flight = None
                if flight is None:
                    flight = self._unasked_successor(conn, lane)
        elif kind in ("response.steer.accepted", "response.steer.failed", "response.steer.pending"):
            self._steering(conn, kind, obj, lane)
            self._cmd(SendClient(text))
            return
        else:
            flight = self._streaming(conn, lane)
        if flight is None:
            self._cmd(SendClient(text))
            return
        self._event_of(flight)
        turn = flight.turn
        size = len(text)
        result = self.chain.on_event(turn, obj, size)
        turn.forwarded = True
        self._cmd(SendClient(text))
        if result is not None:
            self._ended(flight, conn, obj, result.ok)
            if result.evicted_bytes or result.evicted_records:
                self._emit(ev.ChainEvicted(turn.number, result.evicted_bytes, self.chain.max_chain_bytes,
                                           result.evicted_records))

    def _event_of(self, flight: Flight) -> None:
        flight.turn.events += 1
        flight.phase = Phase.STREAMING

    def _acknowledge(self, conn: Conn, lane: Lane) -> Flight | None:
        """The oldest create sent on ``lane`` that the upstream had not acknowledged yet (now it has)."""
        for entry in conn.awaiting:
            if isinstance(entry, Flight) and entry.turn.lane == lane:
                self._answered(conn, entry)
                return entry
        return None

    def _answered(self, conn: Conn, entry: "Flight | Expect") -> None:
        """``entry`` got its answer. The upstream answers messages in the order it reads them, so a message before
        it that still awaits an error never drew one (accepted as it was): it is settled too."""
        index = conn.awaiting.index(entry)
        conn.awaiting[:index + 1] = [e for e in conn.awaiting[:index] if isinstance(e, Flight)]

    def _answer_of_error(self, conn: Conn, lane: Lane, named: bool) -> Flight | Expect | None:
        """What an error answers: the oldest unanswered create of the lane it names; with no lane named, the oldest
        unanswered create of the default lane or other message, whichever was sent first."""
        for entry in conn.awaiting:
            if isinstance(entry, Flight) and entry.turn.lane == lane:
                return entry
            if not named and isinstance(entry, Expect) and entry.kind == "other":
                return entry
        return None

    def _streaming(self, conn: Conn, lane: Lane) -> Flight | None:
        state = self.lanes.get(lane)
        flight = state.flight if state is not None else None
        if flight is not None and flight.conn is conn and flight.phase in (Phase.SENT, Phase.STREAMING):
            return flight
        return None

    def _error(self, conn: Conn, text: str | bytes, event: dict[str, Any], lane: Lane) -> None:
        """An error event: whom it answers, whether it is recovered (swallowed) or forwarded, and what it ends."""
        answered = self._answer_of_error(conn, lane, "stream_id" in event)
        if answered is not None:
            self._answered(conn, answered)
        flight = answered if isinstance(answered, Flight) else None
        if answered is None and "stream_id" in event:
            flight = self._streaming(conn, lane)  # an error on a lane whose response streams: that response failed
        error = event.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        fields = _error_fields(event)
        if code == LIMIT_REACHED:  # the connection is finished: what it carried goes on elsewhere
            conn.state, conn.lost = ConnState.RETIRED, Trigger.CONNECTION_LIMIT
            self._cmd(CloseUpstream(conn.id, 1000, "connection limit"))
            if flight is not None and flight.turn.forwarded:
                self._forward_error(flight, conn, text, event)  # the client saw part of it: it sees the end too
            rest = self._on(conn)
            self._emit(ev.UpstreamLost(conn.id, Trigger.CONNECTION_LIMIT, fields, rest[0].turn.number if rest else None,
                                       by_error=True, raw=_text(text), events=rest[0].turn.events if rest else None))
            if rest:
                self._recover(rest, Trigger.CONNECTION_LIMIT, "")
            return
        if code == NOT_FOUND and flight is not None and not flight.turn.forwarded and flight.turn.base_known:
            conn.state, conn.lost = ConnState.RETIRED, Trigger.PREVIOUS_NOT_FOUND
            self._cmd(CloseUpstream(conn.id, 1000, "replaced"))
            self._emit(ev.UpstreamLost(conn.id, Trigger.PREVIOUS_NOT_FOUND, fields, flight.turn.number, by_error=True,
                                       raw=_text(text), events=flight.turn.events))
            others = [f for f in self._on(conn) if f is not flight]
            self._recover([flight, *others], Trigger.PREVIOUS_NOT_FOUND, "")
            return
        if flight is None:
            self._cmd(SendClient(text))  # it answers another message (an unknown event, a steer): no turn ends
            return
        self._forward_error(flight, conn, text, event)

    def _forward_error(self, flight: Flight, conn: Conn, text: str | bytes, event: dict[str, Any]) -> None:
        self._event_of(flight)
        flight.turn.forwarded = True
        result = self.chain.on_event(flight.turn, event, len(text))
        self._cmd(SendClient(text))
        if result is not None:
            self._ended(flight, conn, event, result.ok)

    def _ended(self, flight: Flight, conn: Conn, event: dict[str, Any], ok: bool) -> None:
        """A turn's own terminal event arrived (and went to the client)."""
        turn = flight.turn
        lane = self._lane(turn.lane)
        if lane.flight is flight:
            lane.flight = None
        if flight in conn.awaiting:
            conn.awaiting.remove(flight)
        if ok and turn.response_id is not None:
            conn.cache[turn.lane] = turn.response_id
            lane.last = turn
        else:
            conn.cache.pop(turn.lane, None)
        self._emit(ev.TurnEnded(turn, conn.id, event, None, self._ms(flight)))
        if ok and turn.status == "completed" and self.faults is not None:
            for fired in self.faults.turn_completed(self.chain.completed):
                self._fire(fired, conn)
        if turn.response_id is not None and self._successor_follows(turn, event):
            self._expect_successor(conn, lane, flight)
        self._release(lane)
        self._pump()

    # -- steering ---------------------------------------------------------------------------------------------
    def _steering(self, conn: Conn, kind: str, event: dict[str, Any], lane: Lane) -> None:
        found = event.get("steer")
        steer: dict[str, Any] = found if isinstance(found, dict) else {}
        # The verdict on a steer the client just sent: accepted, or failed before an id was given (a failure after
        # acceptance carries the steer's id and answers nothing new).
        if kind == "response.steer.accepted" or (kind == "response.steer.failed" and "id" not in steer):
            verdict = next((e for e in conn.awaiting if isinstance(e, Expect) and e.kind == "steer"), None)
            if verdict is not None:
                self._answered(conn, verdict)
        parent = steer.get("previous_response_id")
        match = next((s for s in self.steers if s.previous_id == parent and
                      (s.accepted or kind != "response.steer.pending")), None)
        if kind == "response.steer.accepted":
            if match is not None:
                match.accepted = True
        elif kind == "response.steer.failed":
            if match is not None:
                self.steers.remove(match)
            state = self.lanes.get(lane)
            flight = state.flight if state is not None else None
            if flight is not None and flight.turn.automatic and flight.turn.previous_id == parent and \
                    flight.phase is Phase.SENT and flight.turn.events == 0:
                # The successor the steered response announced will not come: nothing of it ever reached the client.
                if flight in conn.awaiting:
                    conn.awaiting.remove(flight)
                state.flight = None  # type: ignore[union-attr]
                flight.turn.status = "response.steer.failed"
                self.chain.abort(flight.turn)
                self._emit(ev.TurnEnded(flight.turn, conn.id, event, None, self._ms(flight)))
                self._release(state)  # type: ignore[arg-type]
        elif kind == "response.steer.pending" and match is not None and isinstance(parent, str):
            self.steers.remove(match)
            self._lane(lane).pending_steer.setdefault(parent, []).extend(match.items)

    def _successor_follows(self, turn: Turn, event: dict[str, Any]) -> bool:
        """The upstream starts a successor by itself after a response that ends ``incomplete`` because it was
        steered, and after one that completes with accepted steering input, unless it waits for client tool output
        (then the input stays queued: ``response.steer.pending``)."""
        if turn.status == "response.incomplete":
            return _incomplete_reason(event) == "steered"
        if turn.status != "completed":
            return False
        if not any(s.previous_id == turn.response_id and s.accepted for s in self.steers):
            return False
        return not any(isinstance(i, dict) and i.get("type") in NEEDS_OUTPUT for i in turn.outputs)

    def _accepted_for(self, parent: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for steer in [s for s in self.steers if s.previous_id == parent and s.accepted]:
            self.steers.remove(steer)
            items += steer.items
        return items

    def _expect_successor(self, conn: Conn, lane: LaneState, parent: Flight) -> None:
        """A response ended ``incomplete`` because it was steered: the upstream starts its successor by itself."""
        assert parent.turn.response_id is not None
        turn = self.chain.begin_successor(parent.turn, self._accepted_for(parent.turn.response_id))
        # Not among the messages awaiting an answer: nothing was sent for it; its response.created comes on the lane.
        flight = Flight(turn, Phase.SENT, self.clock(), conn=conn, checked=True, sends=1)
        lane.flight = flight
        self._emit(ev.TurnStarted(turn, conn.id, 0))
        self._cmd(StartTimer(("first", turn.number, flight.sends), self.settings.first_event_timeout))

    def _unasked_successor(self, conn: Conn, lane: Lane) -> Flight | None:
        """A response.created nobody asked for on an idle lane: the automatic successor of its last response (a
        completion followed by accepted steering input)."""
        state = self._lane(lane)
        parent = state.last
        if state.flight is not None or parent is None or parent.response_id is None:
            return None
        turn = self.chain.begin_successor(parent, self._accepted_for(parent.response_id))
        flight = Flight(turn, Phase.SENT, self.clock(), conn=conn, checked=True, sends=1)
        state.flight = flight
        self._emit(ev.TurnStarted(turn, conn.id, 0))
        return flight

    # ============================================================================================ loss & recovery
    def _declare_lost(self, conn: Conn, trigger: Trigger, detail: str) -> None:
        """``conn`` is dead: what was on it is recovered."""
        conn.state, conn.lost = ConnState.LOST, trigger
        if conn is not self.current:
            return
        flights = self._on(conn)
        head = self.outbox[0] if self.outbox else None
        if isinstance(head, Flight) and head.phase is Phase.PREFLIGHT:
            self.outbox.popleft()
            flights.append(head)
        first = flights[0] if flights else None
        self._emit(ev.UpstreamLost(conn.id, trigger, detail, first.turn.number if first else None,
                                   events=first.turn.events if first else None))
        if flights:
            self._recover(flights, trigger, detail)

    def _recover(self, flights: list[Flight], trigger: Trigger, detail: str) -> None:
        """Carry turns over to a fresh connection, or fail closed (the decision is :func:`decide`'s)."""
        try:
            self._carry_over(flights, trigger, detail)
        except Exception as e:
            e.replayguard_where = "recovery"  # type: ignore[attr-defined]  # named for the log and the client
            raise

    def _carry_over(self, flights: list[Flight], trigger: Trigger, detail: str) -> None:
        flights = sorted(flights, key=lambda f: f.turn.number)
        decisions = [decide(self._situation(f.turn, trigger, f.turn.attempts)) for f in flights]
        failing = next((d for d in decisions if d.fails), None)
        if failing is not None:
            self._fail_closed(failing)
            return
        old = self.current.id if self.current is not None else None
        for flight, decision in zip(flights, decisions):
            if flight.conn is not None and flight in flight.conn.awaiting:
                flight.conn.awaiting.remove(flight)
            if trigger is not Trigger.ROTATION:
                flight.turn.attempts += 1
            flight.phase, flight.conn = Phase.RECOVERING, None
            flight.decision, flight.trigger, flight.detail, flight.from_conn = decision, trigger, detail, old
            flight.checked = True
            self.recovering.append(flight)
        self.recovering.sort(key=lambda f: f.turn.number)
        if self.opening is None:
            self._open("recovery")

    def _send_recovering(self, conn: Conn) -> None:
        flights, self.recovering = self.recovering, []
        for flight in flights:
            if self.state is State.OPEN:
                self._send(flight, conn)

    def _situation(self, turn: Turn, trigger: Trigger, attempts: int) -> Situation:
        s = self.settings
        return Situation(trigger=trigger, policy=s.policy, attempts=attempts, max_retries=s.max_retries,
                         previous_id=turn.previous_id, previous_stored=turn.base_store, payload_input=turn.new_items,
                         replay=turn.full_input(), client_saw_output=turn.forwarded)

    def _open(self, purpose: str) -> None:
        conn = next(self._conn_ids)
        self.opening = (conn, purpose)
        refuse = self.faults.take_refusal() if self.faults is not None else None
        if refuse is not None:
            self._emit(ev.FaultApplied("refuse", f"upstream handshake refused with HTTP {refuse}", None, None))
        self._cmd(OpenUpstream(conn, purpose, refuse))

    def _fail_closed(self, decision: Decision) -> None:
        """Tell the client why (an upstream-shaped error event on every lane with a turn in flight), then close."""
        if self.state is State.CLOSED:
            return
        flights = self._flights()
        for flight in flights:
            self.chain.abort(flight.turn)
            self._emit(ev.TurnEnded(flight.turn, None, None, ev.FAILED_CLOSED, self._ms(flight)))
        first = flights[0].turn if flights else None
        self.failed_closed = decision
        self.last_recovery = f"turn {first.number if first is not None else '-'}: {decision.reason} -> failed closed"
        self._emit(ev.FailedClosed(first, decision))
        if decision.error is not None:
            lanes = sorted({f.turn.lane for f in flights}, key=lambda k: (k is not None, k or "")) or [None]
            for lane in lanes:
                event = dict(decision.error, stream_id=lane) if lane is not None else decision.error
                self._cmd(SendClient(json.dumps(event)))
        self._cmd(CloseClient(decision.close_code, decision.close_reason))
        self._end(f"failed closed: {decision.reason}")

    def _end(self, reason: str) -> None:
        """The session is over: upstream connections closed (a response still being generated stops), records."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.end_reason = reason
        for conn in list(self.conns.values()):
            if conn.state is ConnState.OPEN:  # closed now, so the records end with it (not after the session's end)
                conn.state = ConnState.RETIRED
                del self.conns[conn.id]
                self._cmd(CloseUpstream(conn.id, 1000, "client went away"))
                self._emit(ev.UpstreamClosed(conn.id, 1000, "client went away"))
        self.outbox.clear()
        self.recovering.clear()
        for lane in self.lanes.values():
            lane.flight = None
            lane.held.clear()
        self._emit(ev.SessionEnded(self.chain.completed, self.chain.failed, self.recoveries, reason))
        self._cmd(Finished(reason))

    # ============================================================================================ faults
    def _fire(self, fired: Fired, conn: Conn | None) -> None:
        """A fault rule fired: done to ``conn`` (the kinds the injector arms only need the record)."""
        self._emit(ev.FaultFired(fired, conn.id if conn is not None else None))
        if conn is None or conn.state is not ConnState.OPEN:
            return
        kind = fired.rule.kind
        if kind is FaultKind.CLOSE:
            self._cmd(CloseUpstream(conn.id, fired.rule.code, "replayguard fault injection"))
        elif kind is FaultKind.DROP:
            self._cmd(AbortUpstream(conn.id))
        elif kind is FaultKind.BLACKHOLE:
            self._cmd(PauseUpstream(conn.id))

    # ============================================================================================ helpers
    def _flights(self) -> list[Flight]:
        """Every turn in flight, in the order they started."""
        flights = [lane.flight for lane in self.lanes.values() if lane.flight is not None]
        return sorted(flights, key=lambda f: f.turn.number)

    def _flight_by_number(self, number: int) -> Flight | None:
        return next((f for f in self._flights() if f.turn.number == number), None)

    def _on(self, conn: Conn) -> list[Flight]:
        """The turns sent on ``conn`` and not ended."""
        return [f for f in self._flights() if f.conn is conn and f.phase in (Phase.SENT, Phase.STREAMING)]

    def _ms(self, flight: Flight) -> float:
        return round((self.clock() - flight.started) * 1000, 1)

    def _emit(self, event: ev.Event) -> None:
        self._out.append(Emit(event))

    def _cmd(self, command: Command) -> None:
        self._out.append(command)

    def _take(self) -> list[Command]:
        out, self._out = self._out, []
        return out

    def _input(self) -> "_Input":
        return _Input(self)


class _Input:
    """Brackets one input: the commands of an earlier input that raised are not carried over."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol

    def __enter__(self) -> None:
        self.protocol._out = []

    def __exit__(self, *exc: Any) -> None:
        return None


def _error_fields(event: dict[str, Any]) -> Any:
    error = event.get("error")
    if not isinstance(error, dict):
        return {"status": event.get("status")}
    return {"status": event.get("status"), "type": error.get("type"), "code": error.get("code"),
            "message": error.get("message"), "param": error.get("param")}


def _incomplete_reason(event: dict[str, Any]) -> str | None:
    response = event.get("response")
    details = response.get("incomplete_details") if isinstance(response, dict) else None
    reason = details.get("reason") if isinstance(details, dict) else None
    return reason if isinstance(reason, str) else None


def _text(text: str | bytes) -> str:
    return text if isinstance(text, str) else text.decode("utf-8", "replace")
