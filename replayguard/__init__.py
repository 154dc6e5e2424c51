"""replayguard: keep OpenAI Responses WebSocket conversations alive when the upstream connection dies.

The package is split by concern:

- ``chain``     sans-I/O replay state: turns, output items, full-input reconstruction
- ``pairing``   the call_id pairing check that makes a replay safe
- ``recovery``  the recovery decision (replay, resend or fail closed), one pure function
- ``errors``    the error events and close codes sent to clients
- ``rules``     rules.yaml loading and validation
- ``upstream``  opening and watching the addon's own upstream connections
- ``bridge``    the loopback WebSocket server that owns the client side of each flow
- ``addon``     the mitmproxy addon (glue)
"""

__version__ = "0.1.0"
