"""Timers that measure the peer, not us.

A ping timeout or the first-event timeout says "the upstream did not answer in time". If this process itself was
busy (a long synchronous step: a huge message, a slow disk, the machine's other load), the deadline can pass while
the answer sits unread in a socket buffer, and a healthy upstream would be declared dead. :class:`LoopClock` counts
how long the event loop was stalled, and its timers only count the time during which the loop was free to run.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


class LoopClock:
    TICK = 0.05  # how often the loop's lag is sampled
    SLACK = 0.02  # lag below this is scheduling noise, not a stall

    def __init__(self) -> None:
        self.stalled = 0.0  # seconds the loop was stalled, in all
        self._task: asyncio.Task[None] | None = None
        self._users = 0  # addon instances using it (a script reload overlaps the old one's last work and the new)

    def now(self) -> float:
        """Monotonic seconds, not counting the time the loop was stalled."""
        return time.monotonic() - self.stalled

    def start(self) -> None:
        self._users += 1
        if self._task is None:
            self._task = asyncio.ensure_future(self._watch())

    def stop(self) -> None:
        self._users = max(0, self._users - 1)
        if self._task is not None and self._users == 0:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.TICK)
            now = time.monotonic()
            lag = now - last - self.TICK
            if lag > self.SLACK:
                self.stalled += lag
            last = now

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of time the loop was free to run, then let what arrived meanwhile be handled."""
        deadline = self.now() + seconds
        while (remaining := deadline - self.now()) > 0:
            await asyncio.sleep(remaining)
        await _settle()

    async def wait(self, future: Any, timeout: float) -> bool:
        """Wait for ``future`` for ``timeout`` seconds of loop time; True if it is done."""
        deadline = self.now() + timeout
        while not future.done():
            remaining = deadline - self.now()
            if remaining <= 0:
                await _settle()
                return future.done()
            await asyncio.wait([future], timeout=remaining)
        return True


async def _settle() -> None:
    """Two loop iterations: data already in a socket buffer reaches the tasks waiting for it."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


CLOCK = LoopClock()  # one per process, started by the addon
