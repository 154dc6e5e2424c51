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
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import parse_qsl, quote, quote_plus, unquote_plus, urlencode, urlsplit, urlunsplit

_SECRET_HEADER = re.compile(r"authorization|cookie|api[-_]?key|secret|token|password|credential|signature", re.I)
_NOT_SECRET = frozenset({"x-codex-turn-state"})  # a routing token the upstream hands out, not a credential
_SECRET_QUERY = re.compile(r"key|token|secret|sig|password|auth", re.I)
# Anything shaped like an OpenAI-style key or a bearer credential, wherever it appears.
_SECRET_TEXT = re.compile(r"\b(?:sk|rk|pk|sess)-[A-Za-z0-9_\-]{8,}|(?<=Bearer )[A-Za-z0-9._~+/=\-]{8,}", re.I)

# Names (of headers, query parameters, subprotocol entries) that say who is asking without being secrets: the
# organisation, project, account or tenant a credential acts for.
_PRINCIPAL_NAME = re.compile(r"organi[sz]ation|project|account|tenant", re.I)
# Subprotocol entries that carry a credential, as browser clients send one (``openai-insecure-api-key.KEY``,
# ``openai-organization.ORG``, ``base64url.bearer.authorization.k8s.io.TOKEN``): the value follows the marker.
_SUBPROTOCOL_CREDENTIAL = re.compile(r"^(.*?(?:api[-_]?key|token|secret|bearer|authorization|password|credential|"
                                     r"organi[sz]ation|project|account)[^.]*\.)(.+)$", re.I)


def fingerprint(value: str) -> str:
    """A stable, non-reversible name for a secret, so two sessions can be told apart."""
    return "[redacted sha256:" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:8] + "]"


def is_secret_header(name: str) -> bool:
    return name.lower() not in _NOT_SECRET and _SECRET_HEADER.search(name) is not None


def redact_header(name: str, value: str) -> str:
    if name.lower() == "sec-websocket-protocol":
        return ", ".join(redact_subprotocol(p.strip()) for p in value.split(","))
    if not is_secret_header(name):
        return scrub(value)
    scheme, sep, rest = value.partition(" ")
    if sep and scheme.lower() in ("bearer", "basic", "token"):
        return f"{scheme} {fingerprint(rest)}"
    return fingerprint(value)


def redact_subprotocol(entry: str) -> str:
    """A subprotocol entry with the credential it carries replaced (``openai-insecure-api-key.[redacted ...]``)."""
    m = _SUBPROTOCOL_CREDENTIAL.match(entry)
    if m is None or _PRINCIPAL_NAME.search(m.group(1)):
        return entry
    return m.group(1) + fingerprint(m.group(2))


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




@dataclass(frozen=True, slots=True)
class Credentials:
    """Everything in a WebSocket handshake that says who is asking, wherever the client put it: secret-like headers
    (Authorization in any scheme, api-key, x-api-key, cookies, tokens, signatures) and the organisation, project
    and account headers; key-, token- and signature-like query parameters and userinfo in the URL; and subprotocol
    entries that carry a credential. ``parts`` are (where, value) pairs, e.g. ("header:authorization", "Bearer
    ..."), ("query:api-key", "..."), ("subprotocol", "openai-insecure-api-key...")."""

    parts: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, headers: Iterable[tuple[str, str]] = (), url: str = "", subprotocols: Iterable[str] = ()) -> "Credentials":
        parts: list[tuple[str, str]] = []
        for name, value in headers:
            key = name.lower()
            if key == "sec-websocket-protocol":
                subprotocols = [*subprotocols, *(p.strip() for p in value.split(","))]
            elif is_secret_header(key) or _PRINCIPAL_NAME.search(key):
                parts.append((f"header:{key}", value))
        if url:
            try:
                split = urlsplit(url)
            except ValueError:
                split = None
            if split is not None:
                if "@" in split.netloc:
                    parts.append(("userinfo", split.netloc.rsplit("@", 1)[0]))
                for pair in split.query.split("&"):
                    raw_name, _, raw_value = pair.partition("=")
                    name = unquote_plus(raw_name)
                    if _SECRET_QUERY.search(name) or _PRINCIPAL_NAME.search(name):
                        parts.append((f"query:{name.lower()}", raw_value))  # as sent; secrets() adds the decoded
        for entry in subprotocols:
            if entry and _SUBPROTOCOL_CREDENTIAL.match(entry):
                parts.append(("subprotocol", entry))
        return cls(tuple(sorted(parts)))

    def __bool__(self) -> bool:
        return bool(self.parts)

    def principal(self, key: bytes) -> str:
        """A keyed fingerprint of who is asking, so that chain state made by one principal never serves another.
        Keyed with a secret of the process: it names a principal without revealing or letting anyone test a guess
        of its credentials. "" when there are no credentials at all (see :class:`~replayguard.core.chain.Chain`:
        such a session is a principal of its own)."""
        if not self.parts:
            return ""
        text = "\x01".join(f"{where}\x00{value}" for where, value in self.parts)
        return hmac.new(key, text.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:32]

    def secrets(self) -> list[str]:
        """The secret values among them, as they may appear in any text (what must never be written anywhere):
        whole values, the part after an auth scheme, each cookie, a subprotocol entry's credential, and the
        percent-encoded form of query values. Longest first, so nothing is half-replaced."""
        values: list[str] = []
        for where, value in self.parts:
            kind, _, name = where.partition(":")
            if kind == "subprotocol":
                m = _SUBPROTOCOL_CREDENTIAL.match(value)
                if m is None or _PRINCIPAL_NAME.search(m.group(1)):
                    continue  # an organisation or project names, it does not authenticate
                values += [value, *_secret_forms(m.group(2))]
            elif kind == "header":
                if is_secret_header(name):
                    values += _secret_forms(value)
            elif kind == "query":
                if _SECRET_QUERY.search(name):
                    decoded = unquote_plus(value)
                    values += [value, decoded, quote(decoded, safe=""), quote_plus(decoded, safe="")]
            else:  # userinfo
                values += [value, *value.split(":", 1)]
        return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def _secret_forms(value: str) -> list[str]:
    forms = [value]
    scheme, sep, rest = value.partition(" ")
    if sep and len(rest) >= 4:
        forms.append(rest)
    for part in value.split(";"):  # cookies: every value on its own
        _, eq, cookie = part.partition("=")
        if eq and len(cookie.strip()) >= 4:
            forms.append(cookie.strip())
    return forms


def secret_values(headers: Iterable[tuple[str, str]]) -> list[str]:
    """The secret parts of a session's handshake headers (what must never be written anywhere)."""
    return Credentials.of(headers).secrets()


def principal(headers: Iterable[tuple[str, str]], key: bytes) -> str:
    """The principal of a handshake that carries its credentials in headers only (see :class:`Credentials`)."""
    return Credentials.of(headers).principal(key)
