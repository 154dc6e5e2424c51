"""replayguard_trace changed at runtime (mitmweb's Options, here through its REST API): live sessions move to the new
file, nothing is lost or written twice, every line is whole."""

from __future__ import annotations

from conftest import BASE_RULES, Client, completed, user
from webui import Mitmweb

from replayguard.core.records import read_records


def test_live_sessions_move_to_the_new_trace_file(fake, tmp_path):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    web = Mitmweb(tmp_path / "web", ["--mode", f"reverse:http://127.0.0.1:{fake.port}",
                                     "--set", f"replayguard_trace={first}"], BASE_RULES).start()
    try:
        client = Client(f"ws://127.0.0.1:{web.port}/v1/responses")
        r = completed(client.turn({"model": "m", "store": False, "input": [user("one")]}))
        completed(client.turn({"model": "m", "store": False, "previous_response_id": r["id"], "input": [user("2")]}))
        web.call("PUT", "/options", {"replayguard_trace": str(second)})
        web.wait_log(r"writing chain trace to .*second\.jsonl")
        r = completed(client.turn({"model": "m", "store": False, "input": [user("three")]}))
        client.close()
        web.wait_log(r"client disconnect")
    finally:
        web.stop()
    old, bad_old = read_records(first.read_text().splitlines())
    new, bad_new = read_records(second.read_text().splitlines())
    assert bad_old == bad_new == []
    assert [r["event"] for r in old if r["event"].startswith("turn.")] == ["turn.start", "turn.end"] * 2
    assert [r["event"] for r in new] == ["turn.start", "turn.end", "upstream.closed", "session.end"]
    assert {r["session"] for r in old} == {r["session"] for r in new}  # the same live session, moved
    assert new[-1]["turns_completed"] == 3
