"""A stall in replayguard's own process never makes a healthy upstream look dead: its timers count only the time the
event loop was free to read the answer; and one large message never holds other sessions up for long."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from conftest import ROOT, Client, completed, user

from replayguard.proxy.clock import LoopClock


def test_the_clock_does_not_count_a_stall_of_the_loop():
    async def run() -> tuple[bool, float, bool]:
        clock = LoopClock()
        clock.start()
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        answered = loop.create_future()
        loop.call_later(0.3, answered.set_result, "pong")  # the peer answers in time...
        loop.call_later(0.1, time.sleep, 1.5)  # ...but our loop is busy for 1.5 s from 0.1 s on
        ok = await clock.wait(answered, 1.0)
        never = loop.create_future()
        loop.call_later(0.1, time.sleep, 1.5)
        started = time.monotonic()
        timed_out = not await clock.wait(never, 0.5)
        waited = time.monotonic() - started
        started = time.monotonic()
        loop.call_later(0.1, time.sleep, 1.0)
        await clock.sleep(0.5)
        slept = time.monotonic() - started
        clock.stop()
        return ok, slept, timed_out and waited >= 1.9

    ok, slept, gave_the_peer_its_time = asyncio.run(run())
    assert ok  # the answer counted: it was there when the loop looked
    assert slept >= 1.4  # half a second of loop time, plus the second the loop was stalled
    assert gave_the_peer_its_time  # a peer that never answers still times out, after 0.5 s of loop time


def test_a_stalled_proxy_does_not_declare_healthy_upstreams_dead(fake, mitm):
    proxy = mitm(fake, args=["-s", str(ROOT / "tests" / "stall.py")],
                 upstream={"first_event_timeout": 1.0, "keepalive_interval": 0.4, "ping_timeout": 0.5})
    staller = Client(proxy.url + "/v1/responses")
    busy = Client(proxy.url + "/v1/responses")
    r1 = completed(busy.turn({"model": "m", "store": False, "input": [user("hi")]}))
    # busy's next turn is answered after 2.4 s; the proxy stalls for 2 s right after it was sent. Its first-event
    # timer (1 s) runs out during the stall if the stall is counted; the upstream answers 0.35 s after it, well
    # within the second of its own time it is owed. Keepalive pings (0.5 s timeout) span the stall too.
    fake.response_delay = 2.4
    thread = threading.Thread(target=lambda: (time.sleep(0.05), staller.send(
        {"type": "response.processed", "note": "STALL here"})))  # no turn of its own to time out
    thread.start()
    r2 = completed(busy.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                              "input": [user("go on")]}, timeout=15))
    thread.join()
    time.sleep(1.0)  # more keepalive rounds after the stall
    assert r2["id"] and len(fake.handshakes) == 2  # one connection each: nobody reconnected
    assert "first event timeout" not in proxy.log and "lost while idle" not in proxy.log
    assert "-> replay" not in proxy.log and "-> resend" not in proxy.log
    staller.close()
    busy.close()


def test_one_large_request_does_not_hold_other_sessions_up(fake, mitm):
    """A 40 MB request is parsed (and its trace record made) in steps: a streaming session beside it keeps moving."""
    fake.reply_deltas = 200
    fake.delta_interval = 0.002
    proxy = mitm(fake)
    big = Client(proxy.url + "/v1/responses")
    items = [{"type": "message", "role": "user", "content": f"{i} " + "x" * 200} for i in range(200_000)]
    stream = Client(proxy.url + "/v1/responses")
    gaps: list[float] = []

    def watch() -> None:
        stream.send({"type": "response.create", "model": "m", "store": False, "input": [user("stream please")]})
        last = time.monotonic()
        while True:
            event = stream.recv(timeout=30)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            if event["type"] == "response.completed":
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.1)
    sent = time.monotonic()
    events = big.turn({"model": "m", "store": False, "input": items}, timeout=60)
    big_took = time.monotonic() - sent
    watcher.join(30)
    assert events[-1]["type"] == "response.completed"
    record = next(json.loads(line) for line in (proxy.tmp / "trace.jsonl").read_text().splitlines()
                  if '"turn.start"' in line and '"omitted"' in line)
    assert len(json.dumps(record)) < 100_000  # the trace record stays small (summary mode)
    # Relative to the big turn's own time (load stretches both alike): one parse of 40 MB in a single step held
    # every session for most of the time replayguard spent on that request.
    assert max(gaps) < big_took / 4, f"the stream beside it stalled {max(gaps):.2f}s of the big turn's {big_took:.2f}s"
    big.close()
    stream.close()
