"""Model-based tests: hypothesis drives the protocol core against the model of the upstream through random
interleavings of client messages (creates on one or several lanes, continuations and forks, tool outputs, steering,
unknown events), upstream events, connection failures, refused handshakes and timer expiries, all in process, and
checks what must always hold:

* every turn ends, within a bound, in exactly one end: its own terminal event, or one structured error followed by
  a non-1000 close (never a silent wait);
* no replay holds a tool output whose call is not before it, and no chain state the client relies on is missing;
* nothing is sent upstream after the client left;
* no client create is lost or sent twice, except a documented replay.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from protocol_sim import Sim, user

from replayguard.core import events as ev
from replayguard.core import protocol as p
from replayguard.core.pairing import find_orphans
from replayguard.core.recovery import Trigger

LANES = [None, "a", "b"]


class Session(RuleBasedStateMachine):
    """One client session through replayguard, against the model of the upstream."""

    @initialize(retries=st.integers(1, 3), keepalive=st.sampled_from([0, 5]))
    def begin(self, retries: int, keepalive: float) -> None:
        self.sim = Sim(p.Settings(ping_idle=20, ping_timeout=1, keepalive_interval=keepalive, first_event_timeout=2,
                                  rotation_age=3300, max_retries=retries)).start()
        self.creates = 0  # client creates sent
        self.n = 0

    # -- what the client knows ------------------------------------------------------------------------------
    def responses(self, lane: str | None) -> list[dict[str, Any]]:
        """Responses the client saw end on ``lane`` in a way it may continue (completed or incomplete)."""
        return [e["response"] for e in self.sim.client if e.get("stream_id") == lane and
                e.get("type") in ("response.completed", "response.incomplete")]

    def active(self) -> bool:
        return self.sim.finished is None

    # -- the client ------------------------------------------------------------------------------------------------
    @precondition(lambda self: self.active())
    @rule(lane=st.sampled_from(LANES), what=st.sampled_from(["fresh", "continue", "fork", "tool", "long", "fail"]),
          other=st.sampled_from(LANES))
    def create(self, lane: str | None, what: str, other: str | None) -> None:
        self.n += 1
        body: dict[str, Any] = {"input": [user(f"m{self.n} hello")]}
        if lane is not None:
            body["stream_id"] = lane
        source = self.responses(other if what == "fork" else lane)
        if what != "fresh" and source:
            last = source[-1]
            body["previous_response_id"] = last["id"]
            calls = [i for i in last["output"] if i["type"] == "function_call"]
            if calls:  # a continuation of a tool call carries its output, as a client must
                body["input"] = [{"type": "function_call_output", "call_id": c["call_id"], "output": f"o{self.n}"}
                                 for c in calls]
                self.creates += 1
                self.sim.create(**body)
                return
        if what == "tool":
            body["input"] = [user(f"m{self.n} please TOOL ls")]
        elif what == "long":
            body.update(input=[user(f"m{self.n} LONG one")], max_output_tokens=20)
        elif what == "fail":
            body["input"] = [user(f"m{self.n} FAIL")]
        self.creates += 1
        self.sim.create(**body)

    @precondition(lambda self: self.active())
    @rule(lane=st.sampled_from(LANES))
    def steer(self, lane: str | None) -> None:
        started = [e["response"]["id"] for e in self.sim.client
                   if e.get("type") == "response.created" and e.get("stream_id") == lane]
        ended = {e["response"]["id"] for e in self.sim.client
                 if e.get("type") in ("response.completed", "response.incomplete", "response.failed")}
        live = [r for r in started if r not in ended]
        if live:
            self.sim.send({"type": "response.steer", "previous_response_id": live[-1], "input": f"steer {self.n}"})

    @precondition(lambda self: self.active())
    @rule()
    def unknown_event(self) -> None:
        self.sim.send({"type": "response.bogus"})

    @precondition(lambda self: self.active())
    @rule(chance=st.integers(0, 9))
    def leave(self, chance: int) -> None:
        if chance == 0:  # rarely: a session that ends early tests little else
            self.sim.leave()

    @precondition(lambda self: self.active())
    @rule(chance=st.integers(0, 9))
    def stop_answering_pings(self, chance: int) -> None:
        if chance == 0:
            lanes = {t.lane for t in self.sim.protocol.turns_in_flight()}
            seen = len(self.sim.client)
            self.sim.stop_answering_pings()
            told = self.sim.client[seen:]
            # Still connected: each lane in flight reads why (never a silent close), an idle client only the close.
            assert [e["error"]["code"] for e in told] == ["replayguard_client_unresponsive"] * len(lanes), told
            assert {e.get("stream_id") for e in told} == lanes
            assert self.sim.closed is not None and self.sim.closed[0] == 1011 and self.sim.finished

    # -- the upstream -------------------------------------------------------------------------------------------
    @precondition(lambda self: self.active())
    @rule(pick=st.integers(0, 5), count=st.integers(1, 12))
    def upstream_sends(self, pick: int, count: int) -> None:
        for _ in range(count):
            lanes = self.sim.ready_lanes()
            if not lanes:
                return
            self.sim.deliver(lanes[pick % len(lanes)])

    @precondition(lambda self: self.active() and self.sim.current() is not None and self.sim.current().open)
    @rule(how=st.sampled_from(["drop", "close", "silence"]), chance=st.integers(0, 2))
    def upstream_dies(self, how: str, chance: int) -> None:
        if chance == 0:
            self.sim.kill(how)

    @precondition(lambda self: self.active())
    @rule(status=st.sampled_from([401, 429, 503]), chance=st.integers(0, 3))
    def next_handshake_refused(self, status: int, chance: int) -> None:
        if chance == 0:
            self.sim.model.refuse_next(1, status)

    @rule(seconds=st.sampled_from([0.5, 1.5, 3, 30]))
    def time_passes(self, seconds: float) -> None:
        self.sim.advance(seconds)

    # -- what must always hold --------------------------------------------------------------------------------------
    @invariant()
    def nothing_after_the_client_left(self) -> None:
        assert not self.sim.sent_after_gone

    @invariant()
    def replays_pair_every_call(self) -> None:
        for _, create in self.sim.creates_sent():
            if "previous_response_id" not in create:
                assert not find_orphans(create.get("input") or []), create
        assert not any("No tool call found" in json.dumps(e) for e in self.sim.client)

    @invariant()
    def chain_state_is_never_missing(self) -> None:
        for e in self.sim.client:
            message = str((e.get("error") or {}).get("message", "")) if e.get("type") == "error" else ""
            assert "no chain state" not in message and "would orphan" not in message, e

    @invariant()
    def every_response_the_client_got_is_in_the_chain(self) -> None:
        """A response the client saw complete (or end incomplete) is one it may continue: replayguard recorded it
        (an error answering another message did not end its turn early)."""
        for e in self.sim.client:
            if e.get("type") in ("response.completed", "response.incomplete"):
                assert self.sim.chain.lookup(e["response"]["id"]) is not None, e["response"]["id"]

    @invariant()
    def the_upstream_never_sees_a_busy_lane(self) -> None:
        """A create waits for its lane's turn in flight: none is released early into a busy lane."""
        for e in self.sim.client:
            if e.get("type") == "error":
                assert (e.get("error") or {}).get("code") != "conversation_already_has_active_response", e
            assert e.get("type") != "response.queued", e

    @invariant()
    def every_create_is_sent_once_or_replayed(self) -> None:
        recovered: dict[int, int] = {}
        for r in self.sim.of(ev.Recovered):
            if r.trigger is not Trigger.RESUME:
                recovered[r.turn.number] = recovered.get(r.turn.number, 0) + 1
        for started in self.sim.of(ev.TurnStarted):
            number = started.turn.number
            extra = self.sim.turn_sends.get(number, 0) - recovered.get(number, 0)
            assert extra in (0, 1) if not started.turn.automatic else extra == 0, (number, extra)

    def teardown(self) -> None:
        if not hasattr(self, "sim"):
            return
        sim = self.sim
        # Quiesce: the upstream says everything it has and time passes until nothing more can happen.
        for _ in range(50):
            sim.run_upstream()
            if sim.finished is not None or not sim.protocol.turns_in_flight():
                break
            sim.advance(5)
        started = sim.of(ev.TurnStarted)
        ended = sim.of(ev.TurnEnded)
        ends: dict[int, int] = {}
        for e in ended:
            ends[e.turn.number] = ends.get(e.turn.number, 0) + 1
        # With the keepalive off (rules.yaml allows it) a silent upstream mid-turn is found by nothing: such a turn
        # may still be in flight; every other turn ends exactly once.
        hung = {t.number for t in sim.protocol.turns_in_flight()} if sim.settings.keepalive_interval == 0 and \
            sim.finished is None else set()
        for s in started:
            if s.turn.number not in hung:
                assert ends.get(s.turn.number, 0) == 1, (s.turn.number, ends, sim.finished)
        if sim.finished is None and sim.settings.keepalive_interval > 0:
            # (With the keepalive off, as rules.yaml allows, a silent upstream mid-turn is found by nothing.)
            assert not sim.protocol.turns_in_flight(), "a turn hangs with nothing left to happen"
            assert not any(lane.held for lane in sim.protocol.lanes.values()), "a create was left waiting"
        else:
            failed = sim.protocol.failed_closed
            if failed is not None and not sim.client_gone:
                # One structured error per lane in flight, then a non-1000 close.
                assert sim.closed is not None and sim.closed[0] != 1000
                if failed.error is not None:
                    assert sim.client[-1]["type"] == "error"
        # No client create was lost: each one started a turn, unless the session ended before its lane was free.
        client_turns = [s for s in started if not s.turn.automatic]
        if sim.finished is None and not sim.protocol.turns_in_flight():
            assert len(client_turns) == self.creates


TestSession = Session.TestCase
TestSession.settings = settings(max_examples=500, stateful_step_count=60, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])
