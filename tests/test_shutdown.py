"""Shutdown in bounded time, through a real mitmdump: SIGTERM (and SIGINT) with 100 live sessions, half of them mid-turn
on a silent upstream, exits within 5 s; a client mid-turn gets a structured error event and close 1001 (going away),
a client between turns close 1001; the trace has whole lines and a session.end for every session."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from replayguard.core.records import read_records

SESSIONS = 100


async def idle_client(url: str, ready: asyncio.Event, results: list) -> None:
    async with connect(url, proxy=None, max_size=None, ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "response.create", "model": "m", "store": False, "input": "hi"}))
        while json.loads(await ws.recv())["type"] != "response.completed":
            pass
        ready.set()
        events = await drain(ws)
        results.append(("idle", events, ws.close_code))


async def busy_client(url: str, results: list) -> None:
    async with connect(url, proxy=None, max_size=None, ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "response.create", "model": "m", "store": False, "input": "think"}))
        events = await drain(ws)
        results.append(("busy", events, ws.close_code))


async def drain(ws) -> list:
    events = []
    try:
        while True:
            events.append(json.loads(await ws.recv()))
    except ConnectionClosed:
        return events


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_with_100_sessions_is_quick_and_tells_every_client(fake, mitm, sig):
    proxy = mitm(fake, upstream={"first_event_timeout": 60})
    url = proxy.url + "/v1/responses"
    results: list = []

    async def run() -> float:
        readies = [asyncio.Event() for _ in range(SESSIONS // 2)]
        idle = [asyncio.create_task(idle_client(url, r, results)) for r in readies]
        await asyncio.gather(*(r.wait() for r in readies))
        fake.silent_next_requests = SESSIONS // 2  # the upstream takes these turns and never answers
        busy = [asyncio.create_task(busy_client(url, results)) for _ in range(SESSIONS // 2)]
        deadline = time.monotonic() + 20
        while fake.silent_next_requests > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert fake.silent_next_requests == 0, "the turns did not all reach the upstream"
        started = time.monotonic()
        proxy.proc.send_signal(sig)
        await asyncio.wait_for(asyncio.gather(*idle, *busy), 10)
        await asyncio.get_running_loop().run_in_executor(None, proxy.proc.wait, 10)
        return time.monotonic() - started

    took = asyncio.run(run())
    assert took < 5, f"mitmdump took {took:.1f}s to exit"
    busy = [r for r in results if r[0] == "busy"]
    idle = [r for r in results if r[0] == "idle"]
    assert len(busy) == len(idle) == SESSIONS // 2
    for _, events, code in busy:
        assert code == 1001, (code, events)
        errors = [e for e in events if e.get("type") == "error"]
        assert len(errors) == 1 and errors[0]["status"] == 503
        assert errors[0]["error"]["code"] == "replayguard_shutting_down"
    for _, events, code in idle:
        assert code == 1001 and events == []
    text = (proxy.tmp / "trace.jsonl").read_text()
    records, bad = read_records(text.splitlines())
    assert bad == [] and text.endswith("\n")  # whole lines only
    ends = [r for r in records if r["event"] == "session.end"]
    assert len(ends) == SESSIONS and len({r["session"] for r in ends}) == SESSIONS
    assert sum("the proxy is shutting down" in r["reason"] for r in ends) == SESSIONS // 2
