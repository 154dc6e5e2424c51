"""Trust under attack, through a real mitmdump: one principal's chain never serves another's, wherever a client
carries its credential (a header, the query string, a subprotocol entry, a cookie, or none at all), and the
credential is never written anywhere."""

from __future__ import annotations

import json

import pytest
from mitmproxy import io

from conftest import SECRET_MARK, Client, completed, user

KEY_A = {"Authorization": "Bearer sk-SECRETaaaaaaaaaaaaaaaa"}
KEY_B = {"Authorization": "Bearer sk-SECRETbbbbbbbbbbbbbbbb"}
CONFIDENTIAL = "the launch code is 0000"
# An Azure OpenAI key is 32 hex characters: nothing about its shape says "secret", so only knowing where it came
# from redacts it. Every test credential contains SECRET (conftest checks the log and every trace for it).
AZURE_A = "0123456789abcdefSECRET0123456789"
AZURE_B = "fedcba9876543210SECRETfedcba9876"


def creates(fake, conn: int | None = None) -> list[dict]:
    return [m for c, m in list(fake.received) if m.get("type") == "response.create" and (conn is None or c == conn)]


def connect(proxy, form: str, key: str | None) -> Client:
    """A client carrying ``key`` where ``form`` says (None: no credential at all)."""
    path, headers, protocols = "/v1/responses", {}, None
    if key is None:
        pass
    elif form == "authorization":
        headers = {"Authorization": f"Bearer {key}"}
    elif form in ("api-key", "x-api-key"):
        headers = {form: key}
    elif form == "query":  # as Azure OpenAI clients send it
        path += f"?api-version=2025-04-01-preview&api-key={key}"
    elif form == "subprotocol":  # as browser clients authenticate OpenAI WebSockets
        protocols = [f"openai-insecure-api-key.{key}", "openai-beta.responses-v1"]
    elif form == "cookie":  # as ChatGPT-backed clients
        headers = {"Cookie": f"theme=dark; __Secure-session={key}", "ChatGPT-Account-Id": "acct-1"}
    else:
        raise ValueError(form)
    return Client(proxy.url + path, headers=headers, subprotocols=protocols)


FORMS = ["authorization", "api-key", "x-api-key", "query", "subprotocol", "cookie"]


@pytest.mark.parametrize("form", FORMS)
def test_another_key_cannot_resume_a_chain_it_did_not_make(fake, mitm, form, tmp_path):
    flows = tmp_path / "flows.mitm"
    proxy = mitm(fake, args=["-w", str(flows)])
    a = connect(proxy, form, AZURE_A)
    ra = completed(a.turn({"model": "m", "store": False, "input": [user(CONFIDENTIAL)]}))
    a.close()
    # B presents A's response id from a connection of its own: the upstream would refuse another principal's id;
    # so does replayguard. The request goes upstream unchanged (id kept, nothing of A's added) and B gets the
    # upstream's own answer.
    b = connect(proxy, form, AZURE_B)
    events = b.turn({"model": "m", "store": False, "previous_response_id": ra["id"], "input": [user("what was it?")]})
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "previous_response_not_found"
    assert not events[-1]["error"]["message"].startswith("replayguard")  # the upstream's answer, not ours
    sent = creates(fake)[-1]
    assert sent["previous_response_id"] == ra["id"] and CONFIDENTIAL not in json.dumps(sent)
    first = fake.handshakes[0]["conn"]
    assert not any(CONFIDENTIAL in json.dumps(m) for c, m in fake.received if c != first)
    b.close()
    # The same key, on a new connection, is resumed from chain state as before.
    a2 = connect(proxy, form, AZURE_A)
    completed(a2.turn({"model": "m", "store": False, "previous_response_id": ra["id"], "input": [user("go on")]}))
    resumed = creates(fake)[-1]
    assert "previous_response_id" not in resumed and CONFIDENTIAL in json.dumps(resumed)
    a2.close()
    # The credential reached the upstream where the client put it (replayguard forwards it as it came) ...
    where = json.dumps(fake.handshakes[0])
    assert AZURE_A in where
    # ... and none of replayguard's own records in the flow (what mitmweb shows and saves) carries it.
    proxy.stop()
    with flows.open("rb") as f:
        recorded = list(io.FlowReader(f).stream())
    records = [m.text for fl in recorded if fl.websocket for m in fl.websocket.messages if m.injected]
    assert records and not any(SECRET_MARK in r for r in records)


def test_no_credential_is_a_principal_of_its_own(fake, mitm):
    """Two clients without any credential are not the same client: neither resumes the other's chain, and a
    reconnecting client without credentials is not resumed either (nothing says it is the same one). Recovery on
    its own connection is unaffected."""
    proxy = mitm(fake)
    a = connect(proxy, "none", None)
    ra = completed(a.turn({"model": "m", "store": False, "input": [user(CONFIDENTIAL)]}))
    fake.close_all()  # A's own upstream dies: A's next turn is replayed on a fresh connection, as always
    proxy.wait_log(r"lost while idle")
    ra2 = completed(a.turn({"model": "m", "store": False, "previous_response_id": ra["id"], "input": [user("more")]}))
    assert CONFIDENTIAL in json.dumps(creates(fake)[-1]) and "previous_response_id" not in creates(fake)[-1]
    a.close()
    b = connect(proxy, "none", None)
    events = b.turn({"model": "m", "store": False, "previous_response_id": ra2["id"], "input": [user("and?")]})
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "previous_response_not_found"
    assert CONFIDENTIAL not in json.dumps(creates(fake)[-1])
    b.close()


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
