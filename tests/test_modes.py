"""Every mitmproxy mode, through a real mitmdump: replayguard's upstream connections go where mitmproxy's own would
(the TCP destination, the TLS server name verified against a private CA, the Host header, the upstream proxy), and a
tool-call chain survives an upstream drop there exactly as in regular mode.

Each test names the client's upstream by a host name its certificate carries (never an IP), and the fake upstream
answers 421 to a handshake whose SNI or Host names anything else, as api.openai.com's front end does.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from modes import (ConnectProxy, Redirect, client_command, client_env, leftover_redirector_rules,
                   local_mode_unavailable, sudo_shim, transparent_unavailable)
from conftest import BASE_RULES
from tls import PrivateCA
from webui import Mitmweb

from replayguard.tools.fake_upstream import FakeUpstream

SECRET_KEY = "sk-SECRETmodes0123456789"
NAME = "upstream.test"
DROP_AFTER_2 = [{"kind": "drop", "after_turn": 2}]


@pytest.fixture
def ca(tmp_path: Path) -> PrivateCA:
    return PrivateCA(tmp_path)


@pytest.fixture
def named_upstream(ca: PrivateCA):
    """A TLS fake upstream whose certificate names upstream.test, signed by the private CA, checking SNI and Host."""
    fake = FakeUpstream(ssl_context=ca.server_context(NAME, "localhost"), expect_name=NAME).start()
    yield fake
    fake.stop()


def mitm_ca(proxy: Any) -> str:
    return str(proxy.tmp / "conf" / "mitmproxy-ca-cert.pem")


def run_client(url: str, *args: str, timeout: float = 60, **popen: Any) -> subprocess.CompletedProcess[str]:
    command = client_command(url, "--turns", "4", "--header", f"Authorization: Bearer {SECRET_KEY}", *args,
                             name=popen.pop("name", None))
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=client_env(), **popen)


def assert_chain_survived_the_drop(result: subprocess.CompletedProcess[str], fake: FakeUpstream, proxy: Any,
                                   name: str, port: int) -> list[dict[str, Any]]:
    """The client's 4 turns completed; turn 3 was replayed on a second upstream connection with every
    function_call before its output; every handshake named the host (SNI, Host) and carried the key."""
    assert result.returncode == 0, f"client failed:\n{result.stdout}\n{result.stderr}\n{proxy.log}"
    assert result.stdout.count(" completed in ") == 4, result.stdout
    proxy.wait_log(r"injected fault after turn 2: drop upstream TCP")
    proxy.wait_log(r"turn 3: upstream connection dropped -> replay")
    accepted = [h for h in fake.handshakes if h["status"] == 101]
    assert len(accepted) >= 2, fake.handshakes
    assert all(h["status"] == 101 for h in fake.handshakes), fake.handshakes  # never a 421
    for h in accepted:
        assert h["headers"]["host"] == (name if port == 443 else f"{name}:{port}")
        assert h["headers"]["authorization"] == f"Bearer {SECRET_KEY}"
        if fake.ssl_context is not None:
            assert h["sni"] == name
    replay = [m for c, m in fake.received if c == accepted[-1]["conn"] and m.get("type") == "response.create"][0]
    kinds = [i["type"] for i in replay["input"]]
    assert "previous_response_id" not in replay
    assert kinds.index("function_call") < kinds.index("function_call_output")
    return accepted


def trace_records(proxy: Any) -> list[dict[str, Any]]:
    path = proxy.tmp / "trace.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- transparent -------------------------------------------------------------------------------------
@pytest.fixture
def redirect():
    reason = transparent_unavailable()
    if reason:
        pytest.skip(reason)
    with Redirect() as r:
        yield r


def test_transparent_mode_verified_tls_to_the_named_host_survives_a_drop(redirect, named_upstream, ca, mitm):
    fake = named_upstream
    proxy = mitm(mode="transparent", args=["--mode", "transparent",
                                           "--set", f"ssl_verify_upstream_trusted_ca={ca.path}"],
                 match=[{"host": NAME, "path": "/v1/responses"}], faults=DROP_AFTER_2)
    redirect.add(fake.port, proxy.port)
    url = f"wss://{NAME}:{fake.port}/v1/responses"
    result = run_client(url, "--connect", f"127.0.0.1:{fake.port}", "--cacert", mitm_ca(proxy),
                        group=redirect.gid, extra_groups=[])
    # mitmproxy saw the original destination as an IP; replayguard still named upstream.test (SNI, Host and the
    # host-scoped rule, without which no fault would have been injected) and verified its certificate.
    assert_chain_survived_the_drop(result, fake, proxy, NAME, fake.port)
    start = [r for r in trace_records(proxy) if r["event"] == "session.start"]
    assert [r["url"] for r in start] == [url]


def test_transparent_mode_verification_stays_on(redirect, named_upstream, mitm):
    """Without the private CA, the upstream's certificate is not trusted: no session, a 502 naming the cause."""
    fake = named_upstream
    proxy = mitm(mode="transparent", args=["--mode", "transparent"], match=[{"host": NAME}])
    redirect.add(fake.port, proxy.port)
    result = run_client(f"wss://{NAME}:{fake.port}/v1/responses", "--connect", f"127.0.0.1:{fake.port}",
                        "--cacert", mitm_ca(proxy), group=redirect.gid, extra_groups=[])
    assert result.returncode != 0
    assert "502" in result.stdout + result.stderr
    proxy.wait_log(r"upstream handshake to wss://upstream\.test:\d+/v1/responses failed: .*CERTIFICATE_VERIFY_FAILED")
    assert not any(h["status"] == 101 for h in fake.handshakes)


