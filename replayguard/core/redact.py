"""Secrets out of everything replayguard writes: logs, traces, error events and what mitmweb shows.

Header values of Authorization, cookies and anything named like a key or token are replaced by a fingerprint (a
stable, non-reversible name, so two sessions can be told apart), URLs lose credentials in userinfo and in key-like
query parameters, and free text is scrubbed of a session's own secret values and of anything shaped like an API key
or a bearer token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SECRET_HEADER = re.compile(r"authorization|cookie|api[-_]?key|secret|token|password|credential|signature", re.I)
_NOT_SECRET = frozenset({"x-codex-turn-state"})  # a routing token the upstream hands out, not a credential
_SECRET_QUERY = re.compile(r"key|token|secret|sig|password|auth", re.I)
# Anything shaped like an OpenAI-style key or a bearer credential, wherever it appears.
_SECRET_TEXT = re.compile(r"\b(?:sk|rk|pk|sess)-[A-Za-z0-9_\-]{8,}|(?<=Bearer )[A-Za-z0-9._~+/=\-]{8,}", re.I)


def fingerprint(value: str) -> str:
    """A stable, non-reversible name for a secret, so two sessions can be told apart."""
    return "[redacted sha256:" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:8] + "]"


def is_secret_header(name: str) -> bool:
    return name.lower() not in _NOT_SECRET and _SECRET_HEADER.search(name) is not None


def redact_header(name: str, value: str) -> str:
    if not is_secret_header(name):
        return scrub(value)
    scheme, sep, rest = value.partition(" ")
    if sep and scheme.lower() in ("bearer", "basic", "token"):
        return f"{scheme} {fingerprint(rest)}"
    return fingerprint(value)


def redact_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        redacted = redact_header(name, value)
        out[key] = f"{out[key]}, {redacted}" if key in out else redacted
    return out


def redact_url(url: str) -> str:
    """The URL with credentials in userinfo or in key/token-like query parameters replaced."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return scrub(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "[redacted]@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "[redacted]" if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="[]")
    return scrub(urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)))


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove known secret values and anything shaped like a key or bearer token from ``text``."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "[redacted]")
    return _SECRET_TEXT.sub("[redacted]", text)


def secret_values(headers: Iterable[tuple[str, str]]) -> list[str]:
    """The secret parts of a session's handshake headers (what must never be written anywhere)."""
    values: list[str] = []
    for name, value in headers:
        if not is_secret_header(name):
            continue
        values.append(value)
        scheme, sep, rest = value.partition(" ")
        if sep and len(rest) >= 4:
            values.append(rest)
        # Cookie headers: every cookie value on its own.
        for part in value.split(";"):
            _, eq, cookie = part.partition("=")
            if eq and len(cookie.strip()) >= 4:
                values.append(cookie.strip())
    return sorted(set(values), key=len, reverse=True)  # longest first: no half-replaced secrets


# Headers that say who is asking: the credential and the organisation/project/account it acts for.
PRINCIPAL_HEADERS = ("authorization", "api-key", "x-api-key", "cookie", "openai-organization", "openai-project",
                     "chatgpt-account-id")


def principal(headers: Iterable[tuple[str, str]], key: bytes) -> str:
    """A keyed fingerprint of who a session acts for (its credentials, organisation and project), so that chain
    state made by one principal never serves another. Keyed with a secret of the process: it names a principal
    without revealing or letting anyone test a guess of its credentials. "" when there are none."""
    parts = sorted(f"{name.lower()}\x00{value}" for name, value in headers if name.lower() in PRINCIPAL_HEADERS)
    if not parts:
        return ""
    return hmac.new(key, "\x01".join(parts).encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:32]
