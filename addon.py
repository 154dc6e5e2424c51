"""Entry point for mitmproxy: `mitmdump -s addon.py`. The logic lives in the replayguard package beside it."""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:  # mitmproxy restores sys.path after loading a script; keep the package importable
    sys.path.insert(0, _here)

# mitmproxy runs this file again when it changes (replayguard touches it when the package changes): import the
# package afresh, so an edit of either takes effect. Sessions of the previous load end cleanly (see the README).
for _name in [n for n in sys.modules if n == "replayguard" or n.startswith("replayguard.")]:
    del sys.modules[_name]

from replayguard.proxy.addon import ReplayGuard  # noqa: E402

addons = [ReplayGuard(script=__file__)]
