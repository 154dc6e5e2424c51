"""A real client library: the openai Python SDK's Responses WebSocket client (pinned in ci/constraints-py312.txt).

The SDK reconnects only when given an on_reconnecting callback; with none, an upstream drop ends its
connection. Through replayguard the same client's conversation survives the drop, tool call included. When
replayguard fails a turn closed, the SDK hands the error to the application: the README's few lines that resend
the turn (whole history, no previous_response_id, new connection) are run here as written.
"""

from __future__ import annotations

import json
import sys

import pytest
from test_readme import fenced_blocks

if sys.version_info < (3, 12):  # on 3.12 and later the test extras install it: a missing SDK is an error there
    pytest.skip("openai is installed only on the mitmproxy 12 line (mitmproxy 11 pins h11<=0.14)",
                allow_module_level=True)
import openai  # noqa: E402
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


# -- the README's resend, as written --------------------------------------------------------------------------------
def readme_resend() -> dict:
    (code,) = [text for lang, text in fenced_blocks() if lang == "python" and "def turn(" in text]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


@pytest.mark.parametrize(("sections", "close_code", "code"), [
    ({"faults": [{"kind": "drop", "after_turn": 1}, {"kind": "refuse", "after_turn": 1, "count": 1}]},
     1013, "upstream_unavailable"),
    ({"faults": [{"kind": "drop", "after_turn": 1}], "recovery": {"policy": "strict"}}, 1008, None),
], ids=["503-upstream_unavailable", "strict-1008"])
def test_the_readme_resend_recovers_a_fail_close(fake, mitm, sections, close_code, code):
    from test_trace import of, records

    turn = readme_resend()["turn"]
    proxy = mitm(fake, **sections)
    client = openai.OpenAI(api_key="sk-sdk-SECRET", base_url=f"http://127.0.0.1:{proxy.port}/v1", max_retries=0)
    history: list = []
    conn = client.responses.connect().enter()
    first, conn = turn(client, conn, history, [{"role": "user", "content": "please run TOOL ls"}], None,
                       model="m", store=False)
    call = next(item for item in first.output if item.type == "function_call")
    proxy.wait_log(r"injected fault after turn 1: drop upstream TCP")
    second, conn = turn(client, conn, history,
                        [{"type": "function_call_output", "call_id": call.call_id, "output": "sdk-out"}], first.id,
                        model="m", store=False)
    conn.close()
    assert second.status == "completed" and second.output[0].content[0].text == "tool said: sdk-out"
    (fail,) = of(records(proxy.tmp / "trace.jsonl", until="fail_close"), "fail_close")
    assert fail["close_code"] == close_code and (fail.get("error") or {}).get("error", {}).get("code") == code
    resent = [m for _, m in fake.received if m.get("type") == "response.create"][-1]
    assert "previous_response_id" not in resent
    assert [i.get("type", "message") for i in resent["input"]] == ["message", "function_call", "function_call_output"]
    assert len(history) == 4  # the user message, the call, its output, the answer
