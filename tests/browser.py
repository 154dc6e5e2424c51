"""Headless Chromium (the OS package) driven over the DevTools protocol with `websockets`: enough to load mitmweb,
wait until its page shows something, read the page's text and take a screenshot. No browser download, no npm."""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from websockets.sync.client import connect

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--no-default-browser-check", "--hide-scrollbars",
         "--remote-debugging-port=0", "--remote-allow-origins=*"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    def __init__(self, browser: "Browser", session: str) -> None:
        self.browser, self.session = browser, session

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        return self.browser.send(method, session=self.session, **params)

    def eval(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def text(self, selector: str = "body") -> str:
        return self.eval(f"(document.querySelector({json.dumps(selector)})?.innerText || '')")

    @staticmethod
    def _until(check: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.1)
        return False

    def wait_for_text(self, text: str, selector: str = "body", timeout: float = 20) -> None:
        if not self._until(lambda: text in self.text(selector), timeout):
            raise AssertionError(f"{text!r} never showed in {selector}: {self.text(selector)[:2000]!r}")

    def wait_loaded(self, timeout: float = 20) -> None:
        """Until the document has been parsed whole: a big static page shows its first lines long before its last."""
        if not self._until(lambda: self.eval("document.readyState") == "complete", timeout):
            raise AssertionError(f"the page did not finish loading within {timeout:g} s")

    def click(self, selector: str) -> bool:
        return bool(self.eval(f"(e => (e && e.click(), !!e))(document.querySelector({json.dumps(selector)}))"))

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))


class Browser:
    """One headless Chromium with an empty profile of its own, removed on close."""

    def __init__(self, width: int = 1400, height: int = 800) -> None:
        exe = chromium()
        if exe is None:
            raise RuntimeError("chromium is not installed")
        self.size = (width, height)
        self.profile = tempfile.mkdtemp(prefix="replayguard-chromium-")
        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        url = None
        deadline = time.monotonic() + 30
        for line in self.proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/<id>"
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                url = m.group(1)
                break
            if time.monotonic() > deadline:
                break
        if url is None:
            self.close()
            raise RuntimeError("chromium did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr or ()], daemon=True).start()
        self.ws = connect(url, max_size=None, open_timeout=10, proxy=None)
        self.ids = itertools.count(1)

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        number = next(self.ids)
        message: dict[str, Any] = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:  # events are skipped: the page's state is polled instead
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == number:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> Page:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        page = Page(self, self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"])
        width, height = self.size
        page.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        page.send("Page.navigate", url=url)
        return page

    def close(self) -> None:
        try:
            if hasattr(self, "ws"):
                self.send("Browser.close")
                self.ws.close()
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
