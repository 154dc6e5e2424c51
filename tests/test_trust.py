"""Trust under attack, through a real mitmdump: one principal's chain never serves another's, and pathological input
from either side is passed through as opaque, never a crash, never a healthy connection declared dead."""

from __future__ import annotations

import json

from conftest import Client, completed, user

KEY_A = {"Authorization": "Bearer sk-SECRETaaaaaaaaaaaaaaaa"}
KEY_B = {"Authorization": "Bearer sk-SECRETbbbbbbbbbbbbbbbb"}
CONFIDENTIAL = "the launch code is 0000"


def creates(fake, conn: int | None = None) -> list[dict]:
    return [m for c, m in list(fake.received) if m.get("type") == "response.create" and (conn is None or c == conn)]


def test_another_key_cannot_resume_a_chain_it_did_not_make(fake, mitm):
    proxy = mitm(fake)
    a = Client(proxy.url + "/v1/responses", headers=KEY_A)
    ra = completed(a.turn({"model": "m", "store": False, "input": [user(CONFIDENTIAL)]}))
    a.close()
    # B presents A's response id: the upstream would refuse another organisation's id; so does replayguard. The
    # request goes upstream unchanged (id kept, nothing of A's added) and B gets the upstream's own answer.
    b = Client(proxy.url + "/v1/responses", headers=KEY_B)
    events = b.turn({"model": "m", "store": False, "previous_response_id": ra["id"], "input": [user("what was it?")]})
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "previous_response_not_found"
    sent = creates(fake)[-1]
    assert sent["previous_response_id"] == ra["id"] and CONFIDENTIAL not in json.dumps(sent)
    assert not any(CONFIDENTIAL in json.dumps(m) for c, m in fake.received if c != fake.handshakes[0]["conn"])
    b.close()
    # The same key, on a new connection, is resumed from chain state as before.
    a2 = Client(proxy.url + "/v1/responses", headers=KEY_A)
    completed(a2.turn({"model": "m", "store": False, "previous_response_id": ra["id"], "input": [user("go on")]}))
    resumed = creates(fake)[-1]
    assert "previous_response_id" not in resumed and CONFIDENTIAL in json.dumps(resumed)
    a2.close()


def test_the_same_key_for_another_organisation_is_another_principal(fake, mitm):
    proxy = mitm(fake)
    org1 = {**KEY_A, "OpenAI-Organization": "org-one"}
    a = Client(proxy.url + "/v1/responses", headers=org1)
    ra = completed(a.turn({"model": "m", "store": False, "input": [user(CONFIDENTIAL)]}))
    a.close()
    fake.forget_responses()
    b = Client(proxy.url + "/v1/responses", headers={**KEY_A, "OpenAI-Organization": "org-two"})
    events = b.turn({"model": "m", "store": False, "previous_response_id": ra["id"], "input": [user("and?")]})
    assert events[-1]["type"] == "error" and CONFIDENTIAL not in json.dumps(creates(fake)[-1])
    b.close()
