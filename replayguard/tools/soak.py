"""`python -m replayguard soak`: many concurrent tool-call sessions through a real mitmdump with replayguard,
against the fake upstream failing at random under a fixed seed (closes, TCP drops, silent connections, refused
handshakes), and clients misbehaving at random too: leaving mid-turn, presenting another key's response id, going
silent. It exits 1 on a lost turn, leaked state, an internal error of replayguard's, or one principal's items sent
on another's connection.

Clients behave like Codex CLI: each has a key of its own (carried where clients carry one: the Authorization,
api-key or x-api-key header, the query string, a subprotocol entry, a cookie, or no credential at all), chains with
previous_response_id, and when a turn fails
closed with replayguard's error event (or its connection is gone) reconnects and resends its full history without
previous_response_id.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ..core.chain import TERMINAL
from .fake_upstream import FakeUpstream
from .harness import Mitmdump

RULES: dict[str, Any] = {
    "match": [{"path": "*/responses"}],
    "upstream": {"ping_idle": 0, "ping_timeout": 0.5, "keepalive_interval": 0, "first_event_timeout": 1.5,
                 "connect_timeout": 3},
    "recovery": {"policy": "pair-aware", "max_retries": 1},
    "limits": {"resume_ttl": 0},
    "client": {"keepalive_interval": 0.5, "pong_timeout": 1.0},  # a silent client is found within 1.5 s
}
CLIENT_FAULTS = {"leave": 0.04, "stale": 0.04, "silent": 0.02}  # per turn
SILENCE = 2.5  # seconds a silent client reads nothing
MAX_ATTEMPTS = 6  # per turn, before the client gives up (counted)


@dataclass
class Counts:
    sessions: int = 0
    turns: int = 0
    completed: int = 0
    fail_closed: int = 0  # attempts answered with replayguard's structured error (then the client reconnected)
    fail_codes: dict[str, int] = field(default_factory=dict)  # replayguard's error codes, by code
    upstream_errors: int = 0  # attempts answered with the upstream's own error
    lost: int = 0  # attempts that ended with neither a terminal event nor a structured error
    abandoned: int = 0  # turns the client gave up on after MAX_ATTEMPTS
    reconnects: int = 0
    refused_connects: int = 0  # the client's own handshake was refused (an upstream refusal passed on); retried
    faults: dict[str, int] = field(default_factory=dict)
    recoveries: int = 0
    no_tool_call_found: int = 0
    state_left: dict[str, int] = field(default_factory=dict)
    client_faults: dict[str, int] = field(default_factory=dict)  # leave, stale, silent: how often each was done
    left_then_resumed: int = 0  # turns redone after the client left mid-turn
    stale_refused: int = 0  # another key's response id answered as the upstream would (not resumed)
    stale_resumed: int = 0  # ...and resumed anyway (must be 0)
    silent_dropped: int = 0  # silent clients replayguard closed (they reconnected)
    cross_principal: int = 0  # upstream requests carrying another principal's items (must be 0)
    internal_errors: int = 0  # replayguard internal errors in the log (must be 0)
    seconds: float = 0.0

    @property
    def unreplayable(self) -> int:
        """Fail-closes because the replay was not self-consistent: never right for these well-behaved clients."""
        return self.fail_codes.get("previous_response_not_found", 0)

    def ok(self) -> bool:
        return (self.lost == 0 and self.no_tool_call_found == 0 and self.abandoned == 0 and self.unreplayable == 0
                and self.completed == self.turns and not any(self.state_left.values()) and self.stale_resumed == 0
                and self.cross_principal == 0 and self.internal_errors == 0)


async def _attempt(ws: Any, request: dict[str, Any], timeout: float) -> tuple[str, dict[str, Any] | None]:
    """Send one turn; returns (outcome, terminal event): completed | fail_closed | upstream_error | lost."""
    try:
        await ws.send(json.dumps(request))
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            if event.get("type") not in TERMINAL:
                continue
            if event["type"] == "response.completed":
                return "completed", event
            message = str((event.get("error") or {}).get("message", ""))
            if event["type"] == "error" and message.startswith("replayguard: "):
                return "fail_closed", event
            return "upstream_error", event
    except (ConnectionClosed, asyncio.TimeoutError):
        return "lost", None


# Every place a client may carry its credential; session n uses FORMS[n % len(FORMS)], its intruder the same form
# with another key. "none" sends no credential at all (the session's own x-soak-client header only names it for
# the cross-principal count: it is not a credential).
FORMS = ("authorization", "api-key", "x-api-key", "query", "subprotocol", "cookie", "none")


def credential(form: str, key: str) -> tuple[str, dict[str, str], list[str] | None]:
    """(query string, headers, subprotocols) that carry ``key`` in ``form``."""
    if form == "authorization":
        return "", {"Authorization": f"Bearer sk-{key}"}, None
    if form in ("api-key", "x-api-key"):
        return "", {form: key}, None
    if form == "query":
        return f"?api-version=2026-01-01&api-key={key}", {}, None
    if form == "subprotocol":
        return "", {}, [f"openai-insecure-api-key.{key}", "openai-beta.responses-v1"]
    if form == "cookie":
        return "", {"Cookie": f"theme=dark; session={key}"}, None
    return "", {"x-soak-client": key}, None


async def _connect(url: str, counts: Counts, key: str, form: str = "authorization") -> Any:
    """Open the client's WebSocket; a refused handshake (the upstream's 5xx, passed on) is retried, as clients do."""
    query, headers, subprotocols = credential(form, key)
    for _ in range(20):
        try:
            return await connect(url + query, max_size=None, ping_interval=None, open_timeout=10, proxy=None,
                                 additional_headers=headers, subprotocols=subprotocols)  # type: ignore[arg-type]
        except InvalidStatus:
            counts.refused_connects += 1
            await asyncio.sleep(0.05)
    raise RuntimeError("the client could not connect 20 times in a row")


def _count(counts: Counts, fault: str) -> None:
    counts.client_faults[fault] = counts.client_faults.get(fault, 0) + 1


async def _leave_mid_turn(ws: Any, request: dict[str, Any]) -> None:
    """Send the turn, read a little of its response, and go away without a word."""
    await ws.send(json.dumps(request))
    try:
        await asyncio.wait_for(ws.recv(), 2)
    except (ConnectionClosed, asyncio.TimeoutError):
        pass
    ws.transport.abort()


async def _stale(url: str, n: int, victim_id: str, counts: Counts) -> None:
    """Another key (in the same form) presents this session's response id: it must get the upstream's answer, not
    this chain."""
    ws = await _connect(url, counts, f"soak-intruder-{n}", FORMS[n % len(FORMS)])
    try:
        request = {"type": "response.create", "model": "m", "store": False, "previous_response_id": victim_id,
                   "input": [{"type": "message", "role": "user", "content": "intruder asks"}]}
        outcome, event = await _attempt(ws, request, timeout=20)
        if outcome == "completed":
            counts.stale_resumed += 1
        else:
            counts.stale_refused += 1
    finally:
        await ws.close()


async def _silence(ws: Any) -> bool:
    """Read nothing (no pongs) for a while; True when replayguard closed the connection meanwhile."""
    ws.transport.pause_reading()
    await asyncio.sleep(SILENCE)
    ws.transport.resume_reading()
    try:
        pong = await ws.ping()
        await asyncio.wait_for(pong, 2)
    except (ConnectionClosed, asyncio.TimeoutError):
        return True
    return False


async def _session(url: str, n: int, turns: int, counts: Counts, rng: random.Random) -> None:
    history: list[dict[str, Any]] = []  # everything the upstream should see, as the client keeps it
    previous: str | None = None
    pending: dict[str, Any] | None = None
    key, form = f"soak-{n}", FORMS[n % len(FORMS)]
    ws = await _connect(url, counts, key, form)
    try:
        for t in range(turns):
            counts.turns += 1
            fault = rng.choices([*CLIENT_FAULTS, None], [*CLIENT_FAULTS.values(), 1 - sum(CLIENT_FAULTS.values())])[0]
            if fault == "stale" and previous is not None:
                _count(counts, fault)
                await _stale(url, n, previous, counts)
            elif fault == "silent":
                _count(counts, fault)
                if await _silence(ws):
                    counts.silent_dropped += 1
                    ws = await _connect(url, counts, key, form)
                    counts.reconnects += 1
                    previous = None
            if pending is not None:
                new = [{"type": "function_call_output", "call_id": pending["call_id"], "output": f"s{n} t{t}"}]
            else:
                new = [{"type": "message", "role": "user", "content": f"s{n} t{t}: please run TOOL ls"
                        if rng.random() < 0.6 else f"s{n} t{t}: hello"}]
            for _ in range(MAX_ATTEMPTS):
                request: dict[str, Any] = {"type": "response.create", "model": "m", "store": False}
                if previous is not None:
                    request.update(previous_response_id=previous, input=new)
                else:
                    request["input"] = history + new  # after a reconnect: the full history, as Codex resends it
                if fault == "leave":
                    fault = None
                    _count(counts, "leave")
                    await _leave_mid_turn(ws, request)
                    ws = await _connect(url, counts, key, form)
                    counts.reconnects += 1
                    counts.left_then_resumed += 1
                    previous = None
                    continue
                outcome, event = await _attempt(ws, request, timeout=20)
                if outcome == "completed":
                    assert event is not None
                    response = event["response"]
                    history += new + response["output"]
                    previous = response["id"]
                    calls = [i for i in response["output"] if i.get("type") == "function_call"]
                    pending = calls[0] if calls else None
                    counts.completed += 1
                    break
                setattr(counts, outcome, getattr(counts, outcome) + 1)
                if outcome == "fail_closed" and event is not None:
                    code = str(event["error"].get("code"))
                    counts.fail_codes[code] = counts.fail_codes.get(code, 0) + 1
                # Like Codex: drop the socket, reconnect, resend the full history without previous_response_id.
                await ws.close()
                ws = await _connect(url, counts, key, form)
                counts.reconnects += 1
                previous = None
            else:
                counts.abandoned += 1
                return
    finally:
        await ws.close()


async def _chaos(fake: FakeUpstream, rng: random.Random, interval: float, stop: asyncio.Event,
                 counts: Counts) -> None:
    kinds = ["close", "drop", "blackhole", "refuse"]
    weights = [3, 3, 2, 2]
    while not stop.is_set():
        await asyncio.sleep(interval * (0.5 + rng.random()))
        kind = rng.choices(kinds, weights)[0]
        pick = rng.random()
        if kind == "refuse":
            fake.refuse_next(1, rng.choice([502, 503]))
            done = True
        else:
            done = await asyncio.to_thread(fake.break_one, kind, pick)
        if done:
            counts.faults[kind] = counts.faults.get(kind, 0) + 1


async def _run_clients(url: str, fake: FakeUpstream, sessions: int, turns: int, seed: int, interval: float,
                       counts: Counts) -> None:
    stop = asyncio.Event()
    chaos = asyncio.ensure_future(_chaos(fake, random.Random(seed), interval, stop, counts))
    try:
        await asyncio.gather(*(_session(url, n, turns, counts, random.Random(seed * 1000 + n))
                               for n in range(sessions)))
    finally:
        stop.set()
        await chaos


def run(sessions: int = 100, turns: int = 20, seed: int = 1, interval: float = 0.05) -> Counts:
    counts = Counts(sessions=sessions)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, FakeUpstream() as fake:
        proxy = Mitmdump(Path(tmp), ["--mode", f"reverse:http://127.0.0.1:{fake.port}"], RULES)
        proxy.start()
        try:
            asyncio.run(_run_clients(proxy.url + "/v1/responses", fake, sessions, turns, seed, interval, counts))
            # Sessions end when their closes have gone through; closing a silent upstream connection gives up after
            # the 2 s close timeout. State still held after that is a leak.
            time.sleep(3.0)
        finally:
            proxy.stop()
        counts.recoveries = len(re.findall(r"-> (?:replay|resend)", proxy.log))
        m = re.search(r"replayguard: state at exit: (.*)", proxy.log)
        counts.state_left = ({k: int(v) for k, v in (p.rsplit(" ", 1) for p in m.group(1).split(", "))}
                             if m else {"stats line missing": 1})
        counts.no_tool_call_found = sum(1 for _, e in list(fake.sent)
                                        if e.get("type") == "error" and "No tool call found" in json.dumps(e))
        counts.internal_errors = len(re.findall(r"replayguard internal error", proxy.log))
        counts.cross_principal = _cross_principal(fake)
    counts.seconds = time.monotonic() - started
    return counts


def _owner(handshake: dict[str, Any]) -> str | None:
    """The soak session whose key (in whichever form) opened this upstream connection; None for an intruder."""
    headers = handshake["headers"]
    places = [headers.get(h, "") for h in ("authorization", "api-key", "x-api-key", "cookie", "sec-websocket-protocol",
                                           "x-soak-client")] + [handshake.get("path", "")]
    for text in places:
        m = re.search(r"(?<![-\w])(?:sk-)?soak-(\d+)\b", text)
        if m:
            return m.group(1)
    return None


def _cross_principal(fake: FakeUpstream) -> int:
    """Upstream requests carrying items of another session than the key on their connection's handshake."""
    owners = {h["conn"]: _owner(h) for h in fake.handshakes if h["conn"] is not None}
    crossed = 0
    for conn, message in list(fake.received):
        if message.get("type") != "response.create":
            continue
        owner = owners.get(conn)
        sessions = set(re.findall(r"\bs(\d+) t\d+", json.dumps(message.get("input"))))
        if sessions - ({owner} if owner else set()):
            crossed += 1
    return crossed


