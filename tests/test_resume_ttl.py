"""limits.resume_ttl: an ended session's chain stays resumable for the TTL, then its state is freed."""

from __future__ import annotations

import time

from conftest import Client, completed, user

KEY = {"Authorization": "Bearer sk-SECRET-resume"}  # the same client across its connections


def ended_session(proxy, fake, text: str) -> dict:
    client = Client(proxy.url + "/v1/responses", headers=KEY)
    response = completed(client.turn({"model": "m", "store": False, "input": [user(text)]}))
    client.close()
    return response


def test_resume_within_ttl_and_not_after(fake, mitm):
    proxy = mitm(fake, limits={"resume_ttl": 1.5})
    kept = ended_session(proxy, fake, "kept")
    freed = ended_session(proxy, fake, "freed")
    # Within the TTL: a client reconnecting with its old id is resumed from the chain state.
    again = Client(proxy.url + "/v1/responses", headers=KEY)
    r = completed(again.turn({"model": "m", "store": False, "previous_response_id": kept["id"],
                              "input": [user("more")]}))
    assert r["output"][0]["content"][0]["text"] == "reply to: more"
    again.close()
    time.sleep(2.0)
    # After it: replayguard no longer knows the id; the request goes as sent and the upstream answers for itself.
    late = Client(proxy.url + "/v1/responses", headers=KEY)
    events = late.turn({"model": "m", "store": False, "previous_response_id": freed["id"], "input": [user("late")]})
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "previous_response_not_found"
    assert "replayguard" not in events[-1]["error"]["message"]  # the upstream's own error, passed through
    late.close()


def test_resume_ttl_zero_frees_at_once(fake, mitm):
    proxy = mitm(fake, limits={"resume_ttl": 0})
    gone = ended_session(proxy, fake, "gone")
    time.sleep(0.3)
    late = Client(proxy.url + "/v1/responses", headers=KEY)
    events = late.turn({"model": "m", "store": False, "previous_response_id": gone["id"], "input": [user("x")]})
    assert events[-1]["error"]["code"] == "previous_response_not_found"
    late.close()
