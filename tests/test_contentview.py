"""The "Responses" contentview: core.render directly, and the mitmproxy glue through mitmproxy's own UI entry point
(mitmproxy 11 and 12)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mitmproxy import contentviews, websocket
from mitmproxy.test import taddons, tflow
from wsproto.frame_protocol import Opcode

from replayguard.core import render as core_render
from replayguard.core.render import MAX_LINE, is_responses_message, render
from replayguard.proxy import contentview as cv

NEW_API = hasattr(contentviews, "Contentview")


# -- a tool-call chain, as messages of one flow ----------------------------------------------------
def create(input: Any, prev: str | None = None, **extra: Any) -> dict[str, Any]:
    req = {"type": "response.create", "model": "gpt-5", "store": False, "input": input, **extra}
    if prev is not None:
        req["previous_response_id"] = prev
    return req


def call(call_id: str, name: str = "shell") -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": '{"cmd": "ls"}'}


def output(call_id: str, text: str = "file_a file_b") -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": text}


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def turn_events(rid: str, *items: dict[str, Any], streamed: bool = True) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [{"type": "response.created", "response": {"id": rid, "status": "in_progress"}}]
    if streamed:
        events += [{"type": "response.output_item.done", "output_index": i, "item": it} for i, it in enumerate(items)]
    events.append({"type": "response.completed", "response": {
        "id": rid, "status": "completed", "output": list(items), "usage": {"input_tokens": 120, "output_tokens": 7}}})
    return events


RECOVERY = {
    "type": "replayguard.recovery", "event": "recovery", "ts": 1.0, "session": "s1", "turn": 3,
    "trigger": "upstream connection dropped",
    "action": "replay full input without previous_response_id on a fresh connection",
    "from_conn": 1, "to_conn": 2, "removed_previous_response_id": "resp_1", "items": 7, "bytes": 2048, "attempt": 1,
    "sent": create([user("list files"), call("call_1"), output("call_1"), call("call_2"), output("call_2")]),
}
NOT_FOUND = {"type": "error", "status": 400, "error": {
    "type": "invalid_request_error", "code": "previous_response_not_found",
    "message": "Previous response with id 'resp_1' not found.", "param": "previous_response_id"}}
LOST = {"type": "replayguard.upstream.lost", "event": "upstream.lost", "conn": 1,
        "how": "upstream answered previous_response_not_found",
        "detail": {"code": "previous_response_not_found", "message": "not found"}, "turn": 2, "message": NOT_FOUND}


def enc(obj: Any) -> bytes:
    return obj if isinstance(obj, bytes) else json.dumps(obj).encode()


def texts(lines: list[tuple[str, str]] | None) -> list[str]:
    assert lines is not None
    return [t for _, t in lines]


def render_last(messages: list[tuple[bool, Any]], **kw: Any) -> list[tuple[str, str]]:
    """Render the last of ``messages`` with the others as the flow before it."""
    flow = [(fc, enc(m)) for fc, m in messages]
    lines = render(flow[-1][1], flow[:-1], **kw)
    assert lines is not None
    assert all(len(t) <= MAX_LINE and "\n" not in t for _, t in lines)
    return lines


# -- core.render -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("content", "expected"), [
    (enc(create("hi")), True),
    (b'  {"type":"response.output_text.delta","delta":"x"}', True),
    (enc(NOT_FOUND), True),
    (enc(RECOVERY), True),
    (b'{"delta":"x","type":"response.output_text.delta"}', True),  # type not first: parsed
    (b'{"type":"errors"}', False),
    (b'{"type":"session.update"}', False),
    (b'{"type":"response.create"', False),  # cut short
    (b'["response.create"]', False),
    (b"not json", False),
    (b"\xff\xfe{", False),
    (b"", False),
])
def test_is_responses_message(content, expected):
    assert is_responses_message(content) is expected


def test_is_responses_message_reads_only_the_start_of_a_large_message(monkeypatch):
    big = enc(create([output(f"c{i}", "x" * 10_000) for i in range(1000)]))
    monkeypatch.setattr(core_render, "_load", lambda _: pytest.fail("parsed a message whose type is first"))
    assert is_responses_message(big)


def test_not_ours():
    for content in (b"not json", b"[1, 2]", b'"s"', b"\x00\x01\xff", b""):
        assert render(content, ()) is None


def test_create_lines():
    req = create([user("list the files\nplease"), call("call_1"), output("call_1"),
                  {"type": "mcp_approval_request", "id": "mcpr_1", "name": "deploy", "arguments": "{}"},
                  {"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": True}],
                 generate=False)
    lines = render_last([(True, req)])
    assert lines[0] == ("header", "response.create model=gpt-5 store=false generate=false 5 items")
    assert texts(lines)[1:] == [
        '  #0 message user "list the files please"',
        '  #1 function_call call_id=call_1 name=shell "{\\"cmd\\": \\"ls\\"}"',
        '  #2 function_call_output call_id=call_1 "file_a file_b"',
        '  #3 mcp_approval_request id=mcpr_1 name=deploy "{}"',
        "  #4 mcp_approval_response approval_request_id=mcpr_1",
    ]


def test_string_input_is_one_user_message():
    assert texts(render_last([(True, create("hello there"))]))[1:] == ['  #0 message user "hello there"']


def test_orphan_in_a_request_without_previous_response_id():
    lines = render_last([(True, create([user("go"), output("call_9"), call("call_1"), output("call_1")]))])
    assert lines[0][1].endswith("4 items 1 ORPHANED")
    flagged = [t for s, t in lines if s == "error"]
    assert len(flagged) == 1 and "#1 function_call_output call_id=call_9 ORPHANED" in flagged[0]
    assert "call_9" in flagged[0] and '"file_a file_b"' in flagged[0]


def test_call_in_an_earlier_turn_reached_through_previous_response_id():
    flow = [(True, create([user("go")])), *[(False, e) for e in turn_events("resp_1", call("call_1"))],
            (True, create([user("more")], prev="resp_1")),
            *[(False, e) for e in turn_events("resp_2", call("call_2"), streamed=False)],  # output from completed
            (True, create([output("call_1"), output("call_2"), output("call_3")], prev="resp_2"))]
    lines = render_last(flow)
    assert "previous_response_id=resp_2" in lines[0][1] and "1 ORPHANED" in lines[0][1]
    assert [t for s, t in lines if s == "error"] == [
        '  #2 function_call_output call_id=call_3 ORPHANED: no function_call/local_shell_call with call_id call_3 '
        'earlier in this chain "file_a file_b"']


def test_call_in_a_turn_the_request_does_not_chain_on_is_orphaned():
    flow = [(True, create([user("go")])), *[(False, e) for e in turn_events("resp_1", call("call_1"))],
            (True, create([output("call_1")]))]  # no previous_response_id: resp_1's call is not in its context
    assert "ORPHANED" in texts(render_last(flow))[1]


def test_streamed_items_win_over_the_completed_output():
    events = turn_events("resp_1", call("call_1"))
    events[-1]["response"]["output"] = [call("call_other")]
    flow = [(True, create("go")), *[(False, e) for e in events], (True, create([output("call_1")], prev="resp_1"))]
    assert "ORPHANED" not in " ".join(texts(render_last(flow)))


def test_chain_not_in_this_flow():
    lines = render_last([(True, create([output("call_1")], prev="resp_elsewhere"))])
    assert lines[0][1] == ("response.create model=gpt-5 store=false previous_response_id=resp_elsewhere "
                           "(chain not in this flow) 1 item")
    assert not any("ORPHANED" in t for t in texts(lines))
    # the chain's start is outside the flow: still not judged
    flow = [(True, create("go", prev="resp_0")), *[(False, e) for e in turn_events("resp_1")],
            (True, create([output("call_1")], prev="resp_1"))]
    lines = render_last(flow)
    assert "(chain not in this flow: resp_0 missing)" in lines[0][1] and "ORPHANED" not in " ".join(texts(lines))


def test_long_request_is_capped():
    items = [user("start")] + [it for i in range(600) for it in (call(f"call_{i}"), output(f"call_{i}", "y" * 500))]
    items.insert(700, output("lost_1"))  # an orphan in the hidden middle is still shown
    lines = render_last([(True, create(items))])
    shown = texts(lines)
    assert len(lines) < 400
    assert shown[1].startswith("  #0 message") and shown[-1].startswith(f"  #{len(items) - 1} function_call_output")
    assert any(t.startswith("  #700 ") and "ORPHANED" in t for t in shown)
    assert "  … 500 more items …" in shown and "  … 451 more items …" in shown


def test_server_events():
    lines = render_last([(False, {"type": "response.output_text.delta", "delta": "Hello\nworld " + "z" * 500})])
    assert len(lines) == 1 and lines[0][1].startswith('response.output_text.delta  "Hello world zzz')
    assert render_last([(False, NOT_FOUND)])[0] == ("error", "ERROR 400 previous_response_not_found: Previous "
                                                    "response with id 'resp_1' not found. (param previous_response_id)")
    done = render_last([(False, turn_events("resp_1", call("call_1"))[1])])
    assert done == [("header", 'response.output_item.done  [0] function_call call_id=call_1 name=shell '
                               '"{\\"cmd\\": \\"ls\\"}"')]
    completed = texts(render_last([(False, turn_events("resp_1", user("x"), call("call_1"))[-1])]))
    assert completed[0] == "response.completed id=resp_1 status=completed usage in=120 out=7"
    assert completed[2:] == ['  #0 message user "x"', '  #1 function_call call_id=call_1 name=shell '
                                                      '"{\\"cmd\\": \\"ls\\"}"']
    other = texts(render_last([(False, {"type": "response.content_part.added", "item_id": "msg_1",
                                        "output_index": 0, "part": {"type": "output_text"}})]))
    assert other == ["response.content_part.added", "item_id: msg_1", "output_index: 0"]


@pytest.mark.parametrize(("record", "style", "sentence"), [
    ({"event": "session.start", "url": "wss://api.example/v1/responses"}, "highlight",
     "replayguard: session started for wss://api.example/v1/responses"),
    ({"conn": 2, "purpose": "recovery", "ok": True, "status": 101, "ms": 12.34}, "highlight",
     "replayguard: upstream #2 opened (recovery) status 101 in 12.3 ms"),
    ({"conn": None, "purpose": "reconnect", "ok": False, "status": 503, "injected": True}, "error",
     "replayguard: handshake refused: HTTP 503 (reconnect) ⚡ injected"),
    ({"conn": 1, "how": "upstream connection dropped", "detail": "EOF", "turn": None}, "highlight",
     "replayguard: upstream #1 lost while idle: upstream connection dropped (EOF)"),
    ({"conn": 1, "code": 1011, "reason": "bye"}, "highlight", "replayguard: upstream #1 closed: close 1011 (bye)"),
    ({"conn": 1, "code": None, "reason": "upstream connection dropped"}, "highlight",
     "replayguard: upstream #1 closed: no close frame (upstream connection dropped)"),
    ({"turn": 2, "trigger": "upstream closed", "action": "resend unchanged on a fresh connection", "to_conn": 3,
      "items": 1}, "highlight", "replayguard: turn 2 resent on upstream #3 after upstream closed (1 item)"),
    ({"turn": 2, "reason": "replay would orphan call_1", "close_code": 1011,
      "error": {"type": "error", "status": 400, "error": {"code": "previous_response_not_found"}}}, "error",
     "replayguard: failed closed (previous_response_not_found, close 1011): replay would orphan call_1"),
    ({"phase": "fired", "kind": "drop", "detail": "drop upstream TCP (rules line 4)", "turn": 2}, "highlight",
     "replayguard: ⚡ injected fault: drop upstream TCP (rules line 4) (after turn 2)"),
    ({"turns_completed": 6, "turns_failed": 0, "recoveries": 2, "reason": "client closed"}, "highlight",
     "replayguard: session ended: client closed (6 turns completed, 0 failed, 2 recoveries)"),
])
def test_record_sentences(record, style, sentence):
    kind = {"url": "session.start", "ok": "handshake", "how": "upstream.lost", "code": "upstream.closed",
            "trigger": "recovery", "close_code": "fail_close", "phase": "fault", "recoveries": "session.end"}
    event = next(v for k, v in kind.items() if k in record)
    assert render_last([(False, {"type": f"replayguard.{event}", **record})])[0] == (style, sentence)


def test_recovery_record_shows_the_sent_request():
    lines = render_last([(False, RECOVERY)])
    assert lines[0] == ("highlight", "replayguard: turn 3 replayed on upstream #2 after upstream connection dropped "
                                     "(7 items, previous_response_id resp_1 removed)")
    assert lines[1][1] == "response.create model=gpt-5 store=false 5 items"
    assert [t.split()[:3] for t in texts(lines)[2:]] == [
        ["#0", "message", "user"], ["#1", "function_call", "call_id=call_1"],
        ["#2", "function_call_output", "call_id=call_1"], ["#3", "function_call", "call_id=call_2"],
        ["#4", "function_call_output", "call_id=call_2"]]
    as_string = render_last([(False, {**RECOVERY, "sent": json.dumps(RECOVERY["sent"])})])
    assert as_string == lines


def test_lost_record_shows_the_consumed_event():
    lines = render_last([(False, LOST)])
    assert lines[0] == ("highlight", "replayguard: upstream #1 lost during turn 2: upstream answered "
                                     "previous_response_not_found (previous_response_not_found: not found)")
    assert lines[1] == ("error", "consumed, not forwarded: ERROR 400 previous_response_not_found: Previous response "
                                 "with id 'resp_1' not found. (param previous_response_id)")


def test_other_records_show_their_fields():
    lines = render_last([(False, {"type": "replayguard.turn.start", "turn": 4, "model": "gpt-5",
                                  "input": [{"type": "message"}]})])
    assert texts(lines) == ["replayguard: turn.start", "turn: 4", "model: gpt-5", 'input: [{"type":"message"}]']


def _chain_flow(turns: int) -> list[tuple[bool, bytes]]:
    flow: list[tuple[bool, bytes]] = []
    prev = None
    for t in range(turns):
        inputs = [output(f"call_{t - 1}")] if t else [user("go")]
        flow.append((True, enc(create(inputs, prev=prev))))
        flow += [(False, enc({"type": "response.output_text.delta", "delta": "d"}))] * 5
        flow += [(False, enc(e)) for e in turn_events(f"resp_{t}", call(f"call_{t}"))]
        prev = f"resp_{t}"
    return flow


def test_chain_scan_is_cached_per_flow(monkeypatch):
    flow = _chain_flow(60)
    loads = 0
    real = core_render._load

    def counting(content):
        nonlocal loads
        loads += 1
        return real(content)

    monkeypatch.setattr(core_render, "_load", counting)
    for _ in range(2):  # a UI renders every message of the flow, and again when one arrives
        for i, (_, content) in enumerate(flow):
            assert "ORPHANED" not in " ".join(texts(render(content, flow[:i], flow_key="flow-1")))
    # each message parsed to render it (twice) plus once for the scan; deltas never for the scan
    assert loads <= 2 * len(flow) + 4 * 60


def test_cached_scan_answers_as_of_the_message_rendered():
    flow = [(True, enc(create("go"))), *[(False, enc(e)) for e in turn_events("resp_1", call("call_1"))],
            (True, enc(create([output("call_3")], prev="resp_3"))),  # names a response that comes later
            *[(False, enc(e)) for e in turn_events("resp_2")],
            (True, enc(create([user("again")]))), *[(False, enc(e)) for e in turn_events("resp_3", call("call_3"))],
            (True, enc(create([output("call_1")], prev="resp_3")))]
    early = 4
    assert texts(render(flow[-1][1], flow[:-1], flow_key="f"))[1].startswith("  #0 function_call_output call_id="
                                                                              "call_1 ORPHANED")
    # the cache has seen resp_3 by now (its chain would orphan call_3); as of message 4 it did not exist yet
    lines = texts(render(flow[early][1], flow[:early], flow_key="f"))
    assert "(chain not in this flow)" in lines[0] and "ORPHANED" not in " ".join(lines)


def test_cached_scan_notices_a_rewritten_message():
    flow = [(True, enc(create("go"))), *[(False, enc(e)) for e in turn_events("resp_1", call("call_1"))],
            (True, enc(create([output("call_1")], prev="resp_1")))]
    assert "ORPHANED" not in " ".join(texts(render(flow[-1][1], flow[:-1], flow_key="g")))
    # an addon's websocket_message hook rewrote the call after the scan saw it
    flow[2] = (False, enc({"type": "response.output_item.done", "item": call("call_other")}))
    assert "ORPHANED" in " ".join(texts(render(flow[-1][1], flow[:-1], flow_key="g")))


def test_previews_never_walk_a_whole_payload(monkeypatch):
    longest = 0
    real = core_render.summarize_item

    def spy(item, bodies):
        nonlocal longest
        for value in item.values():
            parts = value if isinstance(value, list) else [value]
            for part in parts:
                text = part.get("text") if isinstance(part, dict) else part
                if isinstance(text, str):
                    longest = max(longest, len(text))
        return real(item, bodies)

    monkeypatch.setattr(core_render, "summarize_item", spy)
    huge = "word " * 400_000
    lines = render_last([(True, create([{"role": "user", "content": huge}, user(huge), output("c", huge)]))])
    assert texts(lines)[1].startswith('  #0 message user "word word')
    assert 0 < longest <= 4 * 80


def test_ten_megabytes_render_fast():
    from replayguard.tools.bench import render_seconds

    assert render_seconds(10.0) < 1.0


# -- mitmproxy glue --------------------------------------------------------------------------------
def registered() -> Any:
    if NEW_API:
        return contentviews.registry.get("responses")
    return contentviews.get("Responses")


def count_registered() -> int:
    if NEW_API:
        return sum(1 for v in contentviews.registry.values() if v.name == "Responses")
    return sum(1 for v in contentviews.views if v.name == "Responses")


@pytest.fixture
def view():
    with taddons.context():
        v = cv.register()
        yield v
        cv.unregister(v)
    assert registered() is None


def ws_flow(*messages: tuple[bool, Any], opcode: Opcode = Opcode.TEXT) -> Any:
    f = tflow.twebsocketflow()
    f.websocket.messages = [websocket.WebSocketMessage(opcode, fc, enc(m)) for fc, m in messages]
    return f


def auto_pick(f: Any, m: Any) -> Any:
    if NEW_API:
        return contentviews.registry.get_view(m.content, contentviews.make_metadata(m, f), "auto")
    md = dict(content_type=None, flow=f, http_message=None, tcp_message=None, udp_message=None, websocket_message=m)
    return max((v.render_priority(m.content, **md), v) for v in contentviews.views)[1]


def shown(f: Any, m: Any) -> tuple[str, list[str]]:
    """What mitmproxy's UIs show for message ``m``: (view name, lines)."""
    if NEW_API:
        res = contentviews.prettify_message(m, f, view_name="auto")
        return res.view_name, res.text.splitlines()
    desc, lines, error = contentviews.get_message_content_view("auto", m, f)
    assert error is None
    return desc, ["".join(t for _, t in line) for line in lines]


