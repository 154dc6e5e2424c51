"""The addon glue with mitmproxy's test helpers: options, matching, and what mitmweb shows."""

from __future__ import annotations

import pytest
from mitmproxy.exceptions import OptionsError
from mitmproxy.test import taddons, tflow

from replayguard.proxy.addon import ReplayGuard, is_websocket_upgrade


def upgrade_flow(host: str = "api.openai.com", path: str = "/v1/responses", scheme: str = "https"):
    flow = tflow.tflow()
    flow.request.scheme = scheme
    flow.request.host = host
    flow.request.port = 443 if scheme == "https" else 80
    flow.request.path = path
    flow.request.headers["Upgrade"] = "websocket"
    flow.request.headers["Connection"] = "Upgrade"
    return flow


def test_default_rules_load_and_bad_file_is_an_options_error(tmp_path):
    addon = ReplayGuard()
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        assert addon.rules is not None and addon.rules.source.endswith("rules.yaml")
        bad = tmp_path / "bad.yaml"
        bad.write_text("match:\n  - path: /v1/responses\nrecovery:\n  policy: lenient\n")
        with pytest.raises(OptionsError, match=r"bad\.yaml:4: recovery\.policy: expected one of pair-aware, strict"):
            tctx.configure(addon, replayguard_rules=str(bad))
        assert addon.rules.source.endswith("rules.yaml")  # the last good rules stay in force


def test_upgrade_detection():
    assert is_websocket_upgrade(upgrade_flow().request)
    assert not is_websocket_upgrade(tflow.tflow().request)


def test_non_matching_flows_are_untouched():
    addon = ReplayGuard()
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        for flow in (upgrade_flow(path="/v1/realtime"), tflow.tflow()):
            before = (flow.request.host, flow.request.port, flow.request.scheme, dict(flow.request.headers))
            addon.request(flow)
            assert flow.id not in addon.matched
            assert (flow.request.host, flow.request.port, flow.request.scheme, dict(flow.request.headers)) == before
            assert flow.response is None


def test_matching_uses_the_name_the_client_used():
    addon = ReplayGuard()
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        flow = upgrade_flow(host="104.18.33.45")  # transparent mode: the request names the original IP...
        flow.request.headers["Host"] = "api.openai.com"
        flow.client_conn.sni = "api.openai.com"  # ...the client named the host in its SNI and Host
        flow.server_conn.address = ("104.18.33.45", 443)
        flow.server_conn.sni = None
        addon.request(flow)
        match = addon.matched[flow.id]
        assert match.name == "api.openai.com" and match.path == "/v1/responses"
        addon.error(flow)
        assert flow.id not in addon.matched
