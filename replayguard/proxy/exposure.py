"""Whether mitmproxy listens beyond this machine. mitmproxy listens on every interface unless told otherwise, and a
proxy that carries API keys should not be open to the network by accident: replayguard says so once at startup."""

from __future__ import annotations

import ipaddress
from typing import Any

from mitmproxy.proxy import mode_specs


def is_loopback(host: str) -> bool:
    """An address only this machine reaches: 127.0.0.0/8, ::1, localhost. '' (every interface) and names are not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposed(options: Any) -> list[str]:
    """``host:port`` of each listener that other machines may reach ('*' for every interface): every proxy mode that
    binds an address (local capture binds none), and mitmweb's web UI, which reads flows and sets options."""
    found = []
    if getattr(options, "server", True):
        for spec in getattr(options, "mode", None) or ["regular"]:
            try:
                mode = mode_specs.ProxyMode.parse(spec)
            except ValueError:  # mitmproxy itself refuses a bad mode
                continue
            port = mode.listen_port(getattr(options, "listen_port", None))
            host = mode.listen_host(getattr(options, "listen_host", None))
            if port is not None and not is_loopback(host):
                found.append(f"{host or '*'}:{port} ({spec})")
    web_host = getattr(options, "web_host", None)
    if web_host is not None and not is_loopback(web_host):
        found.append(f"{web_host or '*'}:{getattr(options, 'web_port', '?')} (mitmweb's web UI)")
    return found
