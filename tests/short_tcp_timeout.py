"""A mitmproxy script for tests only: mitmproxy 11 has no tcp_timeout option, its idle timeout is a constant read
when a connection starts; this lowers it to REPLAYGUARD_TEST_TCP_TIMEOUT seconds, as `--set tcp_timeout=` does on
mitmproxy 12."""

import os

from mitmproxy.proxy import server

server.TCP_TIMEOUT = float(os.environ["REPLAYGUARD_TEST_TCP_TIMEOUT"])
