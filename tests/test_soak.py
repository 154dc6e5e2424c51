"""The soak, at CI size: concurrent tool-call sessions through a real mitmdump while the upstream fails at random
(fixed seed). Full size: `python -m replayguard soak` (100 sessions x 20 turns)."""

from __future__ import annotations

from replayguard.tools.soak import report, run


def test_soak_ci_size_loses_nothing_and_leaves_no_state():
    counts = run(sessions=20, turns=10, seed=3)
    print(report(counts))
    assert counts.turns == 200 and counts.completed == 200
    assert counts.lost == 0 and counts.abandoned == 0
    assert counts.no_tool_call_found == 0 and counts.unreplayable == 0
    assert counts.state_left == {"sessions": 0, "pending": 0, "matched": 0, "flows": 0, "saved_responses": 0,
                                 "retired": 0}
    # The faults really happened and were really recovered from.
    assert sum(counts.faults.values()) >= 10 and set(counts.faults) >= {"close", "drop", "refuse"}
    assert counts.recoveries > 0
    # Clients misbehaved too: left mid-turn, presented another key's response id, went silent.
    assert set(counts.client_faults) == {"leave", "stale", "silent"}
    assert counts.stale_resumed == 0 and counts.stale_refused == counts.client_faults["stale"]
    # A silent client is dropped once it misses a ping by the loop's own clock (a busy loop gives it longer).
    assert 1 <= counts.silent_dropped <= counts.client_faults["silent"]
    assert counts.cross_principal == 0 and counts.internal_errors == 0
    assert counts.ok()
