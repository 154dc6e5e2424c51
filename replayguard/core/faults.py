"""Fault injection: reproduce production failures on purpose, against any upstream (rules.yaml ``faults``).

A rule fires after a session's Nth completed turn (``after_turn``), or after every completed turn with a
probability drawn from a seeded generator (``probability``, ``seed``), at most ``times`` times per session.
What it does is carried out by the bridge on the real connections; this module only decides when and what, and
builds the upstream-shaped error events, so it stays free of I/O.

Kinds:
  close      close the upstream connection with ``code`` (the session sees the upstream close)
  drop       cut the upstream TCP connection without a close frame
  blackhole  stop reading the upstream connection: pings go unanswered and events are never seen
  refuse     fail the next ``count`` upstream handshakes with HTTP ``status``
  error      answer the next response.create with the upstream ``error`` event ``error``
             (previous_response_not_found, websocket_connection_limit_reached, server_error) instead of sending it
  delay      hold the first upstream frame of the next turn for ``seconds``
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Any


class FaultKind(str, enum.Enum):
    CLOSE = "close"
    DROP = "drop"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"
    ERROR = "error"
    DELAY = "delay"


class InjectedError(str, enum.Enum):
    PREVIOUS_NOT_FOUND = "previous_response_not_found"
    CONNECTION_LIMIT = "websocket_connection_limit_reached"
    SERVER_ERROR = "server_error"


@dataclass(frozen=True, slots=True, eq=False)
class FaultRule:
    """One ``faults`` entry of rules.yaml (validated by :mod:`replayguard.rules`)."""

    kind: FaultKind
    after_turn: int | None = None
    probability: float | None = None
    seed: int = 0
    times: int | None = None  # per session; default 1 with after_turn, unlimited with probability
    code: int = 1011  # close
    status: int = 503  # refuse
    count: int = 1  # refuse
    error: InjectedError = InjectedError.SERVER_ERROR
    seconds: float = 1.0  # delay
    match: Any = None  # a rules.MatchRule scoping the fault to some flows, or None for all
    line: int | None = None  # where in rules.yaml, for logs and traces
    origin: str | None = None  # what else made it, when not rules.yaml (e.g. "command")

    @property
    def limit(self) -> int | None:
        if self.times is not None:
            return self.times
        return 1 if self.probability is None else None

    def describe(self) -> str:
        what = {
            FaultKind.CLOSE: f"close upstream with {self.code}",
            FaultKind.DROP: "drop upstream TCP",
            FaultKind.BLACKHOLE: "black-hole upstream",
            FaultKind.REFUSE: f"refuse next {self.count} handshake(s) with HTTP {self.status}",
            FaultKind.ERROR: f"answer next turn with {self.error.value}",
            FaultKind.DELAY: f"delay next turn's first frame {self.seconds:g}s",
        }[self.kind]
        if self.line is not None:
            return f"{what} (rules line {self.line})"
        return f"{what} ({self.origin})" if self.origin else what


@dataclass(frozen=True, slots=True)
class Fired:
    """A fault that fires now: the bridge carries it out and logs and traces it as injected."""

    rule: FaultRule
    after_turn: int


class FaultInjector:
    """The fault rules that apply to one session, and what they have armed."""

    def __init__(self, rules: list[FaultRule]) -> None:
        self.rules = rules
        # A generator per session and rule, seeded by the rule: which turns a probability rule hits is the same in
        # every session, whatever other sessions do meanwhile (a shared one would depend on timing).
        self.rngs = [random.Random(rule.seed) for rule in rules]
        self.fired: dict[int, int] = {}  # rule index -> times fired in this session
        self.refusals: list[int] = []  # statuses of handshakes still to refuse
        self.error: InjectedError | None = None  # answers the next response.create
        self.delay: float = 0.0  # holds the first frame of the next turn

    def turn_completed(self, completed: int) -> list[Fired]:
        """The session completed its ``completed``-th turn (0: the session starts): which faults fire now."""
        out = []
        for index, rule in enumerate(self.rules):
            fired = self.fired.get(index, 0)
            if rule.limit is not None and fired >= rule.limit:
                continue
            if rule.probability is not None:
                if completed < (rule.after_turn if rule.after_turn is not None else 1):
                    continue
                if self.rngs[index].random() >= rule.probability:
                    continue
            elif rule.after_turn != completed:
                continue
            self.fired[index] = fired + 1
            self.arm(rule)
            out.append(Fired(rule, completed))
        return out

    def fire_now(self, rule: FaultRule, completed: int) -> Fired:
        """A fault asked for on a live session (not by a rule's schedule): armed now, as if it fired."""
        self.arm(rule)
        return Fired(rule, completed)

    def arm(self, rule: FaultRule) -> None:
        if rule.kind is FaultKind.REFUSE:
            self.refusals.extend([rule.status] * rule.count)
        elif rule.kind is FaultKind.ERROR:
            self.error = rule.error
        elif rule.kind is FaultKind.DELAY:
            self.delay = rule.seconds

    def take_refusal(self) -> int | None:
        return self.refusals.pop(0) if self.refusals else None

    def take_error(self, previous_id: str | None) -> dict[str, Any] | None:
        kind, self.error = self.error, None
        return None if kind is None else upstream_error(kind, previous_id)

    def take_delay(self) -> float:
        delay, self.delay = self.delay, 0.0
        return delay


def upstream_error(kind: InjectedError, previous_id: str | None = None) -> dict[str, Any]:
    """The error event the upstream itself sends for ``kind`` (same shape, status and code)."""
    if kind is InjectedError.PREVIOUS_NOT_FOUND:
        return {"type": "error", "status": 400, "error": {
            "type": "invalid_request_error", "code": "previous_response_not_found",
            "message": f"Previous response with id '{previous_id}' not found.", "param": "previous_response_id"}}
    if kind is InjectedError.CONNECTION_LIMIT:
        return {"type": "error", "status": 400, "error": {
            "type": "invalid_request_error", "code": "websocket_connection_limit_reached",
            "message": "Responses websocket connection limit reached (60 minutes). Create a new websocket "
                       "connection to continue.", "param": None}}
    return {"type": "error", "status": 500, "error": {
        "type": "server_error", "code": "server_error",
        "message": "The server had an error while processing your request. Sorry about that!", "param": None}}