def test_register_and_reregister_leave_one_view():
    with taddons.context():
        first = cv.register()
        second = cv.register()  # a script reload whose done() never ran
        assert count_registered() == 1 and registered() is second
        cv.unregister(first)  # the stale one: leaves the current one alone
        assert registered() is second
        cv.unregister(second)
        cv.unregister(second)  # mitmproxy runs done() twice at shutdown
        assert registered() is None and count_registered() == 0
        third = cv.register()
        assert count_registered() == 1 and registered() is third
        cv.unregister(third)
        assert registered() is None


@pytest.mark.parametrize("payload", [create("hi"), {"type": "response.output_text.delta", "delta": "x"}, NOT_FOUND,
                                     RECOVERY])
def test_auto_picks_responses(view, payload):
    f = ws_flow((True, payload))
    m = f.websocket.messages[-1]
    assert auto_pick(f, m) is view
    assert shown(f, m)[0] == "Responses"


@pytest.mark.parametrize(("payload", "opcode"), [
    ({"type": "session.update", "x": 1}, Opcode.TEXT),
    (b"not json at all", Opcode.TEXT),
    (enc(create("hi")), Opcode.BINARY),
])
def test_auto_leaves_other_messages(view, payload, opcode):
    f = ws_flow((True, payload), opcode=opcode)
    m = f.websocket.messages[-1]
    assert auto_pick(f, m) is not view
    assert shown(f, m)[0] != "Responses"


