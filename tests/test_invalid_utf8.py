"""Invalid UTF-8 in a client's text frame: a clear close 1007, nothing garbled reaches the upstream, the session's
upstream connection is closed, and the proxy keeps serving other flows."""

from __future__ import annotations

from conftest import Client, completed, user
from test_trace import of, records


def test_invalid_utf8_text_frame_closes_1007_and_other_flows_live_on(fake, mitm):
    proxy = mitm(fake)
    bystander = Client(proxy.url + "/v1/responses")
    r1 = completed(bystander.turn({"model": "m", "store": False, "input": [user("before")]}))
    bad = Client(proxy.url + "/v1/responses")
    assert fake.wait_for(lambda: len(fake.handshakes) == 2)
    bad.ws.send(b'{"type":"response.create","model":"m","input":"\xff\xfe broken"}', text=True)
    events, code, reason = bad.until_closed(timeout=5)
    assert events == [] and code == 1007 and "utf-8" in (reason or "")
    assert all(c != 2 for c, _ in fake.received)  # nothing of it reached the upstream
    assert fake.wait_for(lambda: fake.open_connections() == 1)  # its upstream connection was closed
    end = [r for r in of(records(proxy.tmp / "trace.jsonl", until="session.end"), "session.end")]
    assert "1007" in end[0]["reason"]
    # The other session goes on.
    r2 = completed(bystander.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                   "input": [user("after")]}))
    assert r2["output"][0]["content"][0]["text"] == "reply to: after"
    assert "Traceback" not in proxy.log
    bystander.close()
