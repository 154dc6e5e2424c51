"""`python -m replayguard client URL`: a small scripted Responses WebSocket client, to drive a tool-call chain
through replayguard without Codex CLI or the SDK (for the offline recipe in the README).

Odd turns ask the model for a tool call (the fake upstream's scripted model answers "TOOL ..." with a
function_call); even turns send its function_call_output chained with previous_response_id, as Codex does.
Each turn prints one line; an error event ends the run with exit status 1.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from websockets.sync.client import connect

from ..core.chain import TERMINAL


def run(url: str, turns: int, headers: dict[str, str], store: bool = False, timeout: float = 30,
        connect_to: tuple[str, int] | None = None, cafile: str | None = None, proxy: str | None = None) -> int:
    """Drive the chain. ``connect_to`` opens the TCP connection to that address while the URL's host is still the
    name sent in SNI and Host (as curl's --connect-to); ``cafile`` is the CA to trust for wss (mitmproxy's)."""
    previous: str | None = None
    pending_call: dict[str, Any] | None = None
    kwargs: dict[str, Any] = {"proxy": proxy}
    if url.startswith("wss:"):
        kwargs["ssl"] = ssl.create_default_context(cafile=cafile)
    if connect_to is not None:
        kwargs["sock"] = socket.create_connection(connect_to, timeout=timeout)
        kwargs.pop("proxy")
        if url.startswith("wss:"):
            kwargs["server_hostname"] = urlsplit(url).hostname
    with connect(url, additional_headers=headers, max_size=None, open_timeout=timeout, **kwargs) as ws:
        for number in range(1, turns + 1):
            if pending_call is not None:
                new: list[dict[str, Any]] = [{"type": "function_call_output", "call_id": pending_call["call_id"],
                                              "output": f"output of {pending_call['call_id']}"}]
            else:
                new = [{"type": "message", "role": "user", "content": f"turn {number}: please run TOOL ls"}]
            request: dict[str, Any] = {"type": "response.create", "model": "demo", "store": store, "input": new}
            if previous is not None:
                request["previous_response_id"] = previous
            started = time.monotonic()
            ws.send(json.dumps(request))
            while True:
                event = json.loads(ws.recv(timeout=timeout))
                if event.get("type") in TERMINAL:
                    break
            ms = (time.monotonic() - started) * 1000
            if event["type"] != "response.completed":
                print(f"turn {number}: {event['type']}: {json.dumps(event.get('error') or event.get('response'))}",
                      flush=True)
                return 1
            response = event["response"]
            previous = response["id"]
            calls = [i for i in response.get("output", []) if i.get("type") == "function_call"]
            pending_call = calls[0] if calls else None
            sent = ", ".join(f"{i['type']}({i['call_id']})" if "call_id" in i else i["type"] for i in new)
            got = ", ".join(f"{i['type']}({i['call_id']})" if "call_id" in i else i["type"]
                            for i in response.get("output", []))
            print(f"turn {number}: {previous} completed in {ms:.0f} ms  sent: {sent}  got: {got}", flush=True)
    return 0
