"""Reading Responses WebSocket messages cheaply: most of a stream is delta events, which the state never needs."""

from __future__ import annotations

import json
import re
from typing import Any, Generator

# The event type, when it is the first key (as the upstream sends it): cheap to read without decoding.
_TYPE_HEAD = re.compile(r'\{\s*"type"\s*:\s*"([a-z_.]+)"')


def is_delta(message: str) -> bool:
    """A streaming delta event (`response.*.delta`): forwarded without being decoded."""
    m = _TYPE_HEAD.match(message, 0, 96)
    return m is not None and m.group(1).endswith(".delta")


# A lane's stream_id as a key of the event object (a quote inside a JSON string is escaped, so this cannot match
# text a delta carries).
_STREAM_ID = re.compile(r'(?<!\\)"stream_id"\s*:\s*"((?:[^"\\]|\\.)*)"')


def lane_of(message: str) -> str | None:
    """The stream_id of an event that was not decoded (a delta), or None."""
    m = _STREAM_ID.search(message)
    if m is None:
        return None
    try:
        value = json.loads(f'"{m.group(1)}"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def parse(text: str | bytes) -> Any:
    """A message's JSON, or None when it is not JSON replayguard can read: invalid, or nested deeper than the parser
    goes. Such a message is opaque: passed through unchanged, never an error of ours."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


# -- large messages in steps -------------------------------------------------------------------------
STEP = 1 << 20  # characters parsed or written between two chances for the event loop to serve other sessions
_decoder = json.JSONDecoder()
_WS = " \t\n\r"


def parse_steps(text: str, step: int = STEP) -> Generator[None, None, Any]:
    """Parse ``text`` like :func:`parse`, yielding after about every ``step`` characters so that a caller on an
    event loop can let other work run in between (a 60 MB request must not hold every other session up for the
    whole parse). The top-level object's members and the items of its top-level arrays are parsed one by one;
    anything deeper is one step. Returns None for text that is not JSON, as :func:`parse` does."""
    try:
        value, end = yield from _value_steps(text, _skip(text, 0), step, [0], depth=0)
    except (ValueError, RecursionError):
        return None
    if _skip(text, end) != len(text):
        return None
    return value


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _value_steps(text: str, i: int, step: int, since: list[int], depth: int) -> Generator[None, None, tuple[Any, int]]:
    if i - since[0] >= step:
        since[0] = i
        yield
    if depth < 2 and i < len(text) and text[i] in "[{":
        return (yield from (_object_steps if text[i] == "{" else _array_steps)(text, i, step, since, depth))
    return _decoder.raw_decode(text, i)


def _object_steps(text: str, i: int, step: int, since: list[int], depth: int) -> Generator[None, None, tuple[Any, int]]:
    out: dict[str, Any] = {}
    i = _skip(text, i + 1)
    if text[i:i + 1] == "}":
        return out, i + 1
    while True:
        if text[i:i + 1] != '"':
            raise ValueError("expected a key")
        key, i = _decoder.raw_decode(text, i)
        i = _skip(text, i)
        if text[i:i + 1] != ":":
            raise ValueError("expected ':'")
        out[key], i = yield from _value_steps(text, _skip(text, i + 1), step, since, depth + 1)
        i = _skip(text, i)
        if text[i:i + 1] == "}":
            return out, i + 1
        if text[i:i + 1] != ",":
            raise ValueError("expected ',' or '}'")
        i = _skip(text, i + 1)


def _array_steps(text: str, i: int, step: int, since: list[int], depth: int) -> Generator[None, None, tuple[Any, int]]:
    out: list[Any] = []
    i = _skip(text, i + 1)
    if text[i:i + 1] == "]":
        return out, i + 1
    while True:
        value, i = yield from _value_steps(text, i, step, since, depth + 1)
        out.append(value)
        i = _skip(text, i)
        if text[i:i + 1] == "]":
            return out, i + 1
        if text[i:i + 1] != ",":
            raise ValueError("expected ',' or ']'")
        i = _skip(text, i + 1)


def dumps_steps(obj: dict[str, Any], step: int = STEP) -> Generator[None, None, str]:
    """``json.dumps(obj)`` for an object whose bulk is in top-level arrays (a replay's input), yielding after about
    every ``step`` characters written."""
    parts: list[str] = []
    written = 0
    for n, (key, value) in enumerate(obj.items()):
        parts.append(("{" if n == 0 else ", ") + json.dumps(key) + ": ")
        if isinstance(value, list):
            parts.append("[")
            for m, item in enumerate(value):
                text = json.dumps(item)
                parts.append((", " if m else "") + text)
                written += len(text)
                if written >= step:
                    written = 0
                    yield
            parts.append("]")
        else:
            parts.append(json.dumps(value))
    parts.append("}" if parts else "{}")
    return "".join(parts)
