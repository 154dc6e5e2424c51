"""Records where they happened: replayguard's records travel in-band with the events (on the bridge hop), so a flow
file holds each exactly where it happened among the messages the client sent and received; a flow file and the
trace of the same sessions then tell the same story, and reproduce the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import io
from test_reproduce import AUTH, every_failure, record, run

from conftest import BASE_RULES, Client, completed, user
from replayguard.tools.fake_upstream import FakeUpstream
from replayguard.tools.harness import Mitmdump
from replayguard.tools.recording import read_recording


def flow_messages(path: Path) -> list[Any]:
    with path.open("rb") as f:
        flows = [fl for fl in io.FlowReader(f).stream() if fl.websocket is not None]
    assert len(flows) == 1
    return flows[0].websocket.messages


def label(message: Any) -> str:
    obj = json.loads(message.content)
    kind = obj.get("type", "")
    if kind.startswith("replayguard."):
        return kind + (f" turn {obj['turn']}" if obj.get("turn") is not None else "")
    return ("-> " if message.from_client else "<- ") + kind


@pytest.mark.parametrize("how", ["drop", "close"])
def test_a_loss_right_after_a_turn_sits_after_its_last_event_and_reproduces_from_the_flow_file(tmp_path, how):
    """The bundled fake cuts (or closes) each connection right after its 2nd response: in the flow the loss is
    after turn 2's response.completed, the recovery of turn 3 before turn 3's events; `reproduce flows.mitm` then
    agrees with the recording turn by turn, as the trace does."""
    flows, trace = tmp_path / "flows.mitm", tmp_path / "trace.jsonl"
    rules = {**BASE_RULES, "trace": {"bodies": "full"}}
    with FakeUpstream() as fake:
        setattr(fake, f"{how}_after_responses", 2)
        proxy = Mitmdump(tmp_path / "mitm", ["--mode", f"reverse:http://127.0.0.1:{fake.port}", "-w", str(flows),
                                             "--set", f"replayguard_trace={trace}"], rules).start()
        try:
            client = Client(proxy.url + "/v1/responses", headers=AUTH)
            previous = None
            for n in range(5):
                body: dict[str, Any] = {"model": "m", "store": False, "input": [user(f"turn {n + 1}")]}
                if previous:
                    body["previous_response_id"] = previous
                previous = completed(client.turn(body))["id"]
            client.close()
        finally:
            proxy.stop()
    labels = [label(m) for m in flow_messages(flows)]
    completed_2 = [i for i, text in enumerate(labels) if text == "<- response.completed"][1]
    lost = labels.index("replayguard.upstream.lost")
    recovery = labels.index("replayguard.recovery turn 3")
    creates = [i for i, text in enumerate(labels) if text == "-> response.create"]
    created_3 = [i for i, text in enumerate(labels) if text == "<- response.created"][2]
    # The loss is after turn 2's last event (whether before or after turn 3's create depends on which the proxy heard
    # first: they happen at the same moment), and the replay sits between turn 3's create and its events.
    assert completed_2 < lost < created_3, labels
    assert creates[2] < recovery < created_3, labels
    records = [m for m in flow_messages(flows) if m.injected]
    assert records and all(m.dropped for m in records)  # kept in the flow, never sent to the client
    assert all(json.loads(m.content)["replayguard"].startswith("replayguard's own record") for m in records)
    for source in (trace, flows):
        code, out, err = run(source, "--check")
        assert code == 0, f"{source.name}:\n{out}{err}"
    # The two readers agree turn by turn: the same failures at the same turns and points.
    from_trace, from_flows = read_recording(trace), read_recording(flows)
    assert failures(from_trace) == failures(from_flows) and failures(from_trace)


def failures(recording: Any) -> list[list[tuple[int, str]]]:
    return [[(t.number, f.describe()) for t in s.turns for f in t.failures] for s in recording.sessions]


def test_flow_file_and_trace_tell_the_same_story_for_every_failure(tmp_path):
    """Every failure the fake scripts (closes, silence, the age limit, a drop mid-response, a refused reconnect and
    first handshake, an error event, a resumed chain): the trace and the flow file of the same sessions are read to
    the same failures at the same turns and points, and to the same outcomes, and both reproduce turn for turn. (The
    faults of rules and of the replayguard.fault command: tests/test_mitmweb.py.)"""
    recorded = record(tmp_path, every_failure, upstream={"first_event_timeout": 1})
    from_trace, from_flows = read_recording(recorded.trace), read_recording(recorded.flows)
    assert failures(from_trace) == failures(from_flows) and any(failures(from_trace))
    assert [[t.outcome.describe() for t in s.turns] for s in from_trace.sessions] == \
        [[t.outcome.describe() for t in s.turns] for s in from_flows.sessions]
    for source in (recorded.trace, recorded.flows):
        code, out, err = run(source, "--check")
        assert code == 0, f"{source.name}:\n{out}{err}"
