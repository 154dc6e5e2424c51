"""A real mitmweb running addon.py, and the REST API its own UI uses (the flow list, messages rendered by a
contentview, flow dumps, commands, resume and kill), for tests of what a person sees in mitmweb."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

from replayguard.tools.harness import Mitmdump, listening_ports


class Mitmweb(Mitmdump):
    TOOL = "mitmweb"
    XSRF = "replayguard-test-xsrf"  # tornado's double-submit check: any value, the same in cookie and header

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token: str | None = None
        self.web_port = 0

    def command(self) -> list[str]:
        return super().command() + ["--set", "web_open_browser=false", "--set", "web_host=127.0.0.1",
                                    "--set", "web_port=0"]

    def start(self, timeout: float = 30) -> "Mitmweb":
        super().start(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"Web server listening at \S+", self.log)
            if m:
                token = re.search(r"[?&]token=([0-9a-f]+)", m.group(0))
                self.token = token.group(1) if token else None  # mitmproxy 12 asks for one; 11 does not
                assert self.proc is not None
                ports = listening_ports(self.proc.pid) - {self.port}
                if len(ports) == 1:
                    self.web_port = ports.pop()
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"mitmweb's web server did not start:\n{self.log}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def ui_url(self) -> str:
        return f"{self.base}/" + (f"?token={self.token}" if self.token else "")

    def call(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        headers = {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if method != "GET":
            headers["X-XSRFToken"] = self.XSRF
            headers["Cookie"] = f"_xsrf={self.XSRF}; _mitmproxy_xsrf={self.XSRF}"  # 11 and 12 name it differently
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path}: HTTP {e.code}: {e.read()[:500]!r}") from None
        if raw:
            return payload
        return json.loads(payload) if payload else None

    def flows(self) -> list[dict[str, Any]]:
        return self.call("GET", "/flows")

    def wait_flow(self, predicate: Any, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for flow in self.flows():
                if predicate(flow):
                    return flow
            time.sleep(0.1)
        raise AssertionError(f"no flow matched within {timeout}s: {self.flows()}")

    def resume(self, flow_id: str) -> None:
        self.call("POST", f"/flows/{flow_id}/resume")

    def kill(self, flow_id: str) -> None:
        self.call("POST", f"/flows/{flow_id}/kill")

    def messages(self, flow_id: str, view: str = "auto") -> list[dict[str, Any]]:
        return self.call("GET", f"/flows/{flow_id}/messages/content/{view}.json")

    def command_(self, name: str, *arguments: str) -> Any:
        return self.call("POST", f"/commands/{name}", {"arguments": list(arguments)})

    def dump(self) -> bytes:
        return self.call("GET", "/flows/dump", raw=True)
