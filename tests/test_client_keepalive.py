"""Sessions outlive mitmproxy's idle timeout: replayguard pings the client through mitmproxy while it thinks between
turns (mitmproxy closes a connection idle for tcp_timeout, with or without an addon); a client that stops answering
is treated as gone. mitmproxy 12 shortens the timeout with --set tcp_timeout; mitmproxy 11, where it is a constant,
with tests/short_tcp_timeout.py."""

from __future__ import annotations

import base64
import json
import os
import socket
import time

import pytest
from conftest import ROOT, Client, completed, user
from websockets.exceptions import ConnectionClosed

from replayguard.tools.harness import Mitmdump

IDLE_TIMEOUT = 2


def short_timeout_args() -> tuple[list[str], dict[str, str]]:
    from mitmproxy import options

    if "tcp_timeout" in options.Options().keys():
        return ["--set", f"tcp_timeout={IDLE_TIMEOUT}"], {}
    return ["-s", str(ROOT / "tests" / "short_tcp_timeout.py")], {"REPLAYGUARD_TEST_TCP_TIMEOUT": str(IDLE_TIMEOUT)}


def test_an_idle_client_outlives_mitmproxys_idle_timeout(fake, mitm, tmp_path):
    args, env = short_timeout_args()
    proxy = mitm(fake, args=args, env=env)
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hi")]}))
    time.sleep(IDLE_TIMEOUT * 3.5)  # thinking, for several idle timeouts
    r2 = completed(client.turn({"model": "m", "store": False, "previous_response_id": r1["id"],
                                "input": [user("still here")]}))
    assert r2["id"] and len(fake.handshakes) == 1  # the same client WebSocket and upstream connection
    client.close()

    # The same idle gap through plain mitmdump: mitmproxy closes the client (what replayguard prevents).
    plain = Mitmdump(tmp_path / "plain", ["--mode", f"reverse:http://127.0.0.1:{fake.port}", *args], None,
                     addon=False, env=env).start()
    try:
        other = Client(plain.url + "/v1/responses")
        completed(other.turn({"model": "m", "store": False, "input": [user("hi")]}))
        time.sleep(IDLE_TIMEOUT * 3.5)
        with pytest.raises((ConnectionClosed, OSError, TimeoutError)):
            other.turn({"model": "m", "store": False, "input": [user("still here?")]}, timeout=3)
    finally:
        plain.stop()


def raw_websocket(port: int) -> socket.socket:
    """A client socket past its WebSocket handshake (the 101 read to its end, no frame after it), that answers
    nothing unless the test makes it."""
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0]
    return sock


def test_a_client_that_stops_answering_pings_is_gone(fake, mitm):
    proxy = mitm(fake, client={"keepalive_interval": 0.3, "pong_timeout": 0.5}, limits={"resume_ttl": 60})
    sock = raw_websocket(proxy.port)
    assert fake.wait_for(lambda: fake.open_connections() == 1)
    # ...and now the client reads nothing, so it answers no ping.
    proxy.wait_log(r"the client answered no ping within 0\.5s; treated as gone", timeout=10)
    assert fake.wait_for(lambda: fake.open_connections() == 0)  # its upstream connection is closed
    sock.close()


def test_a_client_that_answers_no_ping_during_a_turn_reads_why_before_the_close(fake, mitm):
    """Too busy to answer pings, not gone: when it reads again, a structured error (a 5xx it retries) precedes the
    close, as for every other end of a turn in flight."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import CloseConnection, Message, TextMessage

    fake.response_delay = 5  # the turn is still in flight when the pings go unanswered
    proxy = mitm(fake, client={"keepalive_interval": 0.3, "pong_timeout": 0.5})
    sock = raw_websocket(proxy.port)
    ws = Connection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Message(data='{"type": "response.create", "model": "m", "store": false, '
                                      '"input": [{"role": "user", "content": "hi"}]}')))
    # ...and now the client reads nothing, so it answers no ping.
    proxy.wait_log(r"the client answered no ping within 0\.5s; treated as gone", timeout=10)
    sock.settimeout(10)
    texts: list[dict] = []
    closed: int | None = None
    while closed is None:
        data = sock.recv(65536)
        if not data:
            break
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, TextMessage):
                texts.append(json.loads(event.data))
            elif isinstance(event, CloseConnection):
                closed = event.code
    sock.close()
    assert [e["type"] for e in texts] == ["error"], texts
    assert texts[0]["status"] == 503 and texts[0]["error"]["code"] == "replayguard_client_unresponsive", texts
    assert closed == 1011
