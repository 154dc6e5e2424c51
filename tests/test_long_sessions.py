"""Long sessions: the upstream's connection age limit (60 minutes, shortened here) and rotation before it. A session
that outlives many upstream connections keeps its chain, tool calls included."""

from __future__ import annotations

from typing import Any

from conftest import Client, tool_chain, user


def assert_replays_paired(fake: Any) -> list[dict[str, Any]]:
    replays = [m for _, m in list(fake.received)
               if m.get("type") == "response.create" and "previous_response_id" not in m and len(m["input"]) > 1]
    for replay in replays:
        seen = set()
        for item in replay["input"]:
            if item["type"] == "function_call":
                seen.add(item["call_id"])
            if item["type"] == "function_call_output":
                assert item["call_id"] in seen, f"replay orphans {item['call_id']}"
    assert not any("No tool call found" in str(e) for _, e in list(fake.sent))
    return replays


def test_session_outlives_many_rotations_and_keeps_its_chain(fake, mitm):
    fake.max_connection_age = 1.6  # the upstream's hard limit
    proxy = mitm(fake, upstream={"rotation_age": 1.0, "ping_idle": 20})
    client = Client(proxy.url + "/v1/responses")
    responses = tool_chain(client, turns=24, pause=0.25)
    assert len(responses) == 24
    assert len(fake.handshakes) >= 5  # many upstream connections over one client session
    assert fake.limit_errors == 0  # rotation came first, every time
    replays = assert_replays_paired(fake)
    assert len(replays) == len(fake.handshakes) - 1  # every new connection started with the full chain
    last = replays[-1]["input"]
    assert last[0] == user("turn 0: please run TOOL ls")  # ... from the very first turn
    assert not any(e["type"] == "error" for e in client.received)
    assert fake.wait_for(lambda: fake.open_connections() == 1)  # old connections were closed
    client.close()


def test_upstream_age_limit_hits_idle_connections_and_the_chain_goes_on(fake, mitm):
    fake.max_connection_age = 0.8
    proxy = mitm(fake)  # rotation_age 3300: the upstream's limit comes first
    client = Client(proxy.url + "/v1/responses")
    responses = tool_chain(client, turns=8, pause=0.35)
    assert len(responses) == 8
    assert fake.limit_errors >= 2
    proxy.wait_log(r"upstream connection limit reached while idle; next turn reconnects")
    assert len(assert_replays_paired(fake)) >= 2
    assert not any(e["type"] == "error" for e in client.received)  # the limit error never reached the client
    client.close()
