"""Shared fixtures: the fake upstream, a real mitmdump started as users start it, and a WebSocket client."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tls.py
sys.path.insert(1, str(ROOT))

from replayguard.tools.fake_upstream import FakeUpstream  # noqa: E402
from replayguard.tools.harness import Mitmdump, mitmdump_command  # noqa: E402
from forkserver import ForkServer  # noqa: E402

SECRET_MARK = "SECRET"  # every credential the tests send contains it

TERMINAL = {"response.completed", "response.failed", "response.incomplete", "error"}

# Test rules: the shipped defaults with timers short enough for tests.
BASE_RULES: dict[str, Any] = {
    "match": [{"path": "*/responses"}],
    "upstream": {
        "ping_idle": 20,
        "ping_timeout": 1,
        "keepalive_interval": 0,
        "first_event_timeout": 2,
        "rotation_age": 3300,
        "connect_timeout": 3,
    },
    "recovery": {"policy": "pair-aware", "max_retries": 1},
}


class Client:
    """A Responses WebSocket client (the `websockets` sync client) that records everything it receives."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, proxy: str | None = None, **kw: Any) -> None:
        # Entered by hand: the connection lives across calls (websockets 17 wants connect() as a context manager).
        self.ws: ClientConnection = connect(
            url, additional_headers=headers or {}, proxy=proxy, max_size=None, open_timeout=10, **kw
        ).__enter__()
        self.received: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any] | str) -> None:
        self.ws.send(message if isinstance(message, str) else json.dumps(message))

    def recv(self, timeout: float = 10) -> dict[str, Any]:
        event = json.loads(self.ws.recv(timeout=timeout))
        self.received.append(event)
        return event

    def turn(self, request: dict[str, Any], timeout: float = 10) -> list[dict[str, Any]]:
        """Send a response.create and read events until the terminal one."""
        self.send({"type": "response.create", **request})
        events = []
        deadline = time.monotonic() + timeout
        while True:
            event = self.recv(max(0.01, deadline - time.monotonic()))
            events.append(event)
            if event.get("type") in TERMINAL:
                return events

    def until_closed(self, timeout: float = 10) -> tuple[list[dict[str, Any]], int | None, str | None]:
        """Read until the server closes; returns (events, close code, close reason)."""
        events = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                events.append(self.recv(max(0.01, deadline - time.monotonic())))
        except ConnectionClosed:
            pass
        rcvd = self.ws.protocol.close_rcvd
        return events, (rcvd.code if rcvd else None), (rcvd.reason if rcvd else None)

    def close(self) -> None:
        self.ws.close()


def completed(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The response of a turn that must have completed."""
    last = events[-1]
    assert last["type"] == "response.completed", f"turn did not complete: {last}"
    return last["response"]


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text}


def tool_chain(client: Client, turns: int, pause: float = 0.0) -> list[dict[str, Any]]:
    """Alternating tool call / tool output turns, chained with previous_response_id; returns the responses."""
    responses: list[dict[str, Any]] = []
    previous, pending = None, None
    for n in range(turns):
        if pending is not None:
            new = [{"type": "function_call_output", "call_id": pending["call_id"], "output": f"out {n}"}]
        else:
            new = [user(f"turn {n}: please run TOOL ls")]
        request: dict[str, Any] = {"model": "m", "store": False, "input": new}
        if previous:
            request["previous_response_id"] = previous
        response = completed(client.turn(request))
        responses.append(response)
        previous = response["id"]
        calls = [i for i in response["output"] if i["type"] == "function_call"]
        pending = calls[0] if calls else None
        time.sleep(pause)
    return responses


# Under CI=true (.ci/run), a skipped test is a failure: .ci/run installs every tool the tests need (iptables,
# util-linux, iproute2, chromium, curl, the Codex CLI, the test extras), so a skip there means an install failed.
# Only skips by design of the Python line being tested stay skips.
LINE_SKIPS = ("only on the mitmproxy 12 line", "needs mitmproxy >= 11.1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") == "true" and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(line in reason for line in LINE_SKIPS):
            report.outcome = "failed"
            report.longrepr = (f"CI=true: skipped ({reason}), but .ci/run installs what this test needs: "
                               "its install failed or the tool is missing")


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream().start()
    try:
        yield upstream
    finally:
        upstream.stop()


_FORK_SERVER: list[ForkServer] = []


class ForkedMitmdump(Mitmdump):
    """A mitmdump forked from the fork server (tests/forkserver.py) where that changes nothing the test sees: the
    installed mitmdump otherwise (an environment of the test's own, open-files limits)."""

    def _launch(self, env: dict[str, str]) -> Any:
        if self.extra_env or self.nofile or os.environ.get("REPLAYGUARD_NO_FORK"):
            return super()._launch(env)
        if not _FORK_SERVER:
            _FORK_SERVER.append(ForkServer())
        args = self.command()[len(mitmdump_command(self.TOOL)):]
        return _FORK_SERVER[0].spawn(["mitmdump", *args], str(self.tmp), env)


def pytest_sessionfinish(session: pytest.Session) -> None:
    for server in _FORK_SERVER:
        server.close()


@pytest.fixture
def mitm(tmp_path: Path) -> Iterator[Callable[..., Mitmdump]]:
    """Factory: mitm(fake, mode="reverse"|"regular", **section_overrides) -> a started Mitmdump."""
    started: list[Mitmdump] = []

    def start(fake: FakeUpstream | None = None, mode: str = "reverse", rules: dict[str, Any] | None = None,
              args: list[str] | None = None, env: dict[str, str] | None = None, ready: str | None = None,
              verbosity: str = "info", nofile: tuple[int, int] | None = None, **sections: Any) -> Mitmdump:
        merged = json.loads(json.dumps(BASE_RULES)) if rules is None else rules
        for name, values in sections.items():
            if isinstance(values, list):
                merged[name] = values
            else:
                merged.setdefault(name, {}).update(values)
        extra = list(args or [])
        if mode == "reverse":
            assert fake is not None
            extra += ["--mode", f"reverse:http://127.0.0.1:{fake.port}"]
        work = tmp_path / f"mitm{len(started)}"
        work.mkdir()
        if not any("replayguard_trace=" in a for a in extra):
            extra += ["--set", f"replayguard_trace={work / 'trace.jsonl'}"]  # every scenario is traced
        proc = ForkedMitmdump(work, extra, merged, env=env, ready=ready, verbosity=verbosity, nofile=nofile)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()
    # Secrets: every test credential contains SECRET; none may reach a log line or a trace record.
    for proc in started:
        assert SECRET_MARK not in proc.log, f"a secret reached the mitmdump log:\n{proc.log}"
    for trace in tmp_path.rglob("*.jsonl"):
        text = trace.read_text(errors="replace")
        assert SECRET_MARK not in text, f"a secret reached the trace {trace}"
