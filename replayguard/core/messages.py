"""Reading Responses WebSocket messages cheaply: most of a stream is delta events, which the state never needs."""

from __future__ import annotations

import re

# The event type, when it is the first key (as the upstream sends it): cheap to read without decoding.
_TYPE_HEAD = re.compile(r'\{\s*"type"\s*:\s*"([a-z_.]+)"')


def is_delta(message: str) -> bool:
    """A streaming delta event (`response.*.delta`): forwarded without being decoded."""
    m = _TYPE_HEAD.match(message, 0, 96)
    return m is not None and m.group(1).endswith(".delta")
