"""Programs tests/test_run.py runs under `replayguard run`, configured only by the environment `run` gives them
(HTTPS_PROXY and the CA variables): nothing here names the proxy or its CA.

    python run_programs.py sdk URL TURNS          the openai Python SDK (AsyncOpenAI): a tool-call chain
    python run_programs.py interactive URL        a line-driven session on a terminal (see interactive())
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

TERMINAL = ("response.completed", "response.failed", "response.incomplete", "error")


def request(n: int, previous: str | None, pending: str | None) -> dict[str, Any]:
    """Turn n of a tool-call chain: a user message asking for a tool, or the output of the call just made."""
    if pending:
        new = [{"type": "function_call_output", "call_id": pending, "output": f"out {n}"}]
    else:
        new = [{"type": "message", "role": "user", "content": f"turn {n}: please run TOOL ls"}]
    body: dict[str, Any] = {"model": "m", "store": False, "input": new}
    if previous:
        body["previous_response_id"] = previous
    return body


def sdk(base_url: str, turns: int) -> int:
    """AsyncOpenAI: the synchronous client's WebSocket (websockets' threaded client) now and then hangs its first
    request over TLS 1.3, whatever the server (README, "What each client does with them")."""
    return asyncio.run(_sdk(base_url, turns))


async def _sdk(base_url: str, turns: int) -> int:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, max_retries=0)  # the key from OPENAI_API_KEY
    previous = pending = None
    async with client.responses.connect() as conn:
        for n in range(1, turns + 1):
            await conn.response.create(**request(n, previous, pending))
            event = None
            async for event in conn:
                if event.type in TERMINAL:
                    break
            if event is None or event.type != "response.completed":
                print(f"turn {n}: {event.type if event else 'connection closed'}: {event}", flush=True)
                return 1
            calls = [i for i in event.response.output if i.type == "function_call"]
            previous, pending = event.response.id, (calls[0].call_id if calls else None)
            print(f"turn {n}: completed {event.response.id}", flush=True)
    return 0


def interactive(url: str) -> int:
    """Reads lines: `exit N` exits with N; `orphan` sends a tool output whose call the upstream never made (it
    answers with an error); any other line is the next turn of a tool-call chain. Each outcome is printed, with
    what a terminal program sees: a TTY, the window size and its changes, Ctrl-C (handled: it goes on)."""
    def size() -> str:
        try:
            got = os.get_terminal_size(sys.stdout.fileno())
        except OSError:
            return "none"
        return f"{got.columns}x{got.lines}"

    signal.signal(signal.SIGWINCH, lambda *_: print(f"resized {size()}", flush=True))
    signal.signal(signal.SIGINT, lambda *_: print("got SIGINT", flush=True))
    print(f"tty {sys.stdin.isatty()} {sys.stdout.isatty()} size {size()}", flush=True)
    return asyncio.run(_interactive(url))


async def _interactive(url: str) -> int:
    # websockets' asyncio client: its threaded client reads the TLS connection in a thread of its own while the
    # caller writes, which OpenSSL does not allow and which now and then hung the first request over TLS 1.3.
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    loop = asyncio.get_running_loop()
    headers = {"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"}
    async with connect(url, additional_headers=headers, open_timeout=30) as ws:  # proxy and CA: from the environment
        previous = pending = None
        n = 0
        print("ready>", flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):  # pings are answered meanwhile
            line = line.strip()
            if line.startswith("exit"):
                return int(line.split()[1])
            n += 1
            body = request(n, previous, pending)
            if line == "orphan":
                body = {"model": "m", "store": False, "input": [
                    {"type": "function_call_output", "call_id": "call_never_made", "output": "x"}]}
            try:
                await ws.send(json.dumps({"type": "response.create", **body}))
                while True:
                    event = json.loads(await asyncio.wait_for(ws.recv(), 60))
                    if event["type"] in TERMINAL:
                        break
            except ConnectionClosed as e:
                print(f"turn {n}: connection closed {e.rcvd.code if e.rcvd else None}", flush=True)
                return 1
            if event["type"] != "response.completed":
                print(f"turn {n}: {event['type']} {(event.get('error') or {}).get('code')}", flush=True)
            else:
                response = event["response"]
                calls = [i for i in response["output"] if i["type"] == "function_call"]
                previous, pending = response["id"], (calls[0]["call_id"] if calls else None)
                print(f"turn {n}: completed ({len(calls)} calls)", flush=True)
            print("ready>", flush=True)
    return 0


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "sdk":
        sys.exit(sdk(sys.argv[2], int(sys.argv[3])))
    sys.exit(interactive(sys.argv[2]))
