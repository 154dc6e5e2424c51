"""`python -m replayguard client URL`: a small scripted Responses WebSocket client, to drive a tool-call chain
through replayguard without Codex CLI or the SDK (for the offline recipe in the README).

Odd turns ask the model for a tool call (the fake upstream's scripted model answers "TOOL ..." with a
function_call); even turns send its function_call_output chained with previous_response_id, as Codex does.
Each turn prints one line. Exit status: 0 every turn completed; 1 a turn ended in an error event, or the
connection closed or went silent mid-run; 2 no WebSocket could be opened (refused, unreachable, handshake answered
with an HTTP error, TLS not trusted). Every failure is one line on stderr.

It runs on websockets' asyncio client, not the threaded one: the threaded client reads the socket in a thread of
its own while the caller writes, and two threads using one TLS connection at once is unsafe in OpenSSL; over TLS 1.3
the session tickets a server sends right after the handshake made the first request hang now and then.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from ..core.chain import TERMINAL
from .failure import FAILED, ToolError, describe


def run(url: str, turns: int, headers: dict[str, str], store: bool = False, timeout: float = 30,
        connect_to: tuple[str, int] | None = None, cafile: str | None = None, proxy: str | None = None) -> int:
    """Drive the chain. ``connect_to`` opens the TCP connection to that address while the URL's host is still the
    name sent in SNI and Host (as curl's --connect-to); ``cafile`` is the CA to trust for wss (mitmproxy's)."""
    return asyncio.run(_run(url, turns, headers, store, timeout, connect_to, cafile, proxy))


async def _run(url: str, turns: int, headers: dict[str, str], store: bool, timeout: float,
               connect_to: tuple[str, int] | None, cafile: str | None, proxy: str | None) -> int:
    ws = await _open(url, headers, timeout, connect_to, cafile, proxy)
    async with ws:
        return await _turns(ws, turns, store, timeout)


async def _open(url: str, headers: dict[str, str], timeout: float, connect_to: tuple[str, int] | None,
                cafile: str | None, proxy: str | None) -> ClientConnection:
    """The WebSocket, or a ToolError that says in one line why there is none."""
    kwargs: dict[str, Any] = {"proxy": proxy}
    try:
        if url.startswith("wss:"):
            kwargs["ssl"] = ssl.create_default_context(cafile=cafile)
    except OSError as e:  # the CA file is missing or unreadable (ssl.SSLError for one that is no certificate)
        raise ToolError(f"cannot use CA file {cafile}: {describe(e)}") from None
    where = f"{connect_to[0]}:{connect_to[1]}" if connect_to else (f"{url} through {proxy}" if proxy else url)
    try:
        if connect_to is not None:  # the TCP connection goes there; SNI and Host still name the URL's host
            kwargs.update(host=connect_to[0], port=connect_to[1], proxy=None)
        return await connect(url, additional_headers=headers, max_size=None, open_timeout=timeout, **kwargs)
    except InvalidStatus as e:
        body = e.response.body.decode(errors="replace").strip().replace("\n", " ")
        raise ToolError(f"{url} answered the WebSocket handshake with HTTP {e.response.status_code}"
                        + (f": {body[:300]}" if body else "")) from None
    except ssl.SSLCertVerificationError as e:
        hint = "" if cafile else " (for mitmproxy's certificate, --cacert ~/.mitmproxy/mitmproxy-ca-cert.pem)"
        raise ToolError(f"cannot connect to {where}: TLS certificate not trusted: {e.verify_message}{hint}") from None
    except TimeoutError:
        raise ToolError(f"cannot connect to {where}: no answer within {timeout:g} s (--timeout)") from None
    except OSError as e:  # refused, unreachable, unknown name, TLS failure
        raise ToolError(f"cannot connect to {where}: {describe(e)}") from None
    except (WebSocketException, ImportError) as e:  # not a WebSocket server, a proxy's refusal, python-socks missing
        raise ToolError(f"cannot connect to {where}: {e}") from None


async def _turns(ws: ClientConnection, turns: int, store: bool, timeout: float) -> int:
    previous: str | None = None
    pending_call: dict[str, Any] | None = None
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
        try:
            await ws.send(json.dumps(request))
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), timeout))
                if event.get("type") in TERMINAL:
                    break
        except ConnectionClosed as e:
            close = e.rcvd or e.sent
            how = f"close {close.code}{f' ({close.reason})' if close.reason else ''}" if close else "no close frame"
            raise ToolError(f"turn {number}: the connection closed before the turn ended: {how}", FAILED) from None
        except TimeoutError:
            raise ToolError(f"turn {number}: no event within {timeout:g} s (--timeout)", FAILED) from None
        except ValueError as e:
            raise ToolError(f"turn {number}: the server sent a message that is not JSON ({e})", FAILED) from None
        ms = (time.monotonic() - started) * 1000
        if event["type"] != "response.completed":
            print(f"turn {number}: {event['type']}: {json.dumps(event.get('error') or event.get('response'))}",
                  flush=True)
            return FAILED
        response = event["response"]
        previous = response["id"]
        calls = [i for i in response.get("output", []) if i.get("type") == "function_call"]
        pending_call = calls[0] if calls else None
        sent = ", ".join(f"{i['type']}({i['call_id']})" if "call_id" in i else i["type"] for i in new)
        got = ", ".join(f"{i['type']}({i['call_id']})" if "call_id" in i else i["type"]
                        for i in response.get("output", []))
        print(f"turn {number}: {previous} completed in {ms:.0f} ms  sent: {sent}  got: {got}", flush=True)
    return 0
