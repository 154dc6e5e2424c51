"""What a person watching mitmdump is told about a session: one log line per recovery, loss, fault and fail-close
(what mitmweb shows is :mod:`replayguard.proxy.flowview`'s)."""

from __future__ import annotations

import logging
from typing import Any

from ..core import events as ev
from ..core.recovery import Trigger

log = logging.getLogger(__name__)


class SessionLog:
    """Log lines for one session's events."""

    def __init__(self, flow_id: str) -> None:
        self.flow_id = flow_id

    def __call__(self, event: ev.Event) -> None:
        handler = _LOG.get(type(event))
        if handler is not None:
            handler(self, event)

    def _turn_ended(self, e: ev.TurnEnded) -> None:
        if e.reason == ev.CLIENT_LEFT:
            log.info("flow %s: client left mid-turn; upstream response stopped", self.flow_id)

    def _upstream_lost(self, e: ev.UpstreamLost) -> None:
        if e.turn is not None or e.how is Trigger.ROTATION:
            return  # the recovery of the turn in flight says what happened
        if e.by_error:
            log.info("flow %s: %s while idle; next turn reconnects", self.flow_id, e.how.value)
        else:
            log.info("flow %s: upstream connection lost while idle (%s: %s); next turn reconnects",
                     self.flow_id, e.how.value, e.detail)

    def _recovered(self, e: ev.Recovered) -> None:
        if e.trigger is Trigger.RESUME:
            log.info("flow %s turn %d: previous_response_id %s is not on this upstream connection -> replayed full "
                     "input (%d items)", self.flow_id, e.turn.number, e.turn.previous_id,
                     len(e.body["input"]) if e.body is not None else 0)
            return
        level = logging.DEBUG if e.trigger is Trigger.ROTATION else logging.INFO
        log.log(level, "flow %s turn %d: %s%s -> %s (upstream #%s)", self.flow_id, e.turn.number, e.trigger.value,
                f" ({e.detail})" if e.detail else "", e.decision.action.value, e.to_conn)

    def _failed_closed(self, e: ev.FailedClosed) -> None:
        number = e.turn.number if e.turn is not None else "-"
        log.warning("flow %s turn %s: %s -> failed closed (close %d)", self.flow_id, number, e.decision.reason,
                    e.decision.close_code)

    def _fault_fired(self, e: ev.FaultFired) -> None:
        log.warning("flow %s: injected fault after turn %d: %s", self.flow_id, e.fired.after_turn,
                    e.fired.rule.describe())

    def _fault_applied(self, e: ev.FaultApplied) -> None:
        log.warning("flow %s: injected fault: %s", self.flow_id, e.detail)

    def _chain_evicted(self, e: ev.ChainEvicted) -> None:
        if e.chain_bytes:
            log.warning("flow %s turn %d: chain history reached %d bytes (max_chain_bytes %d): evicted, no longer "
                        "replayable", self.flow_id, e.turn, e.chain_bytes, e.max_chain_bytes)
        if e.records:
            log.info("replayguard: evicted %d saved response(s) (max_saved_responses)", e.records)


_LOG: dict[type, Any] = {
    ev.TurnEnded: SessionLog._turn_ended,
    ev.UpstreamLost: SessionLog._upstream_lost,
    ev.Recovered: SessionLog._recovered,
    ev.FailedClosed: SessionLog._failed_closed,
    ev.FaultFired: SessionLog._fault_fired,
    ev.FaultApplied: SessionLog._fault_applied,
    ev.ChainEvicted: SessionLog._chain_evicted,
}