def report(c: Counts) -> str:
    rows = [
        ("sessions x turns", f"{c.sessions} x {c.turns // max(c.sessions, 1)} = {c.turns} turns"),
        ("faults injected by the upstream", ", ".join(f"{k} {v}" for k, v in sorted(c.faults.items())) or "none"),
        ("recoveries by replayguard", str(c.recoveries)),
        ("turns completed", f"{c.completed} of {c.turns}"),
        ("attempts failed closed (structured error)",
         f"{c.fail_closed}" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(c.fail_codes.items()))})"
                               if c.fail_codes else "")),
        ("of them: replay not self-consistent (must be 0)", str(c.unreplayable)),
        ("client reconnects after a fail-close", str(c.reconnects)),
        ("client handshakes refused (retried)", str(c.refused_connects)),
        ("attempts with an upstream error", str(c.upstream_errors)),
        ("attempts lost (must be 0)", str(c.lost)),
        ("turns abandoned (must be 0)", str(c.abandoned)),
        ('"No tool call found" from the upstream (must be 0)', str(c.no_tool_call_found)),
        ("client faults done (leave mid-turn, stale id under another key, silent)",
         ", ".join(f"{k} {v}" for k, v in sorted(c.client_faults.items())) or "none"),
        ("turns redone after leaving mid-turn", str(c.left_then_resumed)),
        ("stale ids under another key: refused / resumed (must be 0)", f"{c.stale_refused} / {c.stale_resumed}"),
        ("silent clients closed by replayguard", str(c.silent_dropped)),
        ("requests carrying another principal's items (must be 0)", str(c.cross_principal)),
        ("replayguard internal errors (must be 0)", str(c.internal_errors)),
        ("per-flow state left at exit (must be 0)", ", ".join(f"{k} {v}" for k, v in c.state_left.items())),
        ("time", f"{c.seconds:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    lines.append("PASS" if c.ok() else "FAIL")
    return "\n".join(lines)
