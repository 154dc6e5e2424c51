"""`python -m replayguard bench [--quick]`: replayguard against plain mitmdump on the same workload, in one run.

Everything runs offline on 127.0.0.1: the fake upstream (in this process), mitmdump (a subprocess, as users run
it) and the clients (asyncio, in this process). Ratios measured side by side are what to compare; absolute
numbers depend on the machine.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import statistics
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from websockets.asyncio.client import connect

from ..core.chain import Chain, ChainStore
from .fake_upstream import FakeUpstream
from .harness import Mitmdump

RULES: dict[str, Any] = {"match": [{"path": "*/responses"}], "upstream": {"keepalive_interval": 0}}
DELTA_PREFIX = '{"type": "response.output_text.delta"'


@dataclass
class StreamResult:
    events: int
    seconds: float
    latencies_ns: list[int]

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    def latency_ms(self, q: float) -> float:
        data = sorted(self.latencies_ns)
        return data[min(len(data) - 1, int(q * len(data)))] / 1e6


async def _session(url: str, n: int, turns: int, latencies: list[int]) -> int:
    events = 0
    previous = None
    async with connect(url, max_size=None, ping_interval=None) as ws:
        for t in range(turns):
            request: dict[str, Any] = {"type": "response.create", "model": "m", "store": False,
                                       "input": [{"type": "message", "role": "user", "content": f"s{n} t{t}"}]}
            if previous:
                request["previous_response_id"] = previous
            await ws.send(json.dumps(request))
            while True:
                raw = await ws.recv()
                now = time.monotonic_ns()
                events += 1
                if raw.startswith(DELTA_PREFIX):
                    latencies.append(now - json.loads(raw)["t_ns"])
                    continue
                event = json.loads(raw)
                if event["type"] == "response.completed":
                    previous = event["response"]["id"]
                    break
                if event["type"] == "error":
                    raise RuntimeError(f"bench turn failed: {event}")
    return events


async def _stream(url: str, sessions: int, turns: int) -> StreamResult:
    latencies: list[int] = []
    started = time.monotonic()
    counts = await asyncio.gather(*(_session(url, n, turns, latencies) for n in range(sessions)))
    return StreamResult(sum(counts), time.monotonic() - started, latencies)


async def _recovery(url: str, fake: FakeUpstream, ping_timeout: float, rounds: int) -> list[float]:
    """Seconds from a continuation to its replay arriving on a fresh upstream, minus the ping timeout."""
    overheads = []
    for _ in range(rounds):
        async with connect(url, max_size=None, ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "response.create", "model": "m", "store": False, "input": "hi"}))
            while (event := json.loads(await ws.recv()))["type"] != "response.completed":
                pass
            before = len(fake.handshakes)
            fake.blackhole_all()
            started = time.monotonic()
            await ws.send(json.dumps({"type": "response.create", "model": "m", "store": False, "input": "again",
                                      "previous_response_id": event["response"]["id"]}))
            while not (len(fake.handshakes) > before and any(
                    c == fake.handshakes[-1]["conn"] for c, _ in list(fake.received)[-3:])):
                await asyncio.sleep(0.0005)
            overheads.append(time.monotonic() - started - ping_timeout)
            while json.loads(await ws.recv())["type"] != "response.completed":
                pass
    return overheads


async def _first_event_times(url: str, turns: int, item_bytes: int) -> list[float]:
    """One store=false chain through the proxy: seconds from each continuation to its first event."""
    times: list[float] = []
    previous = None
    async with connect(url, max_size=None, ping_interval=None) as ws:
        for t in range(turns):
            request: dict[str, Any] = {"type": "response.create", "model": "m", "store": False,
                                       "input": [{"type": "message", "role": "user", "content": f"{t} " + "x" * item_bytes}]}
            if previous:
                request["previous_response_id"] = previous
            started = time.perf_counter()
            await ws.send(json.dumps(request))
            first = True
            while True:
                event = json.loads(await ws.recv())
                if first:
                    times.append(time.perf_counter() - started)
                    first = False
                if event["type"] == "response.completed":
                    previous = event["response"]["id"]
                    break
                if event["type"] == "error":
                    raise RuntimeError(f"bench turn failed: {event}")
    return times


def _reset(fake: FakeUpstream) -> None:
    """Forget what the fake recorded (it keeps every message for tests): a long bench would otherwise grow it."""
    fake.received.clear()
    fake.sent.clear()
    gc.collect()


def _at_marks(values: list[float], marks: tuple[int, ...]) -> dict[int, float]:
    """Median of the ten values ending at each mark (turn numbers)."""
    return {m: statistics.median(values[max(0, m - 10):m]) for m in marks if m <= len(values)}


def machine() -> str:
    import mitmproxy.version
    import websockets

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, python "
            f"{platform.python_version()}, mitmproxy {mitmproxy.version.VERSION}, websockets {websockets.__version__}")


def _chain_messages(turns: int, item_bytes: int) -> Iterator[tuple[str, list[str]]]:
    """One chain of store=false continuations: (the client's response.create, the upstream's events) per turn."""
    previous = None
    for t in range(turns):
        request: dict[str, Any] = {"type": "response.create", "model": "m", "store": False,
                                   "input": [{"type": "message", "role": "user", "content": f"{t} " + "x" * item_bytes}]}
        if previous:
            request["previous_response_id"] = previous
        rid = f"resp_{t}"
        item = {"type": "message", "id": f"msg_{t}", "role": "assistant",
                "content": [{"type": "output_text", "text": "ok", "annotations": []}]}
        yield json.dumps(request), [
            json.dumps({"type": "response.created", "response": {"id": rid}}),
            json.dumps({"type": "response.output_item.done", "item": item}),
            json.dumps({"type": "response.completed", "response": {"id": rid, "output": [item]}}),
        ]
        previous = rid


def _feed(chain: Chain, raw: str, events: list[str]) -> None:
    """The core's work for one turn, as the bridge does it: parse the create, keep state, feed the events."""
    turn = chain.begin_turn(json.loads(raw), raw)
    chain.needs_rewrite(turn)
    for e in events:
        chain.on_event(json.loads(e), len(e))


