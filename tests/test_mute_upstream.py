"""An upstream that answers the handshake with 101 and then never speaks (no events, no pongs)."""

from __future__ import annotations

import time

from conftest import Client, completed, user
from replayguard.tools.fake_upstream import FakeUpstream


def test_mute_upstream_fails_closed_after_retries_and_other_flows_live_on(fake, mitm, tmp_path):
    fake.mute = True
    proxy = mitm(fake, upstream={"first_event_timeout": 0.7}, recovery={"max_retries": 1})
    client = Client(proxy.url + "/v1/responses")
    started = time.monotonic()
    client.send({"type": "response.create", "model": "m", "store": False, "input": [user("anyone there?")]})
    events, code, _ = client.until_closed(timeout=10)
    took = time.monotonic() - started
    assert code == 1011
    assert [e["type"] for e in events] == ["error"]
    error = events[0]
    assert error["status"] == 502 and error["error"]["code"] == "upstream_retries_exhausted"
    assert "no event within first event timeout" in error["error"]["message"]
    # First timeout, one resend on a fresh connection, second timeout: about 2 x 0.7 s, never a hang (until_closed's
    # bound above); never before the two timeouts ran.
    assert took > 1.3
    assert len(fake.handshakes) == 2
    proxy.wait_log(r"turn 1: no event within first event timeout.*-> failed closed")

    # The proxy keeps serving other flows (another upstream that speaks).
    with FakeUpstream() as other:
        proxy2 = mitm(other)
        bystander = Client(proxy2.url + "/v1/responses")
        assert completed(bystander.turn({"model": "m", "store": False, "input": [user("hi")]}))["id"]
        bystander.close()
    fake.mute = False
    again = Client(proxy.url + "/v1/responses")
    assert completed(again.turn({"model": "m", "store": False, "input": [user("back")]}))["id"]
    again.close()
