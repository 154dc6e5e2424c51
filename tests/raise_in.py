"""A mitmproxy script for tests only (loaded with -s after addon.py): makes one path of replayguard's own work raise,
chosen by REPLAYGUARD_TEST_RAISE, to prove every internal error fails the session closed. Messages and requests
containing RAISE trigger it, so a bystander session is untouched."""

from __future__ import annotations

import os

from replayguard.core import protocol, records
from replayguard.proxy import rules, session, tracing

WHERE = os.environ.get("REPLAYGUARD_TEST_RAISE", "")
MARK = "RAISE"


class Raised(RuntimeError):
    pass


def wrap(owner, name, when):
    original = getattr(owner, name)

    def patched(*args, **kwargs):
        if when(*args, **kwargs):
            raise Raised(f"test hook in {name}")
        return original(*args, **kwargs)

    async def apatched(*args, **kwargs):
        if when(*args, **kwargs):
            raise Raised(f"test hook in {name}")
        return await original(*args, **kwargs)

    import inspect

    setattr(owner, name, apatched if inspect.iscoroutinefunction(original) else patched)


def carries_mark(*args, **kwargs) -> bool:
    return any(MARK in a if isinstance(a, str) else MARK.encode() in a if isinstance(a, bytes) else False
               for a in args)


if WHERE == "client_reader":
    wrap(protocol.Protocol, "client_message", lambda self, text, *a: carries_mark(text))
elif WHERE == "upstream_reader":
    wrap(protocol.Protocol, "upstream_message", lambda self, conn, text, *a: carries_mark(text))
elif WHERE == "recovery":
    wrap(protocol.Protocol, "_carry_over", lambda self, flights, *a: any(MARK in f.turn.raw for f in flights))
elif WHERE == "keepalive":
    init = session.Session.__init__

    def tagged_init(self, flow_id, target, *args, **kwargs):
        init(self, flow_id, target, *args, **kwargs)
        self.protocol.raise_here = MARK.lower() in target.url  # only the session that asked for it

    session.Session.__init__ = tagged_init
    wrap(protocol.Protocol, "timer_expired",
         lambda self, key: key[0] == "keepalive" and getattr(self, "raise_here", False))
elif WHERE == "rules":
    wrap(rules.Rules, "matches", lambda self, host, path, flow=None: MARK.lower() in path)
elif WHERE == "trace":
    wrap(tracing.TraceWriter, "write", lambda self, session_id, event, secrets=(), **fields: MARK in str(fields))
elif WHERE == "record":
    wrap(records, "summarize_item", lambda item, bodies=None: MARK in str(item))
elif WHERE:
    raise SystemExit(f"unknown REPLAYGUARD_TEST_RAISE {WHERE!r}")
