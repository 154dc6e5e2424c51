"""mitmproxy commands: inject a fault into a live session, and list the live sessions.

From the console's prompt (``:replayguard.fault @focus drop``) or mitmweb's command bar / REST API
(``POST /commands/replayguard.fault`` with ``{"arguments": ["@<flow id>", "drop"]}``). A fault from a command is
carried out, logged, traced and marked in mitmweb exactly like one a rule fired. mitmdump has no way to run a
command from outside; there, fault rules in rules.yaml do the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mitmproxy import command, exceptions, flow

from ..core.faults import FaultKind, FaultRule, InjectedError
from .live import Live
from .rules import FAULT_KEYS

VALUE_HELP = {
    FaultKind.CLOSE: "the close code (default 1011)",
    FaultKind.REFUSE: "STATUS[:COUNT], the HTTP status of the next COUNT handshakes (default 503:1)",
    FaultKind.ERROR: f"one of {', '.join(e.value for e in InjectedError)} (default server_error)",
    FaultKind.DELAY: "seconds the next turn's first frame is held (default 1)",
}


def fault_rule(kind: str, value: str = "") -> FaultRule:
    """The fault a command asks for, checked as rules.yaml checks a fault rule (raises CommandError)."""
    try:
        fault_kind = FaultKind(kind)
    except ValueError:
        raise exceptions.CommandError(f"unknown fault kind {kind!r}: one of {', '.join(k.value for k in FaultKind)}")
    fields: dict[str, Any] = {}
    value = value.strip()
    try:
        if value and fault_kind not in VALUE_HELP:
            raise ValueError(f"{kind} takes no value")
        if value and fault_kind is FaultKind.CLOSE:
            fields["code"] = FAULT_KEYS["code"](_int(value))
        elif value and fault_kind is FaultKind.REFUSE:
            status, _, count = value.partition(":")
            fields["status"] = FAULT_KEYS["status"](_int(status))
            if count:
                fields["count"] = FAULT_KEYS["count"](_int(count))
        elif value and fault_kind is FaultKind.ERROR:
            fields["error"] = FAULT_KEYS["error"](value)
        elif value and fault_kind is FaultKind.DELAY:
            fields["seconds"] = FAULT_KEYS["seconds"](float(value))
    except ValueError as e:
        hint = f"; the value is {VALUE_HELP[fault_kind]}" if fault_kind in VALUE_HELP else ""
        raise exceptions.CommandError(f"replayguard.fault {kind} {value}: {e}{hint}") from None
    return FaultRule(fault_kind, origin="command", **fields)


def _int(text: str) -> int:
    return int(text)


class SessionCommands:
    def __init__(self, sessions: Mapping[str, Live]) -> None:
        self.live = sessions  # the addon's live sessions, by flow id

    @command.command("replayguard.kinds")
    def kinds(self) -> Sequence[str]:
        """The fault kinds replayguard.fault takes."""
        return [k.value for k in FaultKind]

    @command.command("replayguard.fault")
    def fault(self, flows: Sequence[flow.Flow], kind: str, value: str = "") -> str:
        """Inject a fault into the live replayguard sessions of these flows now: close [CODE], drop, blackhole,
        refuse [STATUS[:COUNT]], error [previous_response_not_found|websocket_connection_limit_reached|
        server_error], delay [SECONDS]. (KIND is checked here, not typed as a mitmproxy Choice, so that a wrong
        one is answered with the kinds instead of mitmproxy's bare 'Invalid choice.'; replayguard.kinds lists them.)"""
        rule = fault_rule(kind, value)
        done = []
        for f in flows:
            live = self.live.get(f.id)
            if live is not None and not live.session.closed:
                live.session.inject(rule)
                done.append(f.id)
        if not done:
            raise exceptions.CommandError("none of these flows is a live replayguard session "
                                          "(replayguard.sessions lists them)")
        return f"injected {rule.describe()} into {len(done)} session(s): {', '.join(done)}"

    @command.command("replayguard.sessions")
    def sessions(self) -> Sequence[str]:
        """The live replayguard sessions: flow, upstream, turns, the current upstream connection, the last
        recovery."""
        return [live.session.describe() for live in self.live.values()]