def test_auto_leaves_http_bodies(view):
    f = tflow.tflow(resp=True)
    f.response.headers["content-type"] = "application/json"
    f.response.content = enc(create("hi"))
    if NEW_API:
        assert contentviews.prettify_message(f.response, f).view_name == "JSON"
    else:
        assert contentviews.get_message_content_view("auto", f.response, f)[0] == "JSON"


def test_shown_through_mitmproxy(view):
    f = ws_flow((True, create([user("list files")])),
                *[(False, e) for e in turn_events("resp_1", call("call_1"))],
                (False, {"type": "response.output_text.delta", "delta": "Hel\nlo"}),
                (True, create([output("call_1"), output("call_2")], prev="resp_1")),
                (True, create([output("call_1")], prev="resp_gone")),
                (False, NOT_FOUND), (False, RECOVERY), (False, LOST))
    m = f.websocket.messages
    _, first = shown(f, m[0])
    assert first == ["response.create model=gpt-5 store=false 1 item", '  #0 message user "list files"']
    assert shown(f, m[4])[1] == ['response.output_text.delta  "Hel lo"']
    _, cont = shown(f, m[5])
    assert cont[0] == "response.create model=gpt-5 store=false previous_response_id=resp_1 2 items 1 ORPHANED"
    assert cont[1] == '  #0 function_call_output call_id=call_1 "file_a file_b"'  # its call is in resp_1's output
    assert cont[2].startswith("  #1 function_call_output call_id=call_2 ORPHANED") and "call_2" in cont[2]
    _, gone = shown(f, m[6])
    assert "(chain not in this flow)" in gone[0] and not any("ORPHANED" in t for t in gone)
    assert shown(f, m[7])[1][0].startswith("ERROR 400 previous_response_not_found: ")
    _, rec = shown(f, m[8])
    assert rec[0].startswith("replayguard: turn 3 replayed on upstream #2 after upstream connection dropped")
    assert [t.split()[:3] for t in rec[2:4]] == [["#0", "message", "user"], ["#1", "function_call", "call_id=call_1"]]
    assert any("call_id=call_2" in t for t in rec)
    _, lost = shown(f, m[9])
    assert lost[1].startswith("consumed, not forwarded: ERROR 400 previous_response_not_found")


def test_only_the_messages_before_it_are_its_context(view):
    f = ws_flow((True, create([output("call_2")], prev="resp_2")), *[(False, e) for e in turn_events("resp_1")],
                (True, create("again")), *[(False, e) for e in turn_events("resp_2", call("call_2"))])
    assert "(chain not in this flow)" in shown(f, f.websocket.messages[0])[1][0]


def test_a_copy_of_a_message_sees_the_whole_flow(view):
    f = ws_flow((True, create("go")), *[(False, e) for e in turn_events("resp_1", call("call_1"))])
    copy = websocket.WebSocketMessage(Opcode.TEXT, True, enc(create([output("call_1")], prev="resp_1")))
    if NEW_API:
        text = contentviews.prettify_message(copy, f).text
    else:
        text = "\n".join("".join(t for _, t in line)
                         for line in contentviews.get_message_content_view("auto", copy, f)[1])
    assert "previous_response_id=resp_1 1 item" in text and "ORPHANED" not in text
