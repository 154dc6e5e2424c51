"""What a session's flow shows (replayguard.proxy.flowview) and the mitmproxy commands (replayguard.proxy.commands),
with mitmproxy's own test helpers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from mitmproxy import exceptions
from mitmproxy.addons.view import View
from mitmproxy.test import taddons, tflow

from replayguard.core import events as ev
from replayguard.core.chain import Chain, ChainStore
from replayguard.core.faults import FaultKind, FaultRule, Fired, InjectedError
from replayguard.core.records import records_in_flow
from replayguard.core.recovery import Action, Decision, Trigger
from replayguard.proxy.addon import ReplayGuard
from replayguard.proxy.live import Live
from replayguard.proxy.commands import SessionCommands, fault_rule
from replayguard.proxy.destination import Destination
from replayguard.proxy.flowview import MARK_FAILED, MARK_FAULT, MARK_RECOVERED, MAX_COMMENT_LINES, FlowView

DEST = Destination(secure=True, address=("104.18.33.45", 443), server_name="api.openai.com",
                   host_header="api.openai.com", path="/v1/responses")


def a_turn(chain: Chain, previous: str | None = None):
    request = {"type": "response.create", "model": "m", "store": False,
               "input": [{"type": "function_call_output", "call_id": "call_1", "output": "x"}]}
    if previous:
        request["previous_response_id"] = previous
    return chain.begin_turn(request, json.dumps(request))


def handshake(conn: int, purpose: str = "open") -> ev.Handshake:
    return ev.Handshake("wss://api.openai.com/v1/responses", purpose, conn, True, 101, 12.5,
                        [("Authorization", "Bearer sk-SECRETxxxxxxxxxxxx")], [], peer=("104.18.33.45", 443),
                        local=("10.0.0.2", 50000), tls={"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384",
                                                        "sni": "api.openai.com"})


def kept(flow) -> list[dict]:
    return records_in_flow(flow.websocket.messages)


def test_records_before_the_websocket_go_first_and_turn_records_are_not_repeated():
    flow = tflow.twebsocketflow()
    client_messages = list(flow.websocket.messages)
    websocket, flow.websocket = flow.websocket, None  # as in the request hook: no WebSocket yet
    view = FlowView(flow, DEST)
    view(ev.SessionStarted("wss://api.openai.com/v1/responses", "127.0.0.1:5000"))
    view(handshake(1))
    flow.websocket = websocket
    view.attach()
    chain = Chain(ChainStore())
    turn = a_turn(chain)
    view(ev.TurnStarted(turn, 1, 100))  # the client's own create is in the flow already
    view(ev.UpstreamLost(1, Trigger.DROPPED, "no close frame (TCP dropped)", None))
    view(ev.UpstreamClosed(1, None, "upstream connection dropped"))
    records = kept(flow)
    assert [r["event"] for r in records] == ["session.start", "handshake", "upstream.lost", "upstream.closed"]
    assert flow.websocket.messages[2:2 + len(client_messages)] == client_messages  # the client's, untouched, between
    assert all(m.injected for m in flow.websocket.messages if m.content.startswith(b'{"type": "replayguard.'))
    assert not any(m.injected for m in client_messages)
    assert records[1]["headers"]["authorization"].startswith("Bearer [redacted sha256:")  # no secret in the flow
    assert records[0]["type"] == "replayguard.session.start" and records[0]["session"] == flow.id


def test_a_replay_is_kept_as_sent_and_a_consumed_error_as_received():
    flow = tflow.twebsocketflow()
    chain = Chain(ChainStore())
    turn = a_turn(chain, previous="resp_1")
    sent = {"type": "response.create", "model": "m", "input": [{"type": "function_call", "call_id": "call_1"},
                                                               {"type": "function_call_output", "call_id": "call_1"}]}
    error = {"type": "error", "status": 400, "error": {"code": "previous_response_not_found", "message": "gone"}}
    view = FlowView(flow, DEST)
    view(ev.UpstreamLost(1, Trigger.PREVIOUS_NOT_FOUND, {"code": "previous_response_not_found"}, turn.number,
                         by_error=True, raw=json.dumps(error)))
    decision = Decision(Action.REPLAY, "replayable")
    view(ev.Recovered(turn, Trigger.PREVIOUS_NOT_FOUND, decision, 1, 2, sent, 200, sent=json.dumps(sent)))
    lost, recovery = kept(flow)
    assert lost["message"] == error  # what replayguard consumed instead of forwarding
    assert recovery["sent"] == sent and recovery["removed_previous_response_id"] == "resp_1"
    sent_message = flow.websocket.messages[-1]
    assert sent_message.from_client and sent_message.injected  # upstream-bound, not from the client
    assert not flow.websocket.messages[-2].from_client


def test_the_server_connection_shows_the_upstream_not_the_bridge():
    flow = tflow.twebsocketflow()
    flow.server_conn.address = ("127.0.0.1", 41234)  # the loopback bridge
    view = FlowView(flow, DEST)
    view(handshake(1))
    server = flow.server_conn
    assert server.address == ("104.18.33.45", 443) and server.sni == "api.openai.com"
    assert server.peername == ("104.18.33.45", 443) and server.tls and server.tls_version == "TLSv1.3"
    view(handshake(2, "recovery"))
    assert flow.server_conn is not server  # the newest connection, a fresh description
    via = FlowView(flow, Destination(True, ("api.openai.com", 443), "api.openai.com", "api.openai.com", "/",
                                     via=("http", ("corp", 3128))))
    via(handshake(3))
    assert flow.server_conn.via == ("http", ("corp", 3128))


def test_comment_lines_read_on_their_own_and_marks_follow_the_worst():
    flow = tflow.twebsocketflow()
    view = FlowView(flow, DEST)
    chain = Chain(ChainStore())
    turn = a_turn(chain, previous="resp_1")
    view(ev.FaultFired(Fired(FaultRule(FaultKind.DROP, after_turn=2, line=7), 2), 1))
    assert flow.marked == MARK_FAULT
    view(ev.Recovered(turn, Trigger.DROPPED, Decision(Action.REPLAY, "ok"), 1, 2, None, 10))
    assert flow.marked == MARK_RECOVERED
    view(ev.FailedClosed(turn, Decision(Action.FAIL, "orphan call_9")))
    assert flow.marked == MARK_FAILED
    lines = flow.comment.splitlines()
    assert lines[0] == "replayguard: 1 recoveries, 1 faults, 1 failed closed."
    assert lines[1] == "⚡ injected fault after turn 2: drop upstream TCP (rules line 7)"
    assert lines[2].startswith("⟲ turn 1: upstream connection dropped -> replay")
    assert lines[3] == "✗ turn 1: orphan call_9 -> failed closed"
    for _ in range(MAX_COMMENT_LINES + 5):
        view(ev.Recovered(turn, Trigger.DROPPED, Decision(Action.REPLAY, "ok"), 1, 2, None, 10))
    lines = flow.comment.splitlines()
    assert len(lines) == MAX_COMMENT_LINES + 2 and lines[1].startswith("… 8 earlier")


# -- commands ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "value", "expected"), [
    ("drop", "", {}),
    ("close", "4000", {"code": 4000}),
    ("refuse", "429:2", {"status": 429, "count": 2}),
    ("error", "previous_response_not_found", {"error": InjectedError.PREVIOUS_NOT_FOUND}),
    ("delay", "2.5", {"seconds": 2.5}),
])
def test_fault_values_are_checked_as_in_rules(kind, value, expected):
    rule = fault_rule(kind, value)
    assert rule.kind is FaultKind(kind) and rule.origin == "command"
    for key, want in expected.items():
        assert getattr(rule, key) == want
    assert rule.describe().endswith("(command)")


@pytest.mark.parametrize(("kind", "value", "message"), [
    ("close", "1005", "cannot be sent in a close frame"),
    ("close", "soon", "invalid literal"),
    ("refuse", "200", "from 400 to 599"),
    ("error", "teapot", "expected one of previous_response_not_found"),
    ("drop", "3", "drop takes no value"),
    ("melt", "", "unknown fault kind 'melt'"),
])
def test_bad_fault_values_say_why(kind, value, message):
    with pytest.raises(exceptions.CommandError, match=message):
        fault_rule(kind, value)


class FakeSession:
    def __init__(self) -> None:
        self.closed = False
        self.injected: list[FaultRule] = []

    def inject(self, rule: FaultRule) -> None:
        self.injected.append(rule)

    def describe(self) -> str:
        return "flow-1  wss://api.openai.com/v1/responses  2 turns completed"


def test_commands_reach_live_sessions_through_mitmproxys_command_machinery():
    guard = ReplayGuard()
    with taddons.context(guard) as tctx:
        view = View()
        tctx.master.addons.add(view)
        live_flow, other = tflow.twebsocketflow(), tflow.twebsocketflow()
        view.add([live_flow, other])
        session = FakeSession()
        guard.flows[live_flow.id] = Live(session, SimpleNamespace())  # type: ignore[arg-type]
        commands = tctx.master.commands
        result = commands.call_strings("replayguard.fault", [f"@{live_flow.id}", "close", "4001"])
        assert "into 1 session(s)" in result and session.injected[0].code == 4001
        commands.call_strings("replayguard.fault", ["@all", "drop"])  # the other flow is no session: skipped
        assert [r.kind for r in session.injected] == [FaultKind.CLOSE, FaultKind.DROP]
        with pytest.raises(exceptions.CommandError,
                           match="unknown fault kind 'melt': one of close, drop, blackhole, refuse, error, delay"):
            commands.call_strings("replayguard.fault", [f"@{live_flow.id}", "melt"])
        with pytest.raises(exceptions.CommandError, match="none of these flows is a live replayguard session"):
            commands.call_strings("replayguard.fault", [f"@{other.id}", "drop"])
        assert commands.call_strings("replayguard.sessions", []) == [session.describe()]
        assert list(commands.call_strings("replayguard.kinds", [])) == [k.value for k in FaultKind]


def test_session_commands_is_registered_beside_the_addon():
    guard = ReplayGuard()
    assert any(isinstance(a, SessionCommands) for a in guard.addons)


def test_trim_drops_the_oldest_deltas_first_and_says_so():
    from mitmproxy.websocket import WebSocketMessage
    from wsproto.frame_protocol import Opcode

    flow = tflow.twebsocketflow()
    view = FlowView(flow, DEST)
    messages = []
    for turn in range(5):
        messages.append(WebSocketMessage(Opcode.TEXT, True, b'{"type":"response.create","turn":%d}' % turn))
        messages += [WebSocketMessage(Opcode.TEXT, False, b'{"type":"response.output_text.delta","delta":"%d"}' % i)
                     for i in range(30)]
        messages.append(WebSocketMessage(Opcode.TEXT, False, b'{"type":"response.completed","turn":%d}' % turn))
    messages.append(WebSocketMessage(Opcode.TEXT, False, b'{"type":"replayguard.recovery"}', injected=True))
    flow.websocket.messages[:] = messages
    view.trim(100)
    kept = flow.websocket.messages
    assert len(kept) == 100 and view.dropped == len(messages) - 100
    assert sum(m.from_client for m in kept) == 5  # every create stays
    assert sum(b"response.completed" in m.content for m in kept) == 5 and kept[-1].injected
    deltas = [i for i, m in enumerate(messages) if b".delta" in m.content]
    kept_ids = {id(m) for m in kept}
    assert all(id(messages[i]) not in kept_ids for i in deltas[:view.dropped])  # the oldest deltas went first
    assert all(id(messages[i]) in kept_ids for i in deltas[view.dropped:])
    assert flow.metadata["replayguard_dropped_messages"] == view.dropped
    assert f"{view.dropped} older messages dropped (limits.flow_messages)" in flow.comment
