"""limits.flow_messages, through a real mitmdump: mitmproxy keeps every message of a live flow; with the limit a
day-long session's flow keeps its last N, the oldest delta events dropped first, the client's requests and
replayguard's records kept, and the count dropped shown on the flow."""

from __future__ import annotations

from conftest import Client, completed, user


def test_a_long_session_keeps_its_flow_bounded(fake, mitm, tmp_path):
    flows = tmp_path / "flows.mitm"
    fake.reply_deltas = 20
    proxy = mitm(fake, args=["-w", str(flows)], limits={"flow_messages": 200})
    client = Client(proxy.url + "/v1/responses")
    previous = None
    for number in range(15):  # ~27 messages a turn: ~400 in all
        request = {"model": "m", "store": False, "input": [user(f"turn {number}")]}
        if previous:
            request["previous_response_id"] = previous
        previous = completed(client.turn(request))["id"]
    client.close()
    proxy.stop()
    from mitmproxy import io

    with open(flows, "rb") as f:
        (flow,) = [fl for fl in io.FlowReader(f).stream() if getattr(fl, "websocket", None)]
    messages = flow.websocket.messages
    assert len(messages) <= 220
    assert sum(m.from_client and not m.injected for m in messages) == 15  # every request the client sent
    assert sum(b"response.completed" in m.content for m in messages) == 15
    dropped = flow.metadata["replayguard_dropped_messages"]
    assert dropped >= 150 and f"{dropped} older messages dropped (limits.flow_messages)" in flow.comment
    assert any(m.injected and b"replayguard.session.start" in m.content for m in messages)
