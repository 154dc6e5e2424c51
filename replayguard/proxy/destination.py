"""Where a session's upstream connections go: exactly where mitmproxy's own server connection would have gone.

Read from the flow after every other addon had its say (map_remote, modify_headers, other scripts, an intercept
edit), so what they change applies to the session:

- the TCP destination is the request's host and port: the original destination address in transparent, local and
  wireguard modes, the requested host in regular and socks5 modes, the target in reverse mode, the mapped host
  after map_remote;
- in upstream mode the connection goes through the configured proxy with CONNECT (``upstream_auth`` when set);
- the TLS server name (SNI, and the name the certificate is verified against) is the one mitmproxy would use:
  the client's SNI when the request still goes where the client was connecting (the reverse target's name in
  reverse mode), else the request's host;
- the Host header is the request's own, as mitmproxy would send it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from mitmproxy.net.http import url


@dataclass(frozen=True, slots=True)
class Destination:
    secure: bool  # wss (TLS) or ws
    address: tuple[str, int]  # where the TCP connection goes (through ``via`` when set)
    server_name: str | None  # TLS SNI and certificate name; None for ws
    host_header: str  # the Host header sent upstream
    path: str  # path and query
    via: tuple[str, tuple[str, int]] | None = None  # upstream proxy (scheme, address) in upstream mode
    proxy_auth: str | None = None  # "user:pass" for the upstream proxy

    @property
    def url(self) -> str:
        """The upstream as the client addressed it (its Host header), for logs, traces and the UI."""
        return f"{'wss' if self.secure else 'ws'}://{self.host_header}{self.path}"

    @property
    def name(self) -> str:
        """The host name the client used: what rules and fault scopes match on, in every mode."""
        if self.server_name:
            return self.server_name
        host, _ = _split(self.host_header)
        return host or self.address[0]

    @property
    def proxy_url(self) -> str | None:
        """The upstream proxy as a URL with its credentials, for the WebSocket client."""
        if self.via is None:
            return None
        scheme, (host, port) = self.via
        auth = ""
        if self.proxy_auth:
            user, _, password = self.proxy_auth.partition(":")
            auth = f"{quote(user, safe='')}:{quote(password, safe='')}@"
        return f"{scheme}://{auth}{bracket_host(host)}:{port}"

    def describe(self) -> str:
        """Where the connection really goes, when that differs from :attr:`url` (for logs and the UI)."""
        parts = []
        host, port = self.address
        if (host, port) != _split(self.host_header, 443 if self.secure else 80):
            parts.append(f"TCP {bracket_host(host)}:{port}")
        if self.server_name and self.server_name != self.name:
            parts.append(f"SNI {self.server_name}")
        if self.via is not None:
            parts.append(f"via {self.via[0]}://{bracket_host(self.via[1][0])}:{self.via[1][1]}")
        return ", ".join(parts)


def destination_of(flow: Any, upstream_auth: str | None = None) -> Destination:
    """The destination of a WebSocket upgrade flow, as mitmproxy would connect for it now."""
    request = flow.request
    secure = request.scheme == "https"
    address = (request.host, request.port)
    server = flow.server_conn
    server_name = None
    if secure:
        if server is not None and server.address == address:
            # The connection the client was making: mitmproxy keeps its SNI (reverse mode sets the target's).
            server_name = server.sni or flow.client_conn.sni or request.host
        else:
            server_name = request.host  # pointed elsewhere (map_remote, a script): named by the new host
    host_header = request.host_header
    if not host_header or not _valid_authority(host_header):
        host_header = url.hostport(request.scheme, bracket_host(request.host), request.port)
    via = server.via if server is not None else None
    return Destination(
        secure=secure,
        address=address,
        server_name=server_name,
        host_header=host_header,
        path=request.path or "/",
        via=(via[0], (via[1][0], via[1][1])) if via else None,
        proxy_auth=upstream_auth if via else None,
    )


def bracket_host(host: str) -> str:
    """An IPv6 address in brackets, as it stands in a URL or a Host header."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _split(authority: str, default_port: int | None = None) -> tuple[str, int | None]:
    try:
        host, port = url.parse_authority(authority, check=False)
    except ValueError:
        return authority, default_port
    return host, port if port is not None else default_port


def _valid_authority(authority: str) -> bool:
    try:
        url.parse_authority(authority, check=True)
    except ValueError:
        return False
    return True
