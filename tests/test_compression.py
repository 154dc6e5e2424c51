"""permessage-deflate: replayguard's loopback hop does not compress (mitmproxy would inflate and deflate every message
on both of its legs, and every compressing connection holds zlib state), so the client's leg follows; client.compression
turns it back on; the upstream leg negotiates compression as a direct client would."""

from __future__ import annotations

from conftest import Client, completed, user


def negotiated(client: Client) -> list[str]:
    return [ext.name for ext in client.ws.protocol.extensions]


def test_the_client_leg_does_not_compress_and_the_upstream_leg_does(fake, mitm):
    proxy = mitm(fake)
    client = Client(proxy.url + "/v1/responses")  # offers permessage-deflate, as Codex and the SDKs do
    completed(client.turn({"model": "m", "store": False, "input": [user("hi")]}))
    assert negotiated(client) == []
    assert "permessage-deflate" in fake.handshakes[0]["headers"]["sec-websocket-extensions"]
    client.close()


def test_client_compression_turns_it_back_on(fake, mitm):
    proxy = mitm(fake, client={"compression": True})
    client = Client(proxy.url + "/v1/responses")
    completed(client.turn({"model": "m", "store": False, "input": [user("hi " * 1000)]}))
    assert negotiated(client) == ["permessage-deflate"]
    client.close()
