"""File descriptors, through a real mitmdump started under a low `ulimit -n`: replayguard raises its soft limit to the
hard one, so 300 concurrent sessions complete as through plain mitmdump; when descriptors run out anyway, clients get
a clean error, the log says so once per burst (no traceback per accept), and no state is left behind."""

from __future__ import annotations

import asyncio
import json
import re
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus


async def session(url: str, outcomes: list, turns: int = 2, hold: float = 0.0) -> None:
    try:
        async with connect(url, proxy=None, max_size=None, ping_interval=None, open_timeout=30) as ws:
            previous = None
            for number in range(turns):
                request = {"type": "response.create", "model": "m", "store": False, "input": f"turn {number}"}
                if previous:
                    request["previous_response_id"] = previous
                await ws.send(json.dumps(request))
                while True:
                    event = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    if event["type"] in ("response.completed", "error"):
                        break
                if event["type"] == "error":
                    outcomes.append(("error", event["error"].get("code")))
                    return
                previous = event["response"]["id"]
            await asyncio.sleep(hold)
            outcomes.append(("completed", None))
    except InvalidStatus as e:
        outcomes.append(("refused", e.response.status_code, e.response.body))
    except (ConnectionClosed, OSError, asyncio.TimeoutError, InvalidMessage) as e:
        outcomes.append(("broken", repr(e)))


def run_sessions(url: str, count: int, hold: float = 0.0) -> list:
    outcomes: list = []

    async def go() -> None:
        await asyncio.gather(*(session(url, outcomes, hold=hold) for _ in range(count)))

    asyncio.run(go())
    return outcomes


def test_300_sessions_under_ulimit_1024_all_complete(fake, mitm):
    proxy = mitm(fake, nofile=(1024, 8192))
    proxy.wait_log(r"raised the open-files limit from 1024 to 8192")
    outcomes = run_sessions(proxy.url + "/v1/responses", 300, hold=1.0)  # all 300 open at once
    assert outcomes.count(("completed", None)) == 300, [o for o in outcomes if o[0] != "completed"][:5]
    assert "Traceback" not in proxy.log


def test_when_descriptors_run_out_clients_get_a_clean_answer_and_nothing_leaks(fake, mitm):
    # The hard limit itself is low (nothing to raise). Lazy connects: with mitmproxy's eager ones, its own connection
    # to the reverse target fails first and it drops such a client without an answer, replayguard or not.
    proxy = mitm(fake, args=["--set", "connection_strategy=lazy"], nofile=(160, 160), limits={"resume_ttl": 0})
    outcomes = run_sessions(proxy.url + "/v1/responses", 120, hold=2.0)
    completed = [o for o in outcomes if o[0] == "completed"]
    refused = [o for o in outcomes if o[0] == "refused"]
    assert refused  # the limit really bit (how many get through depends on who grabs descriptors first)
    assert len(completed) + len(refused) == 120, [o for o in outcomes if o[0] not in ("completed", "refused")][:3]
    for o in refused:
        assert o[1] in (502, 503), o  # a clean HTTP answer (mitmproxy's own 502, or replayguard's 503)
        if o[1] == 503:
            assert b"replayguard_out_of_descriptors" in o[2]
    assert len(re.findall(r"out of file descriptors", proxy.log)) <= 5  # once per burst, not once per accept
    assert "Traceback" not in proxy.log
    # Every session that got in completes again once the others are gone; nothing was left behind.
    assert run_sessions(proxy.url + "/v1/responses", 5) == [("completed", None)] * 5
    time.sleep(1)  # the last sessions finish closing their upstream connections
    proxy.stop()
    state = proxy.wait_log(r"replayguard: state at exit: (.*)").group(1)
    assert state == "sessions 0, pending 0, matched 0, flows 0, saved_responses 0, retired 0", state