# -- upstream proxy ----------------------------------------------------------------------------------
def test_upstream_mode_every_handshake_goes_through_the_corporate_proxy(named_upstream, ca, mitm):
    fake = named_upstream
    target = f"{NAME}:{fake.port}"
    with ConnectProxy({target: ("127.0.0.1", fake.port)}, credentials="corp:SECRET-proxy-pw") as corp:
        proxy = mitm(mode="upstream", args=["--mode", f"upstream:http://127.0.0.1:{corp.port}",
                                            "--set", "upstream_auth=corp:SECRET-proxy-pw",
                                            "--set", f"ssl_verify_upstream_trusted_ca={ca.path}"],
                     faults=DROP_AFTER_2)
        result = run_client(f"wss://{target}/v1/responses", "--proxy", f"http://127.0.0.1:{proxy.port}",
                            "--cacert", mitm_ca(proxy))
        accepted = assert_chain_survived_the_drop(result, fake, proxy, NAME, fake.port)
        # Every upstream handshake, the replay's included, reached the upstream from one of the proxy's tunnels.
        assert all(h["peer"] in corp.outbound for h in accepted), (accepted, corp.tunnels)
        assert all(t["target"] == target and t["authorized"] and t["status"] == 200 for t in corp.tunnels), \
            corp.tunnels  # nothing else was asked of the proxy: no detour to replayguard's own bridge


# -- socks5 ------------------------------------------------------------------------------------------
def test_socks5_mode(ca, mitm):
    pytest.importorskip("python_socks", reason="the SOCKS client needs python-socks (a test dependency)")
    fake = FakeUpstream(ssl_context=ca.server_context("localhost"), expect_name="localhost").start()
    try:
        proxy = mitm(mode="socks5", args=["--mode", "socks5", "--set", f"ssl_verify_upstream_trusted_ca={ca.path}"],
                     faults=DROP_AFTER_2)
        result = run_client(f"wss://localhost:{fake.port}/v1/responses", "--proxy",
                            f"socks5h://127.0.0.1:{proxy.port}", "--cacert", mitm_ca(proxy))
        assert_chain_survived_the_drop(result, fake, proxy, "localhost", fake.port)
    finally:
        fake.stop()


# -- local capture -----------------------------------------------------------------------------------
def test_local_capture_mode(tmp_path, mitm):
    reason = local_mode_unavailable()
    if reason:
        pytest.skip(reason)
    fake = FakeUpstream().start()
    name = "rg-local-cli"  # the process local mode captures (the kernel keeps 15 characters)
    try:
        # The redirector says it is ready (its eBPF program attached, the target set) only at debug level.
        env = {**sudo_shim(tmp_path / "shim"), "RUST_LOG": "warn,mitmproxy_linux_redirector=debug"}
        proxy = mitm(mode="local", args=["--mode", f"local:{name}"], faults=DROP_AFTER_2, env=env,
                     ready=r"Updating ebpf intercept conf", verbosity="debug")
        result = run_client(f"ws://127.0.0.1:{fake.port}/v1/responses", name=name)
        assert_chain_survived_the_drop(result, fake, proxy, "127.0.0.1", fake.port)
        proxy.stop()
    finally:
        fake.stop()
    # The redirector removes its routing rule as it exits, shortly after mitmdump.
    deadline = time.monotonic() + 10
    while leftover_redirector_rules() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftover_redirector_rules() == []


