"""What a person watching mitmdump is told about a session: one log line per recovery, loss, fault and fail-close
(what mitmweb shows is :mod:`replayguard.proxy.flowview`'s)."""

from __future__ import annotations

import logging
from typing import Any, Iterable

from ..core import events as ev
from ..core.recovery import Trigger
from ..core.redact import scrub

log = logging.getLogger(__name__)


class SessionLog:
    """Log lines for one session's events."""

    def __init__(self, flow_id: str, secrets: Iterable[str] = ()) -> None:
        self.flow_id = flow_id
        self.secrets = list(secrets)  # the session's credential values: never in a log line

    def __call__(self, event: ev.Event) -> None:
        handler = _LOG.get(type(event))
        if handler is not None:
            handler(self, event)

    def _log(self, level: int, fmt: str, *args: Any) -> None:
        if log.isEnabledFor(level):
            log.log(level, "%s", scrub(fmt % args, self.secrets))

    def _turn_ended(self, e: ev.TurnEnded) -> None:
        if e.reason == ev.CLIENT_LEFT:
            self._log(logging.INFO, "flow %s: client left mid-turn; upstream response stopped", self.flow_id)

    def _upstream_lost(self, e: ev.UpstreamLost) -> None:
        if e.turn is not None or e.how is Trigger.ROTATION:
            return  # the recovery of the turn in flight says what happened
        if e.by_error:
            self._log(logging.INFO, "flow %s: %s while idle; next turn reconnects", self.flow_id, e.how.value)
        else:
            self._log(logging.INFO, "flow %s: upstream connection lost while idle (%s: %s); next turn reconnects",
                      self.flow_id, e.how.value, e.detail)

    def _recovered(self, e: ev.Recovered) -> None:
        if e.trigger is Trigger.RESUME:
            self._log(logging.INFO, "flow %s turn %d: previous_response_id %s is not on this upstream connection -> "
                      "replayed full input (%d items)", self.flow_id, e.turn.number, e.turn.previous_id,
                      len(e.body["input"]) if e.body is not None else 0)
            return
        level = logging.DEBUG if e.trigger is Trigger.ROTATION else logging.INFO
        self._log(level, "flow %s turn %d: %s%s -> %s (upstream #%s)", self.flow_id, e.turn.number, e.trigger.value,
                  f" ({e.detail})" if e.detail else "", e.decision.action.value, e.to_conn)

    def _failed_closed(self, e: ev.FailedClosed) -> None:
        number = e.turn.number if e.turn is not None else "-"
        self._log(logging.WARNING, "flow %s turn %s: %s -> failed closed (close %d)", self.flow_id, number,
                  e.decision.reason, e.decision.close_code)

    def _fault_fired(self, e: ev.FaultFired) -> None:
        self._log(logging.WARNING, "flow %s: injected fault after turn %d: %s", self.flow_id, e.fired.after_turn,
                  e.fired.rule.describe())

    def _fault_applied(self, e: ev.FaultApplied) -> None:
        self._log(logging.WARNING, "flow %s: injected fault: %s", self.flow_id, e.detail)

    def _chain_evicted(self, e: ev.ChainEvicted) -> None:
        if e.chain_bytes:
            self._log(logging.WARNING, "flow %s turn %d: chain history reached %d bytes (max_chain_bytes %d): "
                      "evicted, no longer replayable", self.flow_id, e.turn, e.chain_bytes, e.max_chain_bytes)
        if e.records:
            self._log(logging.INFO, "replayguard: evicted %d saved response(s) (max_saved_responses)", e.records)


_LOG: dict[type, Any] = {
    ev.TurnEnded: SessionLog._turn_ended,
    ev.UpstreamLost: SessionLog._upstream_lost,
    ev.Recovered: SessionLog._recovered,
    ev.FailedClosed: SessionLog._failed_closed,
    ev.FaultFired: SessionLog._fault_fired,
    ev.FaultApplied: SessionLog._fault_applied,
    ev.ChainEvicted: SessionLog._chain_evicted,
}
