"""A connection that dies while a turn is in flight, after the first event (the model "thinking", then silence):
found by the keepalive ping at once, not left for the client's own stream timeout. A long but healthy silent turn
answers the ping and is never cut."""

from __future__ import annotations

import time

from conftest import Client, completed, user
from test_trace import of, records

LIVENESS = {"keepalive_interval": 0.4, "ping_timeout": 0.4, "first_event_timeout": 2}


def test_upstream_silent_mid_turn_is_found_by_keepalive(fake, mitm):
    proxy = mitm(fake, upstream=LIVENESS)
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    fake.stall_after_events = 4  # created, in_progress, output_item.added, content_part.added, then silence
    started = time.monotonic()
    client.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
                 "input": [user("think hard")]})
    events, code, _ = client.until_closed(timeout=10)
    took = time.monotonic() - started
    assert [e["type"] for e in events[:4]] == ["response.created", "response.in_progress",
                                               "response.output_item.added", "response.content_part.added"]
    assert events[-1]["error"]["code"] == "upstream_stream_interrupted" and code == 1011
    assert "no pong within ping timeout" in events[-1]["error"]["message"]
    print(f"found after {took:.2f}s (keepalive 0.4 s + ping timeout 0.4 s), not the client's 300 s stream timeout")
    proxy.wait_log(r"turn 2: no pong within ping timeout after part of the response reached the client -> failed")
    lost = of(records(proxy.tmp / "trace.jsonl", until="upstream.lost"), "upstream.lost")
    assert lost[0]["turn"] == 2 and lost[0]["detail"] == "keepalive during turn 2: no pong within 0.4s"


def test_silent_start_before_output_is_recovered_by_keepalive(fake, mitm):
    proxy = mitm(fake, upstream={**LIVENESS, "first_event_timeout": 10})
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hello")]}))
    fake.silent_next_requests = 1  # the next request is swallowed by a connection that went silent
    started = time.monotonic()
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [user("again")]}))
    assert r2["output"][0]["content"][0]["text"] == "reply to: again"
    print(f"recovered after {time.monotonic() - started:.2f}s (the first-event timeout is 10 s)")
    assert "no event within first event timeout" not in proxy.log  # the keepalive found it, not the 10 s timeout
    proxy.wait_log(r"turn 2: no pong within ping timeout .*keepalive during turn 2.*-> replay")


def test_long_silent_healthy_turn_is_not_cut(fake, mitm):
    proxy = mitm(fake, upstream=LIVENESS)
    client = Client(proxy.url + "/v1/responses")
    fake.reply_deltas = 3
    fake.delta_interval = 1.0  # a second of silence between deltas, several keepalive intervals
    fake.response_delay = 1.0  # and a second before the first event
    r = completed(client.turn({"model": "m", "store": False, "input": [user("slow")]}, timeout=15))
    assert r["output"][0]["content"][0]["text"] == "tok0 " * 3
    assert len(fake.handshakes) == 1 and "no pong" not in proxy.log
    client.close()
