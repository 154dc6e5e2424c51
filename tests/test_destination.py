"""Where a session's upstream connections go, per mode, read from flows made with mitmproxy's test helpers: the
TCP address, the TLS server name and the Host header mitmproxy's own server connection would use."""

from __future__ import annotations

import ssl

import pytest
from mitmproxy.test import tflow

from replayguard.proxy.destination import destination_of
from replayguard.proxy.upstream import TlsSettings, tls_context


def upgrade(scheme: str, host: str, port: int, host_header: str | None, client_sni: str | None = None,
            server_address: tuple[str, int] | None = None, server_sni: str | None = None, via=None):
    flow = tflow.tflow()
    flow.request.data.scheme = scheme.encode()
    flow.request.data.host = host
    flow.request.data.port = port
    flow.request.data.path = b"/v1/responses?x=1"
    if host_header is None:
        flow.request.headers.pop("Host", None)
    else:
        flow.request.headers["Host"] = host_header
    flow.request.headers["Upgrade"] = "websocket"
    flow.client_conn.sni = client_sni
    flow.server_conn.address = server_address
    flow.server_conn.sni = server_sni
    flow.server_conn.via = via
    return flow


def test_transparent_mode_dials_the_ip_with_the_clients_name():
    flow = upgrade("https", "104.18.33.45", 443, "api.openai.com", client_sni="api.openai.com",
                   server_address=("104.18.33.45", 443))
    d = destination_of(flow)
    assert d.address == ("104.18.33.45", 443)
    assert d.server_name == "api.openai.com"  # SNI and certificate name: the client's, not the IP
    assert d.host_header == "api.openai.com"
    assert d.name == "api.openai.com"
    assert d.url == "wss://api.openai.com/v1/responses?x=1"
    assert d.describe() == "TCP 104.18.33.45:443"


def test_transparent_plain_ws_uses_the_host_header():
    flow = upgrade("http", "10.0.0.7", 8080, "upstream.test:8080", server_address=("10.0.0.7", 8080))
    d = destination_of(flow)
    assert (d.secure, d.address, d.server_name, d.host_header) == (False, ("10.0.0.7", 8080), None, "upstream.test:8080")
    assert d.name == "upstream.test"


def test_regular_mode_names_the_requested_host():
    flow = upgrade("https", "api.openai.com", 443, "api.openai.com", client_sni="api.openai.com",
                   server_address=("api.openai.com", 443))
    d = destination_of(flow)
    assert (d.address, d.server_name, d.host_header, d.describe()) == (("api.openai.com", 443), "api.openai.com",
                                                                      "api.openai.com", "")


def test_reverse_mode_uses_the_targets_sni():
    # reverse:https://upstream.test:8443 sets the server's SNI and rewrites Host to the target
    flow = upgrade("https", "upstream.test", 8443, "upstream.test:8443", client_sni=None,
                   server_address=("upstream.test", 8443), server_sni="upstream.test")
    d = destination_of(flow)
    assert (d.address, d.server_name, d.host_header) == (("upstream.test", 8443), "upstream.test", "upstream.test:8443")


def test_map_remote_elsewhere_is_named_by_the_new_host():
    # the client connected to api.openai.com; map_remote pointed the request at another host
    flow = upgrade("https", "mirror.test", 9443, "mirror.test:9443", client_sni="api.openai.com",
                   server_address=("api.openai.com", 443))
    d = destination_of(flow)
    assert (d.address, d.server_name, d.host_header) == (("mirror.test", 9443), "mirror.test", "mirror.test:9443")


def test_upstream_mode_goes_through_the_proxy_with_its_credentials():
    flow = upgrade("https", "api.openai.com", 443, "api.openai.com", client_sni="api.openai.com",
                   server_address=("api.openai.com", 443), via=("http", ("corp-proxy", 3128)))
    d = destination_of(flow, upstream_auth="user:p@ss:word")
    assert d.via == ("http", ("corp-proxy", 3128))
    assert d.proxy_url == "http://user:p%40ss%3Aword@corp-proxy:3128"
    assert d.describe() == "via http://corp-proxy:3128"
    assert destination_of(flow).proxy_url == "http://corp-proxy:3128"
    # no proxy, no credentials: upstream_auth only means something in upstream mode
    direct = upgrade("https", "api.openai.com", 443, "api.openai.com", server_address=("api.openai.com", 443))
    assert destination_of(direct, upstream_auth="user:pw").proxy_auth is None


@pytest.mark.parametrize(("host", "header", "expected"), [
    ("::1", None, "[::1]:8080"),  # no Host header: built from the address, IPv6 bracketed
    ("127.0.0.1", "bad host header with spaces", "127.0.0.1:8080"),  # unusable Host: the address
])
def test_host_header_fallbacks(host, header, expected):
    d = destination_of(upgrade("http", host, 8080, header, server_address=(host, 8080)))
    assert d.host_header == expected


def test_tls_contexts_are_built_once_per_settings(tmp_path):
    a = tls_context(TlsSettings())
    assert tls_context(TlsSettings()) is a  # shared by every connection with the same options
    insecure = tls_context(TlsSettings(insecure=True))
    assert insecure is not a and insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname
    assert a.verify_mode == ssl.CERT_REQUIRED and a.check_hostname
    strict = tls_context(TlsSettings(min_version="TLS1_3"))
    assert strict.minimum_version == ssl.TLSVersion.TLSv1_3


def test_client_certs_directory_is_resolved_per_server_name(tmp_path):
    (tmp_path / "api.openai.com.pem").write_text("x")
    settings = TlsSettings(client_cert=str(tmp_path))
    assert settings.for_server("api.openai.com").client_cert == str(tmp_path / "api.openai.com.pem")
    assert settings.for_server("other.test").client_cert is None
    single = tmp_path / "one.pem"
    single.write_text("x")
    assert TlsSettings(client_cert=str(single)).for_server("any").client_cert == str(single)
