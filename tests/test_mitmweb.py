"""What a person debugging a tool-call chain sees in a real mitmweb, read through the REST API mitmweb's own UI uses
(and once in a real headless browser): the upstream the client addressed, replayguard's exchanges with the upstream
kept in the flow and visibly its own, messages rendered by the Responses contentview, commands, and a flow file that
tells the same story as the live trace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from browser import Browser, chromium
from conftest import BASE_RULES, Client, completed, tool_chain, user
from webui import Mitmweb

from replayguard.core.records import records_in_flow
from replayguard.tools.harness import ROOT
from replayguard.tools.viewer import build_sessions, load, records_from_flows

AUTH = {"Authorization": "Bearer sk-SECRETweb0123456789"}
DOCS_SCREENSHOT = ROOT / "docs" / "mitmweb.png"


@pytest.fixture
def web(fake, tmp_path):
    rules = {**BASE_RULES, "trace": {"bodies": "full"},
             "faults": [{"kind": "drop", "after_turn": 2},
                        {"kind": "error", "error": "previous_response_not_found", "after_turn": 4}]}
    web = Mitmweb(tmp_path / "web", ["--mode", f"reverse:http://localhost:{fake.port}",
                                     "--set", "connection_strategy=lazy",
                                     "--set", f"replayguard_trace={tmp_path / 'trace.jsonl'}"], rules).start()
    yield web
    web.stop()
    assert "SECRET" not in web.log


def test_mitmweb_shows_the_upstream_the_replays_and_renders_the_chain(web, fake, tmp_path):
    client = Client(f"ws://127.0.0.1:{web.port}/v1/responses", headers=AUTH)
    responses = tool_chain(client, 6)
    (flow,) = [f for f in web.flows() if f.get("websocket")]

    # 1. The upstream the client addressed, never the loopback bridge, and no routing token anywhere.
    request = flow["request"]
    assert (request["scheme"], request["host"], request["port"], request["path"]) == \
        ("http", "localhost", fake.port, "/v1/responses")
    assert not any(k.lower().startswith("x-replayguard") for k, _ in request["headers"])
    assert flow["server_conn"]["address"] == ["localhost", fake.port]
    assert flow["server_conn"]["peername"][1] == fake.port  # where replayguard's newest connection really went

    # 2. replayguard's own exchanges are in the flow, in order, and marked as its own.
    messages = web.messages(flow["id"], "auto")
    texts = [m.get("text") or "\n".join("".join(t for _, t in line) for line in m.get("lines", [])) for m in messages]
    ours = [t for t in texts if t.lstrip().startswith("replayguard:")]
    assert any("turn 3 replayed on upstream #2 after upstream connection dropped" in t for t in ours), ours
    assert any("consumed, not forwarded" in t and "previous_response_not_found" in t for t in ours), ours
    assert any("turn 5 replayed on upstream #3" in t for t in ours), ours
    assert any("injected fault" in t for t in ours)
    assert any("upstream #1 closed" in t or "upstream #1 lost" in t for t in ours)

    # 4. The Responses contentview is chosen automatically: items on their own lines with call_ids.
    views = {m.get("view_name") or m.get("description") for m in messages}
    assert any("responses" in str(v).lower() for v in views), views
    create = next(t for t in texts if "response.create" in t and "function_call_output" in t)
    call_id = responses[0]["output"][0]["call_id"]
    assert call_id in create and "previous_response_id" in create and len(create.splitlines()) >= 2

    # 6. The comment reads line by line; the marker says it recovered.
    assert flow["marked"] in (":recycle:", "♻", "♻️")  # mitmweb 12 sends the emoji itself
    assert flow["comment"].startswith("replayguard: 2 recoveries, 2 faults.")
    assert "⟲ turn 3: upstream connection dropped -> replay" in flow["comment"]

    # 5. Commands: list the session, inject a fault into it, see it recovered like a rule's.
    (line,) = web.command_("replayguard.sessions")["value"]
    assert flow["id"] in line and "6 turns completed" in line
    reply = web.command_("replayguard.fault", f"@{flow['id']}", "drop")
    assert "into 1 session(s)" in reply["value"], reply
    web.wait_log(r"injected fault after turn 6: drop upstream TCP \(command\)")
    responses += [completed(client.turn({"model": "m", "store": False, "previous_response_id": responses[-1]["id"],
                                         "input": [user("still there?")]}))]
    web.wait_log(r"turn 7: upstream connection dropped -> replay")
    client.close()

    # 3. The flow file (mitmweb's own dump) tells the same story as the live trace.
    web.wait_flow(lambda f: f.get("websocket") and f["websocket"].get("timestamp_end"))
    dump = tmp_path / "flows.mitm"
    dump.write_bytes(web.dump())
    live, _ = load(tmp_path / "trace.jsonl")
    (live_view,), (flow_view,) = build_sessions(live), build_sessions(records_from_flows(dump))
    assert live_view.recoveries == flow_view.recoveries == 3
    # The same timeline, in the same order: each record sits in the flow where it happened among the events.
    assert [line for _, line in flow_view.timeline] == [line for _, line in live_view.timeline]
    order = [_label(m) for m in _read_flow(dump).websocket.messages]
    completed_at = [i for i, text in enumerate(order) if text == "<- response.completed"]
    fault = order.index("replayguard.fault")  # the drop a rule fires after turn 2
    lost = order.index("replayguard.upstream.lost")
    replayed = order.index("replayguard.recovery")
    assert completed_at[1] < fault < lost < completed_at[2], order  # after turn 2's last event, not among its events
    creates_at = [i for i, text in enumerate(order) if text == "-> response.create"]
    created_at = [i for i, text in enumerate(order) if text == "<- response.created"]
    assert creates_at[2] < replayed < created_at[2], order  # the replay before the replayed turn's events
    # Both recordings run again offline to the same outcomes, the faults of the rules and of the command included.
    for source in (tmp_path / "trace.jsonl", dump):
        rerun = subprocess.run([sys.executable, "-m", "replayguard", "reproduce", str(source), "--check"],
                               capture_output=True, text=True, timeout=180, cwd=ROOT)
        assert rerun.returncode == 0, f"{source.name}:\n{rerun.stdout}{rerun.stderr}"
    assert [t.response_id for t in flow_view.turns] == [r["id"] for r in responses]
    viewer = subprocess.run([sys.executable, "-m", "replayguard", "trace", str(dump)], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert "7 turns (7 completed), 3 recoveries" in viewer.stdout, viewer.stdout

    # ... and loading it back into mitmweb shows replayguard's records again.
    kept = records_in_flow(_read_flow(dump).websocket.messages)
    assert {r["event"] for r in kept} >= {"session.start", "handshake", "recovery", "upstream.lost", "fault",
                                          "upstream.closed"}
    again = Mitmweb(tmp_path / "again", ["--rfile", str(dump)], None).start()
    try:
        (loaded,) = [f for f in again.flows() if f.get("websocket")]
        (original,) = [f for f in web.flows() if f.get("websocket")]
        assert loaded["request"]["host"] == "localhost" and loaded["comment"] == original["comment"]
        shown = again.messages(loaded["id"], "auto")
        rendered = [m.get("text") or json.dumps(m.get("lines")) for m in shown]
        assert sum(t.lstrip().startswith("replayguard:") or '"replayguard:' in t for t in rendered) == len(kept)
    finally:
        again.stop()


def _label(message: Any) -> str:
    obj = json.loads(message.content)
    kind = obj.get("type", "") if isinstance(obj, dict) else ""
    return kind if kind.startswith("replayguard.") else ("-> " if message.from_client else "<- ") + kind


def _read_flow(path: Path) -> Any:
    from mitmproxy import io

    with open(path, "rb") as f:
        (flow,) = [fl for fl in io.FlowReader(f).stream() if getattr(fl, "websocket", None)]
    return flow


def test_a_real_browser_shows_the_upstream_url_in_the_flow_list(web, fake, tmp_path):
    if chromium() is None:
        pytest.skip("chromium is not installed (.ci/run installs it with apt-get)")
    client = Client(f"ws://127.0.0.1:{web.port}/v1/responses", headers=AUTH)
    tool_chain(client, 4)
    with Browser() as browser:
        page = browser.open(web.ui_url)
        page.wait_for_text(f"localhost:{fake.port}/v1/responses", ".flow-table")
        rows = page.text(".flow-table")
        assert "127.0.0.1" not in rows  # neither the bridge nor any loopback detour is what the list shows
        (flow,) = [f for f in web.flows() if f.get("websocket")]
        details = browser.open(f"{web.ui_url}#/flows/{flow['id']}/websocket")  # the flow's WebSocket tab
        details.wait_for_text("replayguard: turn 3 replayed on upstream #2")
        details.eval("[...document.querySelectorAll('pre, .codeeditor, div')].reverse()"
                     ".find(e => e.innerText.includes('upstream #1 lost'))?.scrollIntoView()")  # the replay in view
        page = details
        shot = tmp_path / "mitmweb.png"
        page.screenshot(shot)
    assert shot.stat().st_size > 10_000
    if os.environ.get("REPLAYGUARD_DOCS"):  # refresh the README's screenshot from this run
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(shot, DOCS_SCREENSHOT)
    client.close()


def readme_curl() -> str:
    """The README's curl lines for mitmweb's commands."""
    from test_readme import fenced_blocks

    (block,) = [text for lang, text in fenced_blocks() if lang == "sh" and "/commands/replayguard.sessions" in text]
    return block


def json_values(text: str) -> list[Any]:
    decoder, values, index = json.JSONDecoder(), [], 0
    while index < len(text.strip()):
        value, index = decoder.raw_decode(text, index)
        values.append(value)
        while index < len(text) and text[index].isspace():
            index += 1
    return values


def test_the_readme_curl_commands_pass_mitmwebs_checks(web, fake):
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    client = Client(f"ws://127.0.0.1:{web.port}/v1/responses", headers=AUTH)
    completed(client.turn({"model": "m", "store": False, "input": [user("hi")]}))
    (flow,) = [f for f in web.flows() if f.get("websocket")]
    script = (readme_curl().replace("8081", str(web.web_port)).replace("@<flow id>", f"@{flow['id']}")
              .replace("TOKEN=...", f"TOKEN={web.token or ''}"))
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    sessions, fault = json_values(out.stdout)
    assert len(sessions["value"]) == 1 and flow["id"] in sessions["value"][0], sessions
    assert fault == {"value": f"injected drop upstream TCP (command) into 1 session(s): {flow['id']}"}, fault
    wrong = script.replace('"drop"]', '"melt"]')
    again = json_values(subprocess.run(["bash", "-c", wrong], capture_output=True, text=True, timeout=60).stdout)
    assert again[-1] == {"error": "unknown fault kind 'melt': one of close, drop, blackhole, refuse, error, delay"}
    # Without the XSRF pair mitmweb refuses, as the README says.
    bare = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                           f"http://127.0.0.1:{web.web_port}/commands/replayguard.sessions",
                           "-H", f"Authorization: Bearer {web.token or ''}"], capture_output=True, text=True, timeout=60)
    assert bare.stdout == "403"
    client.close()
