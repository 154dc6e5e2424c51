"""The sans-I/O core: parsing, replay state and the recovery decision, as plain objects.

Nothing here touches a socket, an event loop or mitmproxy; the proxy (:mod:`replayguard.proxy`) and the tools
(:mod:`replayguard.tools`) build on it, and the tests drive it directly.
"""
