"""Reading Responses WebSocket messages cheaply: most of a stream is delta events, which the state never needs."""

from __future__ import annotations

import json
import re
from typing import Any

# The event type, when it is the first key (as the upstream sends it): cheap to read without decoding.
_TYPE_HEAD = re.compile(r'\{\s*"type"\s*:\s*"([a-z_.]+)"')


def is_delta(message: str) -> bool:
    """A streaming delta event (`response.*.delta`): forwarded without being decoded."""
    m = _TYPE_HEAD.match(message, 0, 96)
    return m is not None and m.group(1).endswith(".delta")


def parse(text: str | bytes) -> Any:
    """A message's JSON, or None when it is not JSON replayguard can read: invalid, or nested deeper than the parser
    goes. Such a message is opaque: passed through unchanged, never an error of ours."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