# -- addons that change the destination, and intercept -------------------------------------------------
def test_map_remote_and_modify_headers_apply_to_the_session(fake, mitm, tmp_path):
    mapped = FakeUpstream().start()
    try:
        flows, har = tmp_path / "flows.mitm", tmp_path / "flows.har"
        proxy = mitm(fake, args=["--map-remote", f"|127.0.0.1:{fake.port}|127.0.0.1:{mapped.port}",
                                 "--modify-headers", "/~q/X-Added-By-User/yes", "-w", str(flows),
                                 "--set", f"hardump={har}"],
                     faults=DROP_AFTER_2)
        result = run_client(f"ws://127.0.0.1:{proxy.port}/v1/responses")
        accepted = assert_chain_survived_the_drop(result, mapped, proxy, "127.0.0.1", mapped.port)
        assert all(h["headers"]["x-added-by-user"] == "yes" for h in accepted)
        assert fake.handshakes == []  # the original upstream never saw the session
        proxy.stop()
    finally:
        mapped.stop()
    from mitmproxy import io

    with open(flows, "rb") as f:
        (flow,) = [fl for fl in io.FlowReader(f).stream() if getattr(fl, "websocket", None)]
    # The flow shows where the request went (as plain mitmproxy would after map_remote), never the bridge.
    assert (flow.request.scheme, flow.request.host, flow.request.port) == ("http", "127.0.0.1", mapped.port)
    assert not any(k.lower().startswith("x-replayguard") for k in flow.request.headers)
    (entry,) = json.loads(har.read_text())["log"]["entries"]  # a HAR export says the same
    assert entry["request"]["url"] == f"http://127.0.0.1:{mapped.port}/v1/responses"
    assert not any(h["name"].lower().startswith("x-replayguard") for h in entry["request"]["headers"])


def state_at_exit(proxy: Any) -> dict[str, int]:
    line = proxy.wait_log(r"replayguard: state at exit: (.*)").group(1)
    return {k: int(v) for k, v in (part.rsplit(" ", 1) for part in line.split(", "))}


HELD = 5.0  # seconds the user holds the intercepted flow: past every timer of the rules below


def test_intercept_held_past_every_timer_then_resumed_gets_its_session(fake, tmp_path):
    """mitmweb's intercept, held longer than any timer replayguard has (all of them 3 s or less here), then resumed:
    the session opens on resume (with what the user saw and could edit), survives a drop, and leaves nothing
    behind; a killed one neither."""
    upstream = {**BASE_RULES["upstream"], "ping_idle": 3, "connect_timeout": 3}
    rules = {**BASE_RULES, "upstream": upstream, "client": {"keepalive_interval": 1, "pong_timeout": 3},
             "limits": {"resume_ttl": 0}, "faults": DROP_AFTER_2}
    web = Mitmweb(tmp_path / "web", ["--mode", f"reverse:http://127.0.0.1:{fake.port}",
                                     "--set", "intercept=~q & ~u /v1/responses",
                                     "--set", f"replayguard_trace={tmp_path / 'trace.jsonl'}"], rules).start()
    try:
        url = f"ws://127.0.0.1:{web.port}/v1/responses"
        held = subprocess.Popen(client_command(url, "--turns", "4", "--timeout", "90"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=client_env())
        flow = web.wait_flow(lambda f: f.get("intercepted"))
        assert flow["request"]["path"] == "/v1/responses" and fake.handshakes == []  # nothing dialed while held
        time.sleep(HELD)
        web.resume(flow["id"])
        out, _ = held.communicate(timeout=60)
        assert held.returncode == 0 and out.count(" completed in ") == 4, f"{out}\n{web.log}"
        web.wait_log(r"turn 3: upstream connection dropped -> replay")
        # A second one, killed while held: the client is refused, nothing is opened upstream.
        before = len(fake.handshakes)
        killed = subprocess.Popen(client_command(url, "--turns", "1", "--timeout", "20"), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=client_env())
        flow = web.wait_flow(lambda f: f.get("intercepted"))
        web.kill(flow["id"])
        killed.communicate(timeout=30)
        assert killed.returncode != 0 and len(fake.handshakes) == before
    finally:
        web.stop()
    assert state_at_exit(web) == {"sessions": 0, "pending": 0, "matched": 0, "flows": 0, "saved_responses": 0,
                                  "retired": 0}


def test_flows_that_never_become_websockets_leave_no_state(fake, mitm, tmp_path):
    """A refused upgrade, an upgrade answered by map_local, and a client gone during the upstream handshake."""
    local = tmp_path / "local.json"
    local.write_text('{"answered": "locally"}')
    proxy = mitm(fake, args=["--map-local", f"|/v1/mapped/|{local}"], limits={"resume_ttl": 0})
    url = f"ws://127.0.0.1:{proxy.port}"
    fake.refuse_next(1, 403)
    refused = run_client(f"{url}/v1/responses", "--timeout", "5")
    assert refused.returncode != 0 and "403" in refused.stdout + refused.stderr
    mapped = run_client(f"{url}/v1/mapped/responses", "--timeout", "5")
    assert mapped.returncode != 0 and "200" in mapped.stdout + mapped.stderr
    fake.handshake_delay = 1.0
    gone = subprocess.Popen(client_command(f"{url}/v1/responses", "--timeout", "0.3"), env=client_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gone.wait(10)
    assert fake.wait_for(lambda: any(h["status"] == 101 for h in fake.handshakes), 5)  # completed after it left
    assert fake.wait_for(lambda: fake.open_connections() == 0, 5)  # ...and was closed, not left open
    proxy.stop()
    assert state_at_exit(proxy) == {"sessions": 0, "pending": 0, "matched": 0, "flows": 0, "saved_responses": 0,
                                    "retired": 0}
