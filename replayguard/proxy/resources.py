"""File descriptors: a session costs several (the client's, mitmproxy's hop to the bridge at both ends, replayguard's
own upstream connection), so replayguard raises the soft open-files limit to the hard one at startup; and when
descriptors run out anyway, the flood of identical accept() errors asyncio would log with a traceback each becomes
one log line per burst."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BURST_QUIET = 2.0  # seconds without such an error that end a burst


def raise_open_files_limit() -> tuple[int, int] | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (old, new) when it changed."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warning("replayguard: could not raise the open-files limit from %d: %s", soft, e)
        return None
    return soft, target


def is_exhaustion(exc: BaseException | None) -> bool:
    return isinstance(exc, OSError) and exc.errno in EXHAUSTED


def _stale_accept_retry(context: dict[str, Any]) -> bool:
    exc = context.get("exception")
    if not isinstance(exc, ValueError) or "Invalid file descriptor: -1" not in str(exc):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_start_serving":
            return True
        tb = tb.tb_next
    return False


class DescriptorAlarm:
    """An asyncio exception handler in front of mitmproxy's: errors that say the process ran out of descriptors are
    counted and reported once per burst; everything else goes to the handler it wraps."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = loop
        self.clock = clock
        self.previous = loop.get_exception_handler()
        self.count = 0  # in the current burst
        self.last = 0.0
        self.bursts = 0
        loop.set_exception_handler(self)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if self.bursts and _stale_accept_retry(context):
            # After an exhaustion asyncio retries accepting a second later; a server closed meanwhile (the proxy
            # stopping) makes that retry fail on fd -1: nothing is wrong, nothing to report.
            log.debug("replayguard: a server closed before asyncio's accept retry")
            return
        if not is_exhaustion(context.get("exception")):
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.note(context.get("exception"))

    def note(self, exc: BaseException | None) -> None:
        """One more 'out of descriptors'; the first of a burst is logged, the burst's total when it ends."""
        now = self.clock()
        if self.count and now - self.last > BURST_QUIET:
            self._end_burst()
        if self.count == 0:
            self.bursts += 1
            log.warning("replayguard: out of file descriptors (%s): new connections wait or are refused until some "
                        "close; raise the limit (ulimit -n) for more concurrent sessions",
                        getattr(exc, "strerror", None) or exc)
            self.loop.call_later(BURST_QUIET + 0.1, self._maybe_end)
        self.count += 1
        self.last = now

    def _maybe_end(self) -> None:
        if self.count and self.clock() - self.last > BURST_QUIET:
            self._end_burst()
        elif self.count:
            self.loop.call_later(BURST_QUIET + 0.1, self._maybe_end)

    def _end_burst(self) -> None:
        log.warning("replayguard: descriptors available again after %d failed accept/connect attempt(s)", self.count)
        self.count = 0

    def uninstall(self) -> None:
        if self.loop.get_exception_handler() is self:
            self.loop.set_exception_handler(self.previous)
