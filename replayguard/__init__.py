"""replayguard: keep OpenAI Responses WebSocket conversations alive when the upstream connection dies.

- :mod:`replayguard.core`   the sans-I/O core: replay state, pairing, the recovery decision, events, records
- :mod:`replayguard.proxy`  what runs inside mitmproxy: the addon, the bridge, sessions and their upstream links
- :mod:`replayguard.tools`  developer tools behind ``replayguard <command>``
"""

__version__ = "0.1.0"
