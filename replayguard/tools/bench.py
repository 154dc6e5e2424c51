"""`python -m replayguard bench [--quick]`: replayguard against plain mitmdump on the same workload, in one run.

Everything runs offline on 127.0.0.1: the fake upstream (in this process), mitmdump (a subprocess, as users run
it) and the clients (asyncio, in this process). Ratios measured side by side are what to compare; absolute
numbers depend on the machine.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from websockets.asyncio.client import connect

from ..core.chain import Chain, ChainStore
from ..core.events import Handshake
from ..core.protocol import OpenUpstream, Protocol, Settings
from .fake_upstream import FakeUpstream
from .harness import QUIET, Mitmdump

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
    async with connect(url, max_size=None, ping_interval=None, proxy=None) as ws:
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
        async with connect(url, max_size=None, ping_interval=None, proxy=None) as ws:
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


async def _first_event_times(urls: dict[str, str], turns: int, item_bytes: int) -> dict[str, list[float]]:
    """One store=false chain through each proxy, in lock step (turn t through one, then through the other, the order
    alternating): seconds from each continuation to its first event. Side by side, both chains meet the same machine
    and the same growth of the fake's own work, so their difference per turn is what the proxy adds."""
    times: dict[str, list[float]] = {name: [] for name in urls}
    previous: dict[str, str | None] = {name: None for name in urls}
    async with AsyncExitStack() as stack:
        sockets = {name: await stack.enter_async_context(connect(url, max_size=None, ping_interval=None, proxy=None))
                   for name, url in urls.items()}
        for t in range(turns):
            order = list(urls) if t % 2 == 0 else list(reversed(urls))
            for name in order:
                ws = sockets[name]
                request: dict[str, Any] = {"type": "response.create", "model": "m", "store": False,
                                           "input": [{"type": "message", "role": "user",
                                                      "content": f"{t} " + "x" * item_bytes}]}
                if previous[name]:
                    request["previous_response_id"] = previous[name]
                started = time.perf_counter()
                await ws.send(json.dumps(request))
                first = True
                while True:
                    event = json.loads(await ws.recv())
                    if first:
                        times[name].append(time.perf_counter() - started)
                        first = False
                    if event["type"] == "response.completed":
                        previous[name] = event["response"]["id"]
                        break
                    if event["type"] == "error":
                        raise RuntimeError(f"bench turn failed through {name}: {event}")
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


def _protocol(chain: Chain) -> Protocol:
    """A protocol core with one open upstream connection, as a session has once its client attached."""
    protocol = Protocol(chain, Settings(keepalive_interval=0))
    opened = [c for c in protocol.start("ws://bench", "", None) if isinstance(c, OpenUpstream)][0]
    protocol.upstream_opened(opened.conn, Handshake("ws://bench", "open", opened.conn, True, 101, 0.0, []))
    return protocol


def _feed(protocol: Protocol, raw: str, events: list[str]) -> None:
    """The core's work for one turn, as the session does it: the client's create, then the upstream's events."""
    protocol.client_message(raw)
    conn = protocol.current.id if protocol.current is not None else 1
    for e in events:
        protocol.upstream_message(conn, e)


def per_turn_cost(turns: int, item_bytes: int = 20_000) -> dict[int, float]:
    """Median microseconds of core work per turn, at turns 10, 100 and 1000 of one chain."""
    protocol = _protocol(Chain(ChainStore(), max_chain_bytes=2**40))
    costs: list[int] = []
    for raw, events in _chain_messages(turns, item_bytes):
        started = time.perf_counter_ns()
        _feed(protocol, raw, events)
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
    protocol = _protocol(chain)
    for raw, events in _chain_messages(turns, item_bytes):
        _feed(protocol, raw, events)
    del raw, events
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    assert chain.head is not None and chain.head.history is not None
    json_bytes = len(json.dumps(chain.head.history.materialize()))
    ids = chain.response_ids
    del chain, protocol
    gc.collect()
    after_session = tracemalloc.get_traced_memory()[0] - base
    store.retire(ids, deadline=600.0)  # what the bridge does when the session ends (resume_ttl 600 s) ...
    store.sweep(now=600.0)  # ... and after the TTL
    del ids
    gc.collect()
    after_clear = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return json_bytes, held, after_session, after_clear


