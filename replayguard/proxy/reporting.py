"""What a person watching mitmdump or mitmweb is told about a session: one log line per recovery, loss, fault
and fail-close, and in mitmweb a marker and a comment line on the flow."""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..core import events as ev
from ..core.recovery import Trigger

log = logging.getLogger(__name__)

# notify(flow id, kind, text): kind is "recovered", "failed" or "info"
Notify = Callable[[str, str, str], None]


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


class FlowNotes:
    """Recoveries, fail-closes and injected faults as mitmweb markers and comment lines on the session's flow."""

    def __init__(self, flow_id: str, notify: Notify) -> None:
        self.flow_id = flow_id
        self.notify = notify

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.Recovered):
            turn = event.turn
            if event.trigger is Trigger.RESUME:
                self.notify(self.flow_id, "recovered", f"turn {turn.number}: resumed {turn.previous_id} from chain state")
            elif event.trigger is not Trigger.ROTATION:
                self.notify(self.flow_id, "recovered",
                            f"turn {turn.number}: {event.trigger.value} -> {event.decision.action.value}")
        elif isinstance(event, ev.FailedClosed):
            number = event.turn.number if event.turn is not None else "-"
            self.notify(self.flow_id, "failed", f"turn {number}: {event.decision.reason} -> failed closed")
        elif isinstance(event, ev.FaultFired):
            self.notify(self.flow_id, "info",
                        f"injected fault after turn {event.fired.after_turn}: {event.fired.rule.describe()}")
