"""A mitmproxy script for tests only: once mitmproxy runs, it loads addon.py, as a user adding the script in
mitmweb's options would (replayguard loaded into a running mitmproxy)."""

import asyncio
from pathlib import Path

from mitmproxy import ctx

ADDON = str(Path(__file__).resolve().parent.parent / "addon.py")


class LoadLater:
    def running(self) -> None:
        asyncio.get_running_loop().call_later(0.2, lambda: ctx.options.update(scripts=[*ctx.options.scripts, ADDON]))


addons = [LoadLater()]