# -- the proxy process -----------------------------------------------------------------------------
def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Contention:
    """A busy loop per core beside the run, as on a laptop that is doing other work."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> "Contention":
        for _ in range(os.cpu_count() or 1):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        time.sleep(0.3)
        return self

    def __exit__(self, *exc: Any) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


# -- measurements -------------------------------------------------------------------------------------
@dataclass
class Round:
    rate: float  # events/s
    cpu_per_1000: float | None  # proxy CPU seconds per 1,000 events (None for the direct connection)


def _throughput(urls: dict[str, str], pids: dict[str, int], sessions: int, turns: int, rounds: int,
                fake: FakeUpstream) -> dict[str, list[Round]]:
    """Rounds of the same streaming workload on each path, in a rotating order (the machine drifts)."""
    out: dict[str, list[Round]] = {name: [] for name in urls}
    names = list(urls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _reset(fake)
            pid = pids.get(name)
            cpu0 = _cpu(pid) if pid else 0.0
            result = asyncio.run(_stream(urls[name], sessions, turns))
            cpu = (_cpu(pid) - cpu0) / result.events * 1000 if pid else None
            out[name].append(Round(result.rate, cpu))
    return out


def _median(values: list[float]) -> float:
    return statistics.median(values)


async def _time_to_101(url: str, count: int) -> float:
    """Seconds until ``count`` concurrent clients all have their 101 (the sessions are closed afterwards)."""
    started = time.perf_counter()
    conns = await asyncio.gather(*(connect(url, max_size=None, ping_interval=None, proxy=None, open_timeout=60)
                                   for _ in range(count)))
    took = time.perf_counter() - started
    await asyncio.gather(*(c.close() for c in conns))
    return took


def _time_to_101_single(url: str, rounds: int) -> float:
    return _median([asyncio.run(_time_to_101(url, 1)) for _ in range(rounds)])


def _resend_body(size: int) -> str:
    """A full-history resend after a reconnect (Codex's): text items and encrypted reasoning, about ``size`` bytes."""
    items: list[dict[str, Any]] = []
    n = total = 0
    rng = random.Random(0)
    while total < size:
        pair = [{"type": "message", "role": "user", "content": f"turn {n}: " + "please look at the logs " * 20},
                {"type": "reasoning", "summary": [], "encrypted_content": base64.b64encode(rng.randbytes(3000)).decode()}]
        items += pair
        total += len(json.dumps(pair))
        n += 1
    return json.dumps({"type": "response.create", "model": "m", "store": False, "input": items})


async def _resend(url: str, body: str, rounds: int) -> float:
    """Median seconds from sending a large response.create to its response completing (the client offers
    permessage-deflate, as Codex and the SDKs do)."""
    times = []
    async with connect(url, max_size=None, ping_interval=None, proxy=None, compression="deflate") as ws:
        for _ in range(rounds):
            started = time.perf_counter()
            await ws.send(body)
            while json.loads(await ws.recv())["type"] != "response.completed":
                pass
            times.append(time.perf_counter() - started)
    return _median(times)


async def _per_session(url: str, pid: int, count: int) -> tuple[float, float]:
    """RSS bytes and descriptors the proxy holds per open session (each has completed one turn)."""
    gc_base, fd_base = _rss(pid), _fds(pid)
    conns = []

    async def one() -> None:
        ws = await connect(url, max_size=None, ping_interval=None, proxy=None, open_timeout=60)
        await ws.send(json.dumps({"type": "response.create", "model": "m", "store": False, "input": "hi"}))
        while json.loads(await ws.recv())["type"] != "response.completed":
            pass
        conns.append(ws)

    await asyncio.gather(*(one() for _ in range(count)))
    await asyncio.sleep(0.5)
    rss, fds = _rss(pid), _fds(pid)
    await asyncio.gather(*(c.close() for c in conns))
    return (rss - gc_base) / count, (fds - fd_base) / count


async def _worst_stall(url: str, big: str) -> float:
    """The longest gap between two events of a paced stream while another client sends ``big``."""
    gaps: list[float] = []

    async def stream() -> None:
        async with connect(url, max_size=None, ping_interval=None, proxy=None) as ws:
            await ws.send(json.dumps({"type": "response.create", "model": "m", "store": False, "input": "stream"}))
            last = time.perf_counter()
            while True:
                event = json.loads(await ws.recv())
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
                if event["type"] == "response.completed":
                    return

    async def send_big() -> None:
        await asyncio.sleep(0.2)
        async with connect(url, max_size=None, ping_interval=None, proxy=None) as ws:
            await ws.send(big)
            while json.loads(await ws.recv())["type"] not in ("response.completed", "error"):
                pass

    await asyncio.gather(stream(), send_big())
    return max(gaps)


async def _long_session(url: str, turns: int) -> None:
    previous = None
    async with connect(url, max_size=None, ping_interval=None, proxy=None) as ws:
        for t in range(turns):
            request: dict[str, Any] = {"type": "response.create", "model": "m", "store": False, "input": f"t{t}"}
            if previous:
                request["previous_response_id"] = previous
            await ws.send(json.dumps(request))
            while (event := json.loads(await ws.recv()))["type"] != "response.completed":
                pass
            previous = event["response"]["id"]


def run(quick: bool) -> str:
    sessions, turns, deltas, rounds = (2, 5, 100, 3) if quick else (4, 20, 200, 5)
    paced_turns, chain_turns = (2, 100) if quick else (10, 1000)
    marks = (10, 100) if quick else (10, 100, 1000)
    repeats = 1 if quick else 2
    opens = 50 if quick else 300
    resend_mb = 1 if quick else 5
    long_turns = 100 if quick else 1000
    ping_timeout = 0.5
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp, FakeUpstream() as fake:
        fake.reply_deltas = deltas
        fake.stamp_deltas = True
        work = Path(tmp)
        rules = json.loads(json.dumps(RULES))
        rules["upstream"].update(ping_idle=0, ping_timeout=ping_timeout)
        reverse = ["--mode", f"reverse:http://127.0.0.1:{fake.port}"]
        procs = {
            "plain": Mitmdump(work / "plain", reverse, None, addon=False, verbosity="warn",
                              ready=QUIET),
            "replayguard": Mitmdump(work / "rg", reverse, rules, verbosity="warn", ready=QUIET),
        }
        try:
            for proc in procs.values():
                proc.start()
                urls = {"direct": fake.url + "/v1/responses"}
            urls.update({name: proc.url + "/v1/responses" for name, proc in procs.items()})
            pids = {name: proc.proc.pid for name, proc in procs.items() if proc.proc is not None}

            # 1. Streaming throughput and the proxy's CPU per 1,000 events, then the same under CPU contention.
            quiet = _throughput(urls, pids, sessions, turns, rounds, fake)
            with Contention():
                busy = _throughput(urls, pids, sessions, turns, rounds, fake)
            for label, result in (("", quiet), (" under contention", busy)):
                rate = {name: _median([r.rate for r in result[name]]) for name in result}
                ratios = sorted(rg.rate / pl.rate for rg, pl in zip(result["replayguard"], result["plain"]))
                rows.append((f"streaming throughput{label} (events/s, median of {rounds})",
                             f"direct {rate['direct']:,.0f} | plain {rate['plain']:,.0f} | replayguard "
                             f"{rate['replayguard']:,.0f}",
                             f"ratio {rate['replayguard'] / rate['plain']:.2f}x (rounds {ratios[0]:.2f}-"
                             f"{ratios[-1]:.2f}; target >= {'0.9' if label else '0.8'}x)"))
                cpu = {name: _median([r.cpu_per_1000 for r in result[name]]) for name in pids}
                rows.append((f"  proxy CPU per 1,000 events{label} (s)",
                             f"plain {cpu['plain']:.3f} | replayguard {cpu['replayguard']:.3f}",
                             f"ratio {cpu['replayguard'] / cpu['plain']:.2f}x"))

            # 2. Latency of a paced (unsaturated) stream: the proxy's, not queueing.
            fake.delta_interval = 0.002
            paced = {name: asyncio.run(_stream(urls[name], 2, paced_turns)) for name in procs}
            fake.delta_interval = 0.0
            pp, pr = paced["plain"], paced["replayguard"]
            for q, label in ((0.5, "p50"), (0.99, "p99")):
                rows.append((f"paced latency per event, {label} (ms)",
                             f"plain {pp.latency_ms(q):.2f} | replayguard {pr.latency_ms(q):.2f}",
                             f"added {pr.latency_ms(q) - pp.latency_ms(q):+.2f} ms"))

            # 3. Opening sessions: time to 101, one at a time and many at once.
            single = {name: _time_to_101_single(urls[name], 20 if quick else 40) for name in procs}
            rows.append(("time to 101, one session (ms, median)",
                         f"direct {_time_to_101_single(urls['direct'], 20) * 1000:.2f} | plain "
                         f"{single['plain'] * 1000:.2f} | replayguard {single['replayguard'] * 1000:.2f}",
                         f"ratio {single['replayguard'] / single['plain']:.2f}x (target <= 1.2x)"))
            many = {name: _median([asyncio.run(_time_to_101(urls[name], opens)) for _ in range(3)])
                    for name in procs}
            rows.append((f"time to 101, {opens} sessions at once (s, median of 3)",
                         f"plain {many['plain']:.2f} | replayguard {many['replayguard']:.2f}",
                         f"ratio {many['replayguard'] / many['plain']:.2f}x (target <= 1.2x)"))
            # The same with an upstream 20 ms away (a TLS handshake to a real API takes longer): replayguard's
            # handshake upstream runs while mitmproxy reaches its bridge.
            fake.handshake_delay = 0.02
            far = {name: _time_to_101_single(urls[name], 10 if quick else 20) for name in procs}
            far_many = {name: asyncio.run(_time_to_101(urls[name], opens)) for name in procs}
            fake.handshake_delay = 0.0
            rows.append(("  with the upstream 20 ms away: one | all at once (ms)",
                         " | ".join(f"{name} {far[name] * 1000:.1f} | {far_many[name] * 1000:.0f}" for name in procs),
                         f"ratios {far['replayguard'] / far['plain']:.2f}x | "
                         f"{far_many['replayguard'] / far_many['plain']:.2f}x"))

            # 4. Per session: memory and descriptors the proxy holds, each in a fresh process (memory an earlier
            # workload freed would otherwise hide what the sessions take).
            fake.reply_deltas = None
            held = {}
            for name, proc in procs.items():
                fresh = Mitmdump(work / f"fresh-{name}", reverse, proc.rules_path and rules, addon=proc.addon,
                                 verbosity="warn", ready=QUIET).start()
                try:
                    assert fresh.proc is not None
                    asyncio.run(_per_session(fresh.url + "/v1/responses", fresh.proc.pid, 10))  # warm up
                    held[name] = asyncio.run(_per_session(fresh.url + "/v1/responses", fresh.proc.pid, opens))
                finally:
                    fresh.stop()
            rows.append((f"proxy memory per open session ({opens} sessions, KiB RSS)",
                         f"plain {held['plain'][0] / 1024:.0f} | replayguard {held['replayguard'][0] / 1024:.0f}",
                         f"ratio {held['replayguard'][0] / max(held['plain'][0], 1):.2f}x (target <= 1.5x)"))
            rows.append(("  descriptors per open session",
                         f"plain {held['plain'][1]:.1f} | replayguard {held['replayguard'][1]:.1f}",
                         "replayguard: the client's, both ends of the bridge hop, its own upstream; plain's "
                         "eager upstream connection is still opened"))

            # 5. A large full-history resend, the client offering compression.
            body = _resend_body(resend_mb * 1_000_000)
            resend = {name: asyncio.run(_resend(urls[name], body, 3 if quick else 5)) for name in urls}
            rows.append((f"{len(body) / 1e6:.1f} MB resend, client offers permessage-deflate (ms, median)",
                         " | ".join(f"{name} {resend[name] * 1000:.0f}" for name in urls),
                         f"replayguard adds {(resend['replayguard'] - resend['plain']) * 1000:+.0f} ms "
                         "(its loopback hop does not compress)"))

            # 6. One large request beside a paced stream: the stream's longest gap.
            fake.reply_deltas, fake.delta_interval = 200, 0.002
            big = _resend_body(10_000_000 if quick else 40_000_000)
            stall = {name: asyncio.run(_worst_stall(urls[name], big)) for name in procs}
            fake.reply_deltas, fake.delta_interval = None, 0.0
            rows.append((f"worst stall of a stream beside a {len(big) / 1e6:.0f} MB request (ms)",
                         f"plain {stall['plain'] * 1000:.0f} | replayguard {stall['replayguard'] * 1000:.0f}",
                         f"added {(stall['replayguard'] - stall['plain']) * 1000:+.0f} ms"))

            overheads = asyncio.run(_recovery(urls["replayguard"], fake, ping_timeout, rounds))
            # One long chain through each proxy, side by side (see _first_event_times), twice in a full run; the
            # fake's records are cleared first so that no run pays for another's garbage-collector load. replayguard
            # runs here with the default ping_idle, as users do: with ping_idle 0 (above, for the recovery) every
            # continuation waits for a pong, and the fake answers it later the longer its chain. Per mark: the median
            # of the ten turns ending there (the better run's) and of the per-turn differences (the runs' mean: the
            # best of each mark apart could hide a growth).
            procs["replayguard"].stop()
            procs["replayguard"] = Mitmdump(work / "rg-chain", reverse, dict(RULES), verbosity="warn", ready=QUIET)
            procs["replayguard"].start()
            chain_urls = {name: proc.url + "/v1/responses" for name, proc in procs.items()}
            runs: list[dict[str, dict[int, float]]] = []
            for _ in range(repeats):
                _reset(fake)
                raw = asyncio.run(_first_event_times(chain_urls, chain_turns, 20_000))
                raw["added"] = [r - p for r, p in zip(raw["replayguard"], raw["plain"])]
                runs.append({name: _at_marks(values, marks) for name, values in raw.items()})
            first_event = {name: {m: min(run[name][m] for run in runs) for m in marks} for name in procs}
            first_event["added"] = {m: statistics.mean(run["added"][m] for run in runs) for m in marks}
        finally:
            for proc in procs.values():
                proc.stop()

        # 7. What limits.flow_messages saves over a long session with large deltas.
        fake.reply_deltas = 40
        _reset(fake)
        bounded = dict(rules, limits={"flow_messages": 1000})
        grown = {}
        for name, session_rules in (("all messages", rules), ("flow_messages 1000", bounded)):
            proc = Mitmdump(work / name.replace(" ", "-"), reverse, session_rules, verbosity="warn", ready=QUIET)
            proc.start()
            try:
                assert proc.proc is not None
                before = _rss(proc.proc.pid)
                asyncio.run(_long_session(proc.url + "/v1/responses", long_turns))
                grown[name] = _rss(proc.proc.pid) - before
            finally:
                proc.stop()
            _reset(fake)
        fake.reply_deltas = None
    rows.append((f"flow memory over a {long_turns}-turn session (MiB RSS growth)",
                 " | ".join(f"{name} {value / 2**20:.1f}" for name, value in grown.items()),
                 "limits.flow_messages bounds what mitmproxy keeps of a live flow"))
    for name in ("plain", "replayguard"):
        times = first_event[name]
        lo, hi = min(times), max(times)
        rows.append((f"time to first event, 20 KB turns, {name} (ms)",
                     " | ".join(f"turn {m}: {v * 1000:.2f}" for m, v in times.items()),
                     f"turn {hi}/turn {lo}: {times[hi] / times[lo]:.2f}x"))
    added = first_event["added"]
    lo, hi = min(added), max(added)
    rows.append(("  of which added by replayguard (ms)", " | ".join(f"turn {m}: {v * 1000:+.2f}" for m, v in added.items()),
                 f"turn {hi} - turn {lo}: {(added[hi] - added[lo]) * 1000:+.2f} ms (target <= 0.5 ms)"))
    rows.append(("recovery overhead (s, resend - ping timeout)",
                 f"median {statistics.median(overheads):.3f} | max {max(overheads):.3f} over {rounds}",
                 "target <= 0.2 s"))
    costs = per_turn_cost(100 if quick else 1000)
    first, last = min(costs), max(costs)
    rows.append(("per-turn core cost (us), 20 KB turns",
                 " | ".join(f"turn {m}: {c:.0f}" for m, c in costs.items()),
                 f"turn {last}/turn {first}: {costs[last] / costs[first]:.2f}x (target <= 1.5x)"))
    json_bytes, held_bytes, after, cleared = memory(50 if quick else 300)
    rows.append(("replay state memory", f"chain JSON {json_bytes / 2**20:.1f} MiB | held {held_bytes / 2**20:.1f} MiB "
                 f"| session ended {after / 2**20:.1f} MiB | after resume_ttl {cleared / 2**20:.2f} MiB",
                 f"held/JSON {held_bytes / json_bytes:.2f}x (target <= 1.5x); freed after the TTL"))
    rows.append(("Responses contentview, a 10 MB response.create", f"{render_seconds(10.0) * 1000:.0f} ms",
                 "target: well under 1 s"))
    width = max(len(r[0]) for r in rows)
    head = (f"python -m replayguard bench{' --quick' if quick else ''}: {sessions} sessions x {turns} turns x {deltas} "
            f"deltas (saturated, {rounds} rounds); paced: 2 sessions x {paced_turns} turns, a delta every 2 ms; one "
            f"chain of {chain_turns} turns; {opens} sessions opened at once")
    lines = [head, f"machine: {machine()}"]
    if quick:
        lines.append("QUICK RUN: small samples on a shared machine; its ratios are a smoke figure, not a verdict. "
                     "Run without --quick for the numbers.")
    lines.append("-" * len(head))
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
