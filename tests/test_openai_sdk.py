"""A real client library: the openai Python SDK's Responses WebSocket client (pinned in pyproject.toml).

The SDK reconnects only when given an on_reconnecting callback; with none, an upstream drop ends its
connection. Through replayguard the same client's conversation survives the drop, tool call included.
"""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip(
    "openai", reason="openai is installed only on the mitmproxy 12 line (mitmproxy 11 pins h11<=0.14)"
)
from websockets.exceptions import ConnectionClosed  # noqa: E402


def run_turn(conn, **request):
    conn.response.create(**request)
    for event in conn:
        if event.type in ("response.completed", "response.failed", "error"):
            return event
    raise AssertionError("connection ended before the turn did")


def chain_with_drop(base_url: str, fake) -> list:
    client = openai.OpenAI(api_key="sk-sdk-SECRET", base_url=base_url, max_retries=0)
    events = []
    with client.responses.connect() as conn:
        first = run_turn(conn, model="m", store=False, input="please run TOOL ls")
        events.append(first)
        call = next(item for item in first.response.output if item.type == "function_call")
        fake.drop_all()
        assert fake.wait_for(lambda: fake.open_connections() == 0)
        second = run_turn(
            conn, model="m", store=False, previous_response_id=first.response.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sdk-out"}],
        )
        events.append(second)
    return events


def test_sdk_conversation_survives_upstream_drop_through_replayguard(fake, mitm):
    proxy = mitm(fake)
    first, second = chain_with_drop(f"http://127.0.0.1:{proxy.port}/v1", fake)
    assert first.type == "response.completed"
    assert second.type == "response.completed"
    assert second.response.output[0].content[0].text == "tool said: sdk-out"
    replay = [m for c, m in fake.received if c == 2 and m.get("type") == "response.create"][0]
    assert "previous_response_id" not in replay
    assert [i["type"] for i in replay["input"]] == ["message", "function_call", "function_call_output"]
    assert fake.handshakes[0]["headers"]["authorization"] == "Bearer sk-sdk-SECRET"
    assert not any("No tool call found" in json.dumps(e) for _, e in fake.sent)


def test_sdk_without_replayguard_loses_the_conversation(fake):
    """The baseline: the same client straight to the upstream does not survive the drop."""
    with pytest.raises((ConnectionClosed, openai.OpenAIError, OSError)):
        chain_with_drop(f"http://127.0.0.1:{fake.port}/v1", fake)
