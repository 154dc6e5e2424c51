"""Fail closed on every internal error, through a real mitmdump: an exception in any path of replayguard's own work
(raised on purpose by tests/raise_in.py) ends that session with one structured error event (500 server_error
replayguard_internal_error, naming the cause) and close 1011, one log line with the traceback; a session beside it
goes on."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, Client, completed, user
from websockets.exceptions import InvalidStatus


def start(mitm, fake, where: str, **sections):
    return mitm(fake, args=["-s", str(ROOT / "tests" / "raise_in.py")], env={"REPLAYGUARD_TEST_RAISE": where},
                **sections)


def assert_failed_closed(client: Client, proxy, where: str) -> None:
    events, code, _ = client.until_closed(timeout=10)
    errors = [e for e in events if e.get("type") == "error"]
    assert len(errors) == 1, events
    error = errors[0]
    assert error["status"] == 500 and error["error"]["type"] == "server_error"
    assert error["error"]["code"] == "replayguard_internal_error"
    assert f"internal error in {where}" in error["error"]["message"] and "Raised" in error["error"]["message"]
    assert code == 1011
    proxy.wait_log(rf"replayguard internal error in {re.escape(where)}; session failed closed")
    assert proxy.log.count("Traceback (most recent call last)") == 1  # one log line (record) with the traceback


def bystander_works(proxy) -> None:
    other = Client(proxy.url + "/v1/responses")
    r1 = completed(other.turn({"model": "m", "store": False, "input": [user("hello")]}))
    completed(other.turn({"model": "m", "store": False, "previous_response_id": r1["id"], "input": [user("ok")]}))
    other.close()


@pytest.mark.parametrize(("where", "path"), [
    ("client_reader", "the client reader"),
    ("upstream_reader", "the upstream reader"),
    ("trace", "the client reader"),  # trace records are written where the client's create is handled
    ("record", "the client reader"),
])
def test_an_exception_in_a_session_path_fails_it_closed(fake, mitm, where, path):
    proxy = start(mitm, fake, where)
    bystander = Client(proxy.url + "/v1/responses")
    completed(bystander.turn({"model": "m", "store": False, "input": [user("hello")]}))
    client = Client(proxy.url + "/v1/responses")
    client.send({"type": "response.create", "model": "m", "store": False, "input": [user("RAISE please")]})
    assert_failed_closed(client, proxy, path)
    completed(bystander.turn({"model": "m", "store": False, "input": [user("still here")]}))
    bystander.close()
    bystander_works(proxy)


def test_an_exception_in_recovery_fails_it_closed(fake, mitm):
    proxy = start(mitm, fake, "recovery")
    client = Client(proxy.url + "/v1/responses")
    r1 = completed(client.turn({"model": "m", "store": False, "input": [user("hi")]}))
    fake.close_all()
    proxy.wait_log(r"lost while idle")
    client.send({"type": "response.create", "model": "m", "store": False, "previous_response_id": r1["id"],
                 "input": [user("RAISE now")]})
    assert_failed_closed(client, proxy, "recovery")
    bystander_works(proxy)


def test_an_exception_in_the_keepalive_fails_it_closed(fake, mitm):
    proxy = start(mitm, fake, "keepalive", upstream={"keepalive_interval": 0.3})
    client = Client(proxy.url + "/v1/raise/responses")
    completed(client.turn({"model": "m", "store": False, "input": [user("hi")]}))
    assert_failed_closed(client, proxy, "the keepalive")
    bystander_works(proxy)


def test_an_exception_while_matching_the_rules_answers_500(fake, mitm):
    proxy = start(mitm, fake, "rules")
    with pytest.raises(InvalidStatus) as refused:
        Client(proxy.url + "/v1/raise/responses")
    response = refused.value.response
    assert response.status_code == 500 and b"replayguard_internal_error" in response.body
    assert b"internal error in matching the rules" in response.body
    assert fake.handshakes == []  # never let through to the upstream unguarded
    proxy.wait_log(r"replayguard internal error in matching the rules")
    bystander_works(proxy)