def per_turn_cost(turns: int, item_bytes: int = 20_000) -> dict[int, float]:
    """Median microseconds of core work per turn, at turns 10, 100 and 1000 of one chain."""
    chain = Chain(ChainStore(), max_chain_bytes=2**40)
    costs: list[int] = []
    for raw, events in _chain_messages(turns, item_bytes):
        started = time.perf_counter_ns()
        _feed(chain, raw, events)
        costs.append(time.perf_counter_ns() - started)
    marks = [m for m in (10, 100, 1000) if m <= turns]
    return {m: statistics.median(costs[max(0, m - 10):m]) / 1000 for m in marks}


def memory(turns: int, item_bytes: int = 20_000) -> tuple[int, int, int, int]:
    """(chain JSON bytes, bytes held during the session, held after it ends (still resumable), held once its
    resume_ttl has passed and the store swept it)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    store = ChainStore()
    chain = Chain(store, max_chain_bytes=2**40)
    for raw, events in _chain_messages(turns, item_bytes):
        _feed(chain, raw, events)
    del raw, events
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    assert chain.head is not None and chain.head.history is not None
    json_bytes = len(json.dumps(chain.head.history.materialize()))
    ids = chain.response_ids
    del chain
    gc.collect()
    after_session = tracemalloc.get_traced_memory()[0] - base
    store.retire(ids, deadline=600.0)  # what the bridge does when the session ends (resume_ttl 600 s) ...
    store.sweep(now=600.0)  # ... and after the TTL
    del ids
    gc.collect()
    after_clear = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return json_bytes, held, after_session, after_clear


def run(quick: bool) -> str:
    sessions, turns, deltas, rounds = (2, 5, 100, 3) if quick else (4, 20, 200, 5)
    paced_turns, chain_turns = (2, 100) if quick else (10, 1000)
    marks = (10, 100) if quick else (10, 100, 1000)
    repeats = 1 if quick else 2
    ping_timeout = 0.5
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp, FakeUpstream() as fake:
        fake.reply_deltas = deltas
        fake.stamp_deltas = True
        work = Path(tmp)
        rules = json.loads(json.dumps(RULES))
        rules["upstream"].update(ping_idle=0, ping_timeout=ping_timeout)
        procs = {
            "plain": Mitmdump(work / "plain", ["--mode", f"reverse:http://127.0.0.1:{fake.port}"], None, addon=False),
            "replayguard": Mitmdump(work / "rg", ["--mode", f"reverse:http://127.0.0.1:{fake.port}"], rules),
        }
        results: dict[str, list[StreamResult]] = {"direct": [], "plain": [], "replayguard": []}
        try:
            for proc in procs.values():
                proc.start()
            for _ in range(repeats):  # interleaved, best of each: the machine is noisy
                _reset(fake)
                results["direct"].append(asyncio.run(_stream(fake.url + "/v1/responses", sessions, turns)))
                for name, proc in procs.items():
                    results[name].append(asyncio.run(_stream(proc.url + "/v1/responses", sessions, turns)))
            # Unsaturated: one delta every 2 ms, two sessions, so latency is the proxy's, not queueing.
            fake.delta_interval = 0.002
            paced: dict[str, StreamResult] = {}
            for name, proc in procs.items():
                paced[name] = asyncio.run(_stream(proc.url + "/v1/responses", 2, paced_turns))
            fake.delta_interval = 0.0
            fake.reply_deltas = None
            overheads = asyncio.run(_recovery(procs["replayguard"].url + "/v1/responses", fake, ping_timeout, rounds))
            # One long chain per proxy, twice, in the order plain, replayguard, replayguard, plain; best median
            # per mark. The fake's records are cleared before each run so that no run pays for another's
            # garbage-collector load.
            first_event: dict[str, dict[int, float]] = {}
            for name in ("plain", "replayguard", "replayguard", "plain"):
                _reset(fake)
                times = _at_marks(asyncio.run(_first_event_times(procs[name].url + "/v1/responses", chain_turns,
                                                                 20_000)), marks)
                best_so_far = first_event.setdefault(name, times)
                first_event[name] = {m: min(best_so_far[m], times[m]) for m in times}
        finally:
            for proc in procs.values():
                proc.stop()
    best = {name: max(runs, key=lambda r: r.rate) for name, runs in results.items()}
    plain, rg = best["plain"], best["replayguard"]
    rows.append(("streaming throughput (events/s)",
                 f"direct {best['direct'].rate:,.0f} | plain {plain.rate:,.0f} | replayguard {rg.rate:,.0f}",
                 f"ratio {rg.rate / plain.rate:.2f}x (target >= 0.8x)"))
    rows.append(("saturated latency per event p50 (ms)", f"plain {plain.latency_ms(0.5):.2f} | replayguard "
                 f"{rg.latency_ms(0.5):.2f}", f"{rg.latency_ms(0.5) - plain.latency_ms(0.5):+.2f} ms"))
    rows.append(("saturated latency per event p99 (ms)", f"plain {plain.latency_ms(0.99):.2f} | replayguard "
                 f"{rg.latency_ms(0.99):.2f}", f"{rg.latency_ms(0.99) - plain.latency_ms(0.99):+.2f} ms"))
    pp, pr = paced["plain"], paced["replayguard"]
    rows.append(("paced latency per event, p50 (ms)",
                 f"plain {pp.latency_ms(0.5):.2f} | replayguard {pr.latency_ms(0.5):.2f}",
                 f"added {pr.latency_ms(0.5) - pp.latency_ms(0.5):+.2f} ms"))
    rows.append(("paced latency per event, p99 (ms)",
                 f"plain {pp.latency_ms(0.99):.2f} | replayguard {pr.latency_ms(0.99):.2f}",
                 f"added {pr.latency_ms(0.99) - pp.latency_ms(0.99):+.2f} ms"))
    # The fake upstream validates the whole growing context each turn and mitmproxy keeps every message of the
    # flow: that growth is in both columns. What replayguard itself adds is the difference.
    for name in ("plain", "replayguard"):
        times = first_event[name]
        lo, hi = min(times), max(times)
        rows.append((f"time to first event, 20 KB turns, {name} (ms)",
                     " | ".join(f"turn {m}: {v * 1000:.2f}" for m, v in times.items()),
                     f"turn {hi}/turn {lo}: {times[hi] / times[lo]:.2f}x"))
    added = {m: first_event["replayguard"][m] - first_event["plain"][m] for m in first_event["plain"]}
    lo, hi = min(added), max(added)
    rows.append(("  of which added by replayguard (ms)", " | ".join(f"turn {m}: {v * 1000:+.2f}" for m, v in added.items()),
                 f"turn {hi} - turn {lo}: {(added[hi] - added[lo]) * 1000:+.2f} ms"))
    rows.append(("recovery overhead (s, resend - ping timeout)",
                 f"median {statistics.median(overheads):.3f} | max {max(overheads):.3f} over {rounds}",
                 "target <= 0.2 s"))
    costs = per_turn_cost(100 if quick else 1000)
    first, last = min(costs), max(costs)
    rows.append(("per-turn core cost (us), 20 KB turns",
                 " | ".join(f"turn {m}: {c:.0f}" for m, c in costs.items()),
                 f"turn {last}/turn {first}: {costs[last] / costs[first]:.2f}x (target <= 1.5x)"))
    json_bytes, held, after, cleared = memory(50 if quick else 300)
    rows.append(("replay state memory", f"chain JSON {json_bytes / 2**20:.1f} MiB | held {held / 2**20:.1f} MiB "
                 f"| session ended {after / 2**20:.1f} MiB | after resume_ttl {cleared / 2**20:.2f} MiB",
                 f"held/JSON {held / json_bytes:.2f}x (target <= 1.5x); freed after the TTL"))
    rows.append(("Responses contentview, a 10 MB response.create", f"{render_seconds(10.0) * 1000:.0f} ms",
                 "target: well under 1 s"))
    width = max(len(r[0]) for r in rows)
    head = (f"python -m replayguard bench{' --quick' if quick else ''}: {sessions} sessions x {turns} turns x {deltas} "
            f"deltas (saturated); paced: 2 sessions x {paced_turns} turns, a delta every 2 ms; one chain of "
            f"{chain_turns} turns")
    lines = [head, f"machine: {machine()}", "-" * len(head)]
    lines += [f"{name.ljust(width)}  {value}  [{verdict}]" for name, value, verdict in rows]
    return "\n".join(lines)


def render_seconds(size_mb: float = 10.0) -> float:
    """Seconds the Responses contentview's renderer takes on a `response.create` of about ``size_mb`` MB (a
    tool-call chain of 10 KB outputs), best of 3: a UI renders it whenever the message is shown."""
    from ..core.render import render

    items: list[dict[str, Any]] = [{"type": "message", "role": "user", "content": "run the tools"}]
    size, n = 0, 0
    chunk = " ".join(f"line {i} of the tool's output" for i in range(400))[:10_000]
    while size < size_mb * 1_000_000:
        call = {"type": "function_call", "call_id": f"call_{n}", "name": "shell", "arguments": '{"cmd": "ls -la"}'}
        output = {"type": "function_call_output", "call_id": f"call_{n}", "output": chunk}
        items += [call, output]
        size += len(chunk) + 160
        n += 1
    content = json.dumps({"type": "response.create", "model": "m", "store": False, "input": items}).encode()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        render(content, ())
        best = min(best, time.perf_counter() - started)
    return best
