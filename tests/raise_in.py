"""A mitmproxy script for tests only (loaded with -s after addon.py): makes one path of replayguard's own work raise,
chosen by REPLAYGUARD_TEST_RAISE, to prove every internal error fails the session closed. Messages and requests
containing RAISE trigger it, so a bystander session is untouched."""

from __future__ import annotations

import asyncio
import os

from replayguard.core import records
from replayguard.proxy import link, rules, session, tracing

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
    wrap(session.Session, "_from_client", lambda self, message: carries_mark(message))
elif WHERE == "upstream_reader":
    wrap(session.Session, "upstream_message", lambda self, conn, message: carries_mark(message))
elif WHERE == "recovery":
    wrap(session.Session, "_carry_over", lambda self, turn, *a, **k: MARK in turn.raw)
elif WHERE == "keepalive":
    keepalive = link.UpstreamLink.keepalive

    async def failing_keepalive(self, turn_in_flight):
        if MARK.lower() not in self.target.url:
            return await keepalive(self, turn_in_flight)
        await asyncio.sleep(self.cfg.keepalive_interval)
        raise Raised("test hook in keepalive")

    failing_keepalive.__qualname__ = keepalive.__qualname__  # the same task, as the session names it
    link.UpstreamLink.keepalive = failing_keepalive
elif WHERE == "rules":
    wrap(rules.Rules, "matches", lambda self, host, path, flow=None: MARK.lower() in path)
elif WHERE == "trace":
    wrap(tracing.TraceWriter, "write", lambda self, session_id, event, secrets=(), **fields: MARK in str(fields))
elif WHERE == "record":
    wrap(records, "summarize_item", lambda item, bodies=None: MARK in str(item))
elif WHERE:
    raise SystemExit(f"unknown REPLAYGUARD_TEST_RAISE {WHERE!r}")
