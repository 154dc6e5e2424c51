"""The "Responses" contentview: :mod:`replayguard.core.render` in mitmproxy's UIs, on mitmproxy 11 and 12.

mitmproxy 12 replaced the contentview API (``contentviews.Contentview``, a registry keyed by lower-cased name)
and 11 has only ``contentviews.View`` (a list that refuses duplicates), so the API is feature-detected. The view
wins ``auto`` only for WebSocket text messages that are Responses events or replayguard records: mitmproxy shows
WebSocket JSON as Raw otherwise, and HTTP bodies keep their own views.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from mitmproxy import contentviews

from ..core.render import Line, is_responses_message, render

log = logging.getLogger(__name__)

NAME = "Responses"
PRIORITY = 10.0  # above every built-in view (they return at most 1 for a WebSocket message)
NEW_API = hasattr(contentviews, "Contentview")  # mitmproxy >= 12


class _Earlier(Sequence[tuple[bool, bytes]]):
    """(from_client, content) of the flow's messages before ``message``, found by identity only when first asked:
    most messages (deltas) never need them, and a UI renders every message of a flow."""

    def __init__(self, messages: Sequence[Any], message: Any) -> None:
        self._messages = messages
        self._message = message
        self._end: int | None = None

    def __len__(self) -> int:
        if self._end is None:
            # Not found (a copy, or a message not yet appended): all of the flow's messages came before it.
            self._end = next((i for i, m in enumerate(self._messages) if m is self._message), len(self._messages))
        return self._end

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        end = len(self)
        if index < 0:
            index += end
        if not 0 <= index < end:
            raise IndexError(index)
        m = self._messages[index]
        return m.from_client, m.content


def _wanted(data: bytes, websocket_message: Any) -> bool:
    """Auto-selected for WebSocket text frames only; an exception here would break `auto` for every message."""
    try:
        return (websocket_message is not None and bool(getattr(websocket_message, "is_text", False))
                and is_responses_message(data))
    except Exception:  # noqa: BLE001
        log.debug("replayguard: Responses view could not classify a message", exc_info=True)
        return False


def _lines(data: bytes, flow: Any, websocket_message: Any) -> list[Line]:
    websocket = getattr(flow, "websocket", None)
    earlier: Sequence[tuple[bool, bytes]] = ()
    if websocket is not None and websocket_message is not None:
        earlier = _Earlier(websocket.messages, websocket_message)
    lines = render(data, earlier, flow_key=getattr(flow, "id", None))
    if lines is None:
        raise ValueError("not a JSON object")  # mitmproxy falls back to Raw when the view was picked by auto
    return lines


if NEW_API:

    class ResponsesContentview(contentviews.Contentview):
        """mitmproxy 12: text out, one line per (style, text)."""

        name = NAME
        syntax_highlight = "yaml"

        def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
            return "\n".join(text for _, text in _lines(data, metadata.flow, metadata.websocket_message))

        def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
            return PRIORITY if _wanted(data, metadata.websocket_message) else -1

    def _add(view: Any) -> None:
        contentviews.add(view)  # replaces a view of the same name

    def _remove(view: Any) -> None:
        # contentviews.remove() is a deprecated no-op in 12 and there is no public unregister.
        by_name = getattr(contentviews.registry, "_by_name", None)
        if by_name is None:
            log.warning("replayguard: cannot unregister the %s contentview on this mitmproxy", NAME)
            return
        if by_name.get(NAME.lower()) is view:
            del by_name[NAME.lower()]
            contentviews.registry.on_change.send(view)

else:
    from mitmproxy.contentviews import base

    class ResponsesContentview(base.View):  # type: ignore[no-redef]
        """mitmproxy 11: (description, lines of [(style, text)])."""

        name = NAME

        def __call__(self, data: bytes, **metadata: Any) -> Any:
            lines = _lines(data, metadata.get("flow"), metadata.get("websocket_message"))
            return NAME, iter([[line] for line in lines])

        def render_priority(self, data: bytes, **metadata: Any) -> float:
            return PRIORITY if _wanted(data, metadata.get("websocket_message")) else -1

    # mitmproxy 11's API, type-checked against 12's stubs when mypy runs on the mitmproxy 12 line.
    def _add(view: Any) -> None:
        # 11 raises on a duplicate name: drop what an earlier load (or a crashed one) left behind.
        while (old := contentviews.get(NAME)) is not None:
            contentviews.remove(old)  # type: ignore[arg-type]
        contentviews.add(view)

    def _remove(view: Any) -> None:
        if view in contentviews.views:  # type: ignore[attr-defined]
            contentviews.remove(view)


def register() -> object:
    """Register a fresh view, replacing any earlier one: after any number of (re)loads exactly one is registered."""
    view = ResponsesContentview()
    _add(view)
    log.debug("replayguard: %s contentview registered", NAME)
    return view


def unregister(view: object) -> None:
    """Remove ``view`` if it is still the registered one; safe to call again (mitmproxy runs done twice)."""
    _remove(view)
