"""Credentials wherever a client carries them: who is asking (the principal) and what must never be written."""

from __future__ import annotations

import logging

from replayguard.core import events as ev
from replayguard.core.redact import Credentials, redact_headers, redact_url, scrub
from replayguard.proxy.reporting import SessionLog

KEY = b"k" * 32
AZURE = "0123456789abcdef0123456789abcdef"  # 32 hex characters: no shape gives it away


def test_every_place_a_credential_travels_makes_a_principal():
    forms = {
        "authorization": Credentials.of([("Authorization", f"Token {AZURE}")]),
        "api-key": Credentials.of([("api-key", AZURE)]),
        "x-api-key": Credentials.of([("X-Api-Key", AZURE)]),
        "query": Credentials.of(url=f"wss://r.example/openai/v1/responses?api-version=1&api-key={AZURE}"),
        "signature": Credentials.of(url=f"wss://r.example/v1/responses?se=2026&sig={AZURE}"),
        "token": Credentials.of(url=f"wss://r.example/v1/responses?access_token={AZURE}"),
        "subprotocol": Credentials.of([("Sec-WebSocket-Protocol", f"realtime, openai-insecure-api-key.{AZURE}")]),
        "cookie": Credentials.of([("Cookie", f"a=1; session={AZURE}")]),
        "userinfo": Credentials.of(url=f"wss://user:{AZURE}@r.example/v1/responses"),
    }
    for name, creds in forms.items():
        assert creds, name
        principal = creds.principal(KEY)
        assert principal and AZURE not in principal, name
        assert AZURE in creds.secrets(), name
    # The same value in another place is another principal, and the fingerprint is keyed by the process.
    assert len({c.principal(KEY) for c in forms.values()}) == len(forms)
    assert forms["api-key"].principal(KEY) != forms["api-key"].principal(b"another process")


def test_organisation_project_and_account_are_part_of_who_is_asking_but_not_secret():
    base = [("Authorization", "Bearer sk-a")]
    for extra in (("OpenAI-Organization", "org-2"), ("OpenAI-Project", "proj-2"), ("ChatGPT-Account-Id", "acct-2")):
        assert Credentials.of(base).principal(KEY) != Credentials.of(base + [extra]).principal(KEY)
        assert extra[1] not in Credentials.of(base + [extra]).secrets()
    via_protocol = Credentials.of([("Sec-WebSocket-Protocol", "openai-insecure-api-key.sk-abcd, openai-organization.org-9")])
    assert via_protocol.principal(KEY) != Credentials.of(
        [("Sec-WebSocket-Protocol", "openai-insecure-api-key.sk-abcd, openai-organization.org-8")]).principal(KEY)
    assert "org-9" not in " ".join(via_protocol.secrets())


def test_nothing_that_is_not_a_credential_makes_a_principal():
    creds = Credentials.of([("OpenAI-Beta", "responses_websockets=2026-02-06"), ("x-codex-turn-state", "ts-1"),
                            ("Sec-WebSocket-Protocol", "realtime"), ("session_id", "s-1"), ("Sec-WebSocket-Key", "x")],
                           "wss://api.example/v1/responses?api-version=2025-04-01")
    assert not creds and creds.principal(KEY) == "" and creds.secrets() == []


def test_secrets_are_scrubbed_whatever_their_shape_and_encoding():
    creds = Credentials.of([("Sec-WebSocket-Protocol", f"openai-insecure-api-key.{AZURE}")],
                           f"wss://r.example/v1/responses?api-key={AZURE}%2B&sig=a+b/c=")
    text = (f"url ...api-key={AZURE}%2B&sig=a+b/c=; protocol openai-insecure-api-key.{AZURE}; decoded {AZURE}+ "
            "and a b/c= and a%20b%2Fc%3D")
    out = scrub(text, creds.secrets())
    assert AZURE not in out and "a+b/c=" not in out and "a b/c=" not in out and "a%20b%2Fc%3D" not in out


def test_headers_and_urls_are_redacted_by_place():
    h = redact_headers([("Sec-WebSocket-Protocol", f"realtime, openai-insecure-api-key.{AZURE}"),
                        ("api-key", AZURE), ("Cookie", f"s={AZURE}")])
    assert AZURE not in str(h)
    assert h["sec-websocket-protocol"].startswith("realtime, openai-insecure-api-key.[redacted sha256:")
    url = redact_url(f"wss://r.example/openai/v1/responses?api-version=1&api-key={AZURE}&sig={AZURE}")
    assert AZURE not in url and "api-version=1" in url


def test_the_session_log_never_carries_the_sessions_credentials(caplog):
    secrets = Credentials.of(url=f"wss://r.example/v1/responses?api-key={AZURE}").secrets()
    with caplog.at_level(logging.INFO):
        SessionLog("f1", secrets)(ev.UpstreamLost(1, ev.Trigger.CLOSED, f"handshake to ?api-key={AZURE} failed", None))
    assert "lost while idle" in caplog.text and AZURE not in caplog.text
