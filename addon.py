"""Entry point for mitmproxy: `mitmdump -s addon.py`. The logic lives in the replayguard package beside it."""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:  # mitmproxy restores sys.path after loading a script; keep the package importable
    sys.path.insert(0, _here)

from replayguard.proxy.addon import ReplayGuard  # noqa: E402

addons = [ReplayGuard()]
