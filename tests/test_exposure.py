"""replayguard warns once at startup when mitmproxy listens beyond loopback (mitmproxy's default is every
interface), and not when it listens on loopback only. The warning case runs mitmdump in a network namespace of its
own, so that "every interface" is that namespace's lone loopback device and nothing is reachable from outside."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

from conftest import Client, completed, user

from replayguard.proxy.exposure import exposed, is_loopback
from replayguard.tools.harness import ROOT, mitmdump_command

WARNING = "replayguard: mitmproxy listens beyond this machine"


def options(**kw):
    base = {"mode": ["regular"], "listen_host": "", "listen_port": None, "server": True}
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LocalHost", True), ("", False), ("0.0.0.0", False), ("::", False), ("192.0.2.7", False),
    ("proxy.example", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_which_listeners_are_exposed():
    assert exposed(options()) == ["*:8080 (regular)"]
    assert exposed(options(listen_host="127.0.0.1")) == []
    assert exposed(options(listen_host="0.0.0.0", listen_port=8000, mode=["reverse:https://api.openai.com"])) == [
        "0.0.0.0:8000 (reverse:https://api.openai.com)"]
    # a mode's own listen address wins over listen_host
    assert exposed(options(listen_host="127.0.0.1", mode=["regular", "socks5@0.0.0.0:1080"])) == [
        "0.0.0.0:1080 (socks5@0.0.0.0:1080)"]
    assert exposed(options(listen_host="0.0.0.0", mode=["regular@127.0.0.1:8080"])) == []
    assert exposed(options(mode=["local:codex"])) == []  # local capture binds no address
    assert exposed(options(server=False)) == []  # no proxy server at all
    # mitmweb's UI reads every flow (keys included) and sets options
    assert exposed(options(listen_host="127.0.0.1", web_host="0.0.0.0", web_port=8081)) == [
        "0.0.0.0:8081 (mitmweb's web UI)"]
    assert exposed(options(listen_host="127.0.0.1", web_host="127.0.0.1", web_port=8081)) == []


def test_no_warning_on_loopback(fake, mitm):
    proxy = mitm(fake)  # the harness listens on 127.0.0.1, as the README's commands do
    completed(Client(proxy.url + "/v1/responses").turn({"model": "m", "store": False, "input": [user("hi")]}))
    proxy.stop()
    assert WARNING not in proxy.log


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a network namespace needs root"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) not found"
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        return "unshare --net is not permitted here"
    return None


def test_one_warning_when_listening_on_every_interface(tmp_path):
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    # mitmproxy's default listen host (every interface), in a network namespace of its own
    command = ["unshare", "--net", *mitmdump_command(), "--listen-port", "0", "--set", f"confdir={tmp_path / 'conf'}",
               "-s", str(ROOT / "addon.py")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while not any(WARNING in line for line in lines) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        text = "".join(lines)
        assert re.search(rf"{WARNING} on \*:0 \(regular\): anyone who reaches it can use the API keys that pass "
                         r"through; --listen-host 127\.0\.0\.1 keeps it local", text), text
        assert re.search(r"listening at \*:\d+", text), text
    finally:
        proc.terminate()
        proc.wait(10)
    assert "".join(lines).count(WARNING) == 1
