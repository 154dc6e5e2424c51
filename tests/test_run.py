"""`replayguard run -- COMMAND`: real clients (the Codex CLI, the openai Python SDK, a line-driven terminal program)
through `run` to a TLS fake upstream whose certificate names a host, configured by nothing but the environment
`run` gives them; COMMAND owns the terminal (a pseudo-terminal here: input typed, output read, window size, Ctrl-C);
exit statuses pass through; bad input gets one line.

How mitmproxy reaches `upstream.test`: the tests run `run` with `--set mode=upstream:http://127.0.0.1:P` to a CONNECT
proxy of the tests' own (tests/modes.py) that resolves the name itself, as a corporate proxy does. The client side
is exactly regular mode (HTTPS_PROXY, the CA variables); mitmproxy's and replayguard's connections go to the host by
its name, SNI and certificate checked against the test CA (--set ssl_verify_upstream_trusted_ca). mitmproxy has no
option that maps a name to an address while keeping the name: map_remote rewrites the host (then SNI, Host and the
certificate check name the address), connect_addr is the local address it connects from. The terminal test runs
in plain regular mode to `localhost`, which resolves without help.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from codex import stop_daemons
from conftest import BASE_RULES, SECRET_MARK
from modes import ConnectProxy
from tls import PrivateCA

from replayguard.tools.fake_upstream import FakeUpstream

CODEX = os.environ.get("REPLAYGUARD_CODEX") or shutil.which("codex")
PROGRAMS = Path(__file__).resolve().parent / "run_programs.py"
RUN = [sys.executable, "-m", "replayguard", "run"]
NAME = "upstream.test"
KEY = "sk-run-SECRET-0123456789"
TIMEOUT = 180  # a whole run: a loaded machine starts mitmdump and Codex slowly
# Codex's provider: the private upstream, by name, over WebSocket; regular mode needs nothing else of Codex.
CODEX_CONFIG = f'''model = "demo-model"
model_provider = "named"

[model_providers.named]
name = "a private upstream"
base_url = "https://{NAME}:{{port}}/v1"
wire_api = "responses"
env_key = "DEMO_API_KEY"
supports_websockets = true
'''


@pytest.fixture(autouse=True)
def work_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` keeps its work directory (log, trace) under TMPDIR: here, the test's own."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(extra)
    return env


@pytest.fixture
def ca(tmp_path: Path) -> PrivateCA:
    return PrivateCA(tmp_path)


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    """The test timers (a silent upstream is found within 2 s); --rules passes them to run."""
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(BASE_RULES))
    return path


@pytest.fixture
def named(ca: PrivateCA) -> Iterator[FakeUpstream]:
    """A TLS fake upstream for upstream.test (its certificate names only that host; any other SNI or Host gets 421)
    that fails as upstreams do: the first request is never answered (silent: no events, no pongs), and every
    connection is cut (TCP, no close frame) after its second response."""
    fake = FakeUpstream(ssl_context=ca.server_context(NAME), expect_name=NAME)
    fake.silent_next_requests = 1
    fake.drop_after_responses = 2
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def corp(named: FakeUpstream) -> Iterator[ConnectProxy]:
    with ConnectProxy({f"{NAME}:{named.port}": ("127.0.0.1", named.port)}) as proxy:
        yield proxy


def to_named(corp: ConnectProxy, ca: PrivateCA, rules: Path, trace: Path) -> list[str]:
    """`run`'s options for the named upstream (see the module docstring)."""
    return ["--rules", str(rules), "--trace", str(trace), "--set", f"mode=upstream:http://127.0.0.1:{corp.port}",
            "--set", f"ssl_verify_upstream_trusted_ca={ca.path}"]


def summary_path(stderr: str, what: str) -> Path:
    m = re.search(rf"^  {what}: (\S+)", stderr, re.M)
    assert m, f"no {what} in the summary:\n{stderr}"
    return Path(m.group(1))


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_survived_drop_and_silence(result: subprocess.CompletedProcess[str], fake: FakeUpstream,
                                     corp: ConnectProxy, trace: Path) -> None:
    """Every turn completed; the silent first request was resent and the turn after the drop replayed, each on a
    fresh upstream connection to upstream.test through the corporate proxy; the summary says so."""
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    traced = records(trace)
    triggers = sorted(r["trigger"] for r in traced if r["event"] == "recovery")
    assert triggers == ["no event within first event timeout", "upstream connection dropped"], out
    assert not [r for r in traced if r["event"] == "fail_close"]
    ends = [r for r in traced if r["event"] == "turn.end"]
    assert ends and all(r["status"] == "completed" for r in ends), ends
    assert f"turns {len(ends)} ({len(ends)} completed)" in result.stderr
    assert "recoveries: 2 — upstream dropped: 1; upstream silent (no first event): 1" in result.stderr, result.stderr
    assert "fail-closes: 0" in result.stderr and "upstream errors passed through: 0" in result.stderr
    assert summary_path(result.stderr, "trace") == trace
    sessions = [h for h in fake.handshakes if h["path"].endswith("/responses")]
    assert len(sessions) >= 3 and all(h["status"] == 101 for h in sessions), fake.handshakes
    assert all(h["sni"] == NAME and h["headers"]["host"] == f"{NAME}:{fake.port}" for h in sessions)
    assert all(h["headers"]["authorization"] == f"Bearer {KEY}" for h in sessions)
    assert all(t["target"] == f"{NAME}:{fake.port}" for t in corp.tunnels if t.get("status") == 200)
    log = summary_path(result.stderr, "log").read_text()
    assert SECRET_MARK not in log and SECRET_MARK not in trace.read_text() and SECRET_MARK not in result.stderr


# -- real clients --------------------------------------------------------------------------------------
def test_openai_sdk_program_survives_a_silent_upstream_and_a_drop(named, corp, ca, rules, tmp_path):
    pytest.importorskip("openai", reason="openai is installed only on the mitmproxy 12 line (Python >= 3.12)")
    trace = tmp_path / "trace.jsonl"
    result = subprocess.run(
        RUN + to_named(corp, ca, rules, trace)
        + ["--", sys.executable, str(PROGRAMS), "sdk", f"https://{NAME}:{named.port}/v1", "4"],
        capture_output=True, text=True, timeout=TIMEOUT, env=clean_env(OPENAI_API_KEY=KEY), cwd=tmp_path)
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [f"turn {n}" for n in range(1, 5)], \
        result.stdout + result.stderr
    assert result.stdout.count(": completed resp_") == 4
    assert_survived_drop_and_silence(result, named, corp, trace)
    assert "sessions 1, turns 4 (4 completed)" in result.stderr


@pytest.mark.skipif(not CODEX, reason="Codex CLI not installed (.ci/run installs it with npm)")
def test_codex_exec_survives_a_silent_upstream_and_a_drop(named, corp, ca, rules, tmp_path):
    """Codex in regular mode: HTTPS_PROXY and CODEX_CA_CERTIFICATE from `run`, a provider at the named host."""
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(CODEX_CONFIG.format(port=named.port))
    work = tmp_path / "work"
    work.mkdir()
    trace = tmp_path / "trace.jsonl"
    result = subprocess.run(
        RUN + to_named(corp, ca, rules, trace)
        + ["--", CODEX, "exec", "--skip-git-repo-check", "please run TOOL ls"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT,
        env=clean_env(CODEX_HOME=str(home), DEMO_API_KEY=KEY), cwd=work)
    assert "tool said:" in result.stdout, result.stdout + result.stderr  # the answer to Codex's tool output
    assert_survived_drop_and_silence(result, named, corp, trace)
    replay = [r for r in records(trace) if r["event"] == "recovery" and r["trigger"] == "upstream connection dropped"]
    kinds = [i["type"] for i in replay[0]["input"]]
    assert kinds.index("function_call") < kinds.index("function_call_output")  # Codex's own chain, replayed


def test_summary_counts_fail_closes_and_upstream_errors(fake, tmp_path):
    """Regular mode to a local upstream (NO_PROXY has no loopback: it goes through the proxy). An upstream error the
    client gets and a fail-close (strict policy, a drop before a tool output) are counted by code; COMMAND's status
    is run's."""
    rules = tmp_path / "strict.yaml"
    rules.write_text(yaml.safe_dump({**BASE_RULES, "recovery": {"policy": "strict", "max_retries": 1},
                                     "faults": [{"kind": "drop", "after_turn": 1}]}))
    result = subprocess.run(
        RUN + ["--rules", str(rules), "--", sys.executable, str(PROGRAMS), "interactive",
               f"ws://127.0.0.1:{fake.port}/v1/responses"],
        input="orphan\nplease\nthen\nexit 0\n", capture_output=True, text=True, timeout=TIMEOUT,
        env=clean_env(OPENAI_API_KEY=KEY, NO_PROXY="example.com"), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.findall(r"turn \d: .*", result.stdout) == [
        "turn 1: error None", "turn 2: completed (1 calls)", "turn 3: connection closed 1008"]
    assert "sessions 1, turns 3 (1 completed, 1 error, 1 aborted)" in result.stderr
    assert "recoveries: 0\n" in result.stderr
    assert "fail-closes: 1 — no error event, close 1008: 1" in result.stderr
    assert ("upstream errors passed through: 1 — No tool call found for function call output with call_id "
            "call_never_made.: 1") in result.stderr
    assert len(fake.handshakes) == 1  # strict: failed closed, no second upstream connection


def test_trace_file_and_directory(fake, tmp_path):
    """An existing trace file is appended to, and the summary counts this run's records only; a directory gets a new
    file, which the summary names."""
    def one_turn(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(RUN + list(args) + ["--", sys.executable, str(PROGRAMS), "interactive",
                                                  f"ws://127.0.0.1:{fake.port}/v1/responses"],
                              input="hello\nexit 0\n", capture_output=True, text=True, timeout=TIMEOUT,
                              env=clean_env(OPENAI_API_KEY=KEY), cwd=tmp_path)

    trace = tmp_path / "trace.jsonl"
    for _ in range(2):
        result = one_turn("--trace", str(trace))
        assert result.returncode == 0 and "sessions 1, turns 1 (1 completed)" in result.stderr, result.stderr
    assert len({r["session"] for r in records(trace)}) == 2
    result = one_turn("--trace", f"{tmp_path / 'traces'}/", "--set", "termlog_verbosity=warn")
    assert result.returncode == 0 and "sessions 1, turns 1 (1 completed)" in result.stderr, result.stderr
    (written,) = (tmp_path / "traces").iterdir()
    assert summary_path(result.stderr, "trace") == written


# -- the terminal --------------------------------------------------------------------------------------
class Terminal:
    """A process on a pseudo-terminal of its own, as a shell would start it: session leader, the terminal its
    controlling terminal, its process group the foreground one."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, columns: int = 111, lines: int = 33) -> None:
        self.master, slave = pty.openpty()
        self.resize(columns, lines)
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                     start_new_session=True, preexec_fn=self._controlling_terminal)
        os.close(slave)
        self.output = ""
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    @staticmethod
    def _controlling_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every process closed the terminal
                data = b""
            for _ in range(data.count(b"\x1b[6n")):  # a full-screen program asks where the cursor is
                os.write(self.master, b"\x1b[1;1R")
            with self.changed:
                self.output += data.decode(errors="replace").replace("\r\n", "\n")
                self.changed.notify_all()
            if not data:
                return

    def expect(self, pattern: str, timeout: float = 60, since: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` in the output from offset ``since`` on, waiting for it to come."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                m = re.compile(pattern).search(self.output, since)
                if m:
                    return m
                left = deadline - time.monotonic()
                assert left > 0, f"never saw {pattern!r} on the terminal:\n{self.output}"
                self.changed.wait(left)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def resize(self, columns: int, lines: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))

    def wait(self, timeout: float = 60) -> int:
        status = self.proc.wait(timeout)
        self.expect(r"\Z")  # drained
        return status

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def localhost(ca: PrivateCA) -> Iterator[FakeUpstream]:
    fake = FakeUpstream(ssl_context=ca.server_context("localhost"), expect_name="localhost").start()
    yield fake
    fake.stop()


def banner_port(output: str) -> int:
    m = re.search(r"replayguard run: mitmdump on 127\.0\.0\.1:(\d+)", output)
    assert m, output
    return int(m.group(1))


def listens(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_interactive_session_owns_the_terminal(localhost, ca, rules, tmp_path):
    """Regular mode. Typed lines reach COMMAND, its output reaches the terminal, it sees a TTY and the window size
    and its changes; Ctrl-C reaches COMMAND, not the proxy (the next turn goes through the same session); `run`
    exits with COMMAND's status."""
    trace = tmp_path / "trace.jsonl"
    term = Terminal(RUN + ["--rules", str(rules), "--trace", str(trace),
                           "--set", f"ssl_verify_upstream_trusted_ca={ca.path}", "--",
                           sys.executable, str(PROGRAMS), "interactive",
                           f"wss://localhost:{localhost.port}/v1/responses"],
                    clean_env(OPENAI_API_KEY=KEY), tmp_path)
    try:
        term.expect(r"tty True True size 111x33")
        term.expect(r"ready>")
        term.type("hello\n")
        term.expect(r"turn 1: completed \(1 calls\)")
        term.resize(120, 40)
        term.expect(r"resized 120x40")
        term.type("\x03")  # Ctrl-C: the terminal signals its foreground process group
        term.expect(r"got SIGINT")
        port = banner_port(term.output)
        assert listens(port)
        term.type("again\n")
        term.expect(r"turn 2: completed \(0 calls\)")  # the same WebSocket session, through the same proxy
        term.type("exit 3\n")
        assert term.wait() == 3, term.output
    finally:
        term.close()
    assert re.search(r"exited with status 3\n  sessions 1, turns 2 \(2 completed\)", term.output), term.output
    assert not listens(port)  # stopped with COMMAND
    assert len(localhost.handshakes) == 1 and localhost.handshakes[0]["sni"] == "localhost"
    (end,) = [r for r in records(trace) if r["event"] == "session.end"]
    assert end["reason"] == "client closed (1000)", end  # not "the proxy shut down": it was not stopped under COMMAND


@pytest.mark.skipif(not CODEX, reason="Codex CLI not installed (.ci/run installs it with npm)")
def test_interactive_codex(named, corp, ca, rules, tmp_path):
    """The Codex TUI on a terminal through `run`: a prompt pasted and sent, its tool call answered through a silent
    upstream and a drop, Ctrl-C to quit (the TUI's own way out; a second one only if it asks for it), and the
    summary after it."""
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(CODEX_CONFIG.format(port=named.port))
    work = tmp_path / "work"
    work.mkdir()
    trace = tmp_path / "trace.jsonl"
    term = Terminal(RUN + to_named(corp, ca, rules, trace) + ["--", str(CODEX)],
                    clean_env(CODEX_HOME=str(home), DEMO_API_KEY=KEY, TERM="xterm-256color"), work, 100, 30)
    try:
        term.expect(r"Ask Codex to do anything")
        term.expect(r"state=idle")  # the TUI says its state in an escape sequence of its own
        mark = len(term.output)
        term.type("\x1b[200~please run TOOL ls\x1b[201~")  # a bracketed paste: typed at once, not sent yet
        term.expect(r"please run TOOL ls", since=mark)
        mark = len(term.output)
        term.type("\r")
        term.expect(r"tool said:", timeout=90, since=mark)
        term.expect(r"state=(idle|done)", timeout=30, since=mark)
        mark = len(term.output)
        term.type("\x03")  # idle, Codex 0.171 shuts down at once; others ask for a second one
        said = term.expect(r"(?i)again|Shutting down", timeout=30, since=mark).group(0)
        if "shutting" not in said.lower():
            term.type("\x03")  # a second one while it shuts down would kill it with SIGINT: only when asked
        assert term.wait() == 0, term.output
    finally:
        term.close()
        stop_daemons(home)  # the TUI's app-server daemon outlives it
    assert "exited with status 0" in term.output
    traced = records(trace)
    triggers = {r["trigger"] for r in traced if r["event"] == "recovery"}
    assert {"no event within first event timeout", "upstream connection dropped"} <= triggers, traced
    assert not [r for r in traced if r["event"] == "fail_close"]
    assert all(r["status"] == "completed" for r in traced if r["event"] == "turn.end")


def test_ctrl_c_that_kills_command_is_its_exit_status(tmp_path):
    term = Terminal(RUN + ["--", sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(120)"],
                    clean_env(), tmp_path)
    try:
        term.expect(r"waiting")
        port = banner_port(term.output)
        term.type("\x03")
        assert term.wait() == 128 + signal.SIGINT, term.output
    finally:
        term.close()
    assert "killed by signal 2" in term.output
    assert not listens(port)


# -- exit statuses and signals -------------------------------------------------------------------------
@pytest.mark.parametrize("script, status, said", [
    ("exit 7", 7, "exited with status 7"),
    ("kill -TERM $$", 128 + signal.SIGTERM, "killed by signal 15"),
])
def test_exit_status_passes_through(tmp_path, script, status, said):
    result = subprocess.run(RUN + ["--", "sh", "-c", script], capture_output=True, text=True, timeout=TIMEOUT,
                            env=clean_env(), cwd=tmp_path)
    assert result.returncode == status, result.stderr
    assert said in result.stderr and "sessions 0, turns 0" in result.stderr


def _signals_as_in_a_terminal() -> None:
    """Started from `nohup` or a background job, the test runner may hand its children SIGHUP or SIGINT ignored,
    which `run` rightly keeps ignored: these tests start `run` as a shell in a terminal would."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 42), (signal.SIGHUP, 42), (signal.SIGINT, 130)])
def test_signals_sent_to_run_reach_command(tmp_path, sig, status):
    """Without a terminal nothing else delivers them: `run` forwards SIGTERM, SIGHUP and SIGINT to COMMAND and
    exits with what COMMAND made of it (here: exit 42 on SIGTERM and SIGHUP; SIGINT kills it)."""
    program = ("import signal, sys, time\n"
               "for s in (signal.SIGTERM, signal.SIGHUP): signal.signal(s, lambda *a: sys.exit(42))\n"
               "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
               "print('waiting', flush=True)\n"
               "time.sleep(120)\n")
    proc = subprocess.Popen(RUN + ["--", sys.executable, "-c", program], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=tmp_path,
                            start_new_session=True, preexec_fn=_signals_as_in_a_terminal)  # no terminal
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "waiting\n"
        proc.send_signal(sig)
        assert proc.wait(60) == status
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate()[1]
    port = banner_port(stderr)
    assert not listens(port)


def test_a_hangup_ignored_for_run_stays_ignored_for_command(tmp_path):
    """Under `nohup replayguard run -- COMMAND`, COMMAND is as immune to SIGHUP as it would be under `nohup COMMAND`."""
    def nohup() -> None:
        _signals_as_in_a_terminal()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    program = "import signal; print(signal.getsignal(signal.SIGHUP) == signal.SIG_IGN)"
    result = subprocess.run(RUN + ["--", sys.executable, "-c", program], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=TIMEOUT,
                            start_new_session=True, preexec_fn=nohup)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "True\n", result.stdout


def test_a_proxy_that_dies_under_command_is_reported(tmp_path):
    """COMMAND kills the proxy (found by the port HTTPS_PROXY names); run still exits with COMMAND's status and the
    summary says the proxy died under it."""
    program = ("import os, signal, socket, urllib.parse\n"
               "from replayguard.tools.harness import listening_ports\n"
               "def ports(pid):\n"
               "    try:\n"
               "        return listening_ports(pid)\n"
               "    except OSError:  # gone meanwhile\n"
               "        return set()\n"
               "port = urllib.parse.urlsplit(os.environ['HTTPS_PROXY']).port\n"
               "(pid,) = [int(p) for p in os.listdir('/proc') if p.isdigit() and port in ports(int(p))]\n"
               "os.kill(pid, signal.SIGKILL)\n"
               "while socket.socket().connect_ex(('127.0.0.1', port)) == 0: pass\n"
               "raise SystemExit(5)\n")
    result = subprocess.run(RUN + ["--", sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=TIMEOUT, env=clean_env(), cwd=tmp_path)
    assert result.returncode == 5, result.stderr
    assert "  mitmdump killed by signal 9 (SIGKILL) while COMMAND ran: what came after went nowhere" in result.stderr
    assert "Traceback" not in result.stderr


def test_web_prints_its_url_and_keeps_the_flows(tmp_path):
    flag = tmp_path / "done"
    program = f"import os, time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.05)\n"
    proc = subprocess.Popen(RUN + ["--web", "--", sys.executable, "-c", program], stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=tmp_path)
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline()
        m = re.search(r"mitmweb on 127\.0\.0\.1:\d+, web UI (http://127\.0\.0\.1:\d+/\S*);", banner)
        assert m, banner
        with urllib.request.urlopen(m.group(1), timeout=30) as page:
            assert page.status == 200 and b"mitmproxy" in page.read().lower()
        flag.touch()
        assert proc.wait(60) == 0
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    flows = summary_path(stderr, "flows")
    assert flows.exists() and flows.name == "flows.mitm"


# -- bad input -----------------------------------------------------------------------------------------
def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_no_command(tmp_path):
    for args in ([], ["--"], ["--rules", "x.yaml", "--"]):
        result = subprocess.run(RUN + args, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 2
        assert one_line(result) == ("replayguard run: no COMMAND: give the program to run after --, "
                                    "e.g. replayguard run -- codex")


def test_command_not_found(tmp_path):
    result = subprocess.run(RUN + ["--", "no-such-command-rg"], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 127
    assert one_line(result) == "replayguard run: COMMAND not found: no-such-command-rg (not on PATH)"
    result = subprocess.run(RUN + ["--", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 127 and one_line(result).endswith(f"COMMAND not found: {tmp_path / 'nowhere'}")


@pytest.mark.parametrize("quiet", [[], ["--set", "termlog_verbosity=warn"]])
def test_bad_rules_file_is_reported_with_its_line(tmp_path, quiet):
    """Also when mitmproxy logs nothing at startup: it loads scripts in a task of their own, so it may listen before
    replayguard has read its rules; COMMAND must not start then."""
    bad = tmp_path / "rules.yaml"
    bad.write_text("upstream:\n  ping_timeout: 2\n  ping_idle: -3\n")
    flag = tmp_path / "ran"
    result = subprocess.run(RUN + quiet + ["--rules", str(bad), "--", "touch", str(flag)], capture_output=True,
                            text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert result.returncode == 2
    assert one_line(result) == (f"replayguard run: bad rules file: {bad}:3: upstream.ping_idle: expected a number "
                                f">= 0, got -3")
    assert not flag.exists()
    missing = subprocess.run(RUN + ["--rules", str(tmp_path / "none.yaml"), "--", "true"], capture_output=True,
                             text=True, timeout=60, cwd=tmp_path)
    assert missing.returncode == 2 and "bad rules file: " in one_line(missing)


def test_port_that_cannot_be_bound(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(RUN + ["--set", f"listen_port={port}", "--", "true"], capture_output=True, text=True,
                                timeout=TIMEOUT, cwd=tmp_path)
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith(f"replayguard run: mitmdump did not start: HTTP(S) proxy failed to listen on "
                           f"127.0.0.1:{port}: address already in use (log: "), line


def test_bad_set(tmp_path):
    result = subprocess.run(RUN + ["--set", "ssl_insecure", "--", "true"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert one_line(result) == ("replayguard run: --set ssl_insecure: expected OPTION=VALUE, "
                                "e.g. --set ssl_insecure=true")


# -- the pieces ----------------------------------------------------------------------------------------
def test_trust_files_keep_what_each_client_trusted(tmp_path):
    from replayguard.tools.run import default_roots, trust_files

    ca = tmp_path / "mitmproxy-ca-cert.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMITM\n-----END CERTIFICATE-----\n")
    corp = tmp_path / "corp.pem"
    corp.write_text("-----BEGIN CERTIFICATE-----\nCORP\n-----END CERTIFICATE-----\n")
    # Nothing set: replacing variables get certifi's roots and the CA; adding ones the CA alone; others untouched.
    files = trust_files(tmp_path, ca, {})
    bundle = Path(files["SSL_CERT_FILE"]).read_text()
    assert bundle.startswith(default_roots().rstrip("\n")) and bundle.endswith(ca.read_text())
    assert bundle.count("BEGIN CERTIFICATE") > 50  # the public roots: COMMAND still reaches other hosts directly
    assert {files[k] for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO")} == \
        {files["SSL_CERT_FILE"]}
    assert files["NODE_EXTRA_CA_CERTS"] == files["CODEX_CA_CERTIFICATE"] == str(ca)
    assert "PIP_CERT" not in files and "AWS_CA_BUNDLE" not in files
    # The user's own files are kept, with the CA after them.
    files = trust_files(tmp_path, ca, {"SSL_CERT_FILE": str(corp), "NODE_EXTRA_CA_CERTS": str(corp),
                                       "PIP_CERT": str(corp)})
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "PIP_CERT"):
        assert Path(files[name]).read_text() == corp.read_text() + ca.read_text(), name
    assert files["CODEX_CA_CERTIFICATE"] == str(ca)


def test_command_environment_keeps_no_proxy():
    from replayguard.tools.run import command_environment

    env = command_environment({"NO_PROXY": "internal.example", "https_proxy": "http://corp:3128", "HOME": "/h"},
                              "http://127.0.0.1:4321", {"SSL_CERT_FILE": "/b.pem"})
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "WSS_PROXY",
                 "wss_proxy", "WS_PROXY", "ws_proxy"):
        assert env[name] == "http://127.0.0.1:4321", name
    assert env["NO_PROXY"] == "internal.example" and "no_proxy" not in env
    assert env["SSL_CERT_FILE"] == "/b.pem" and env["HOME"] == "/h"


def test_startup_error_lines():
    from replayguard.tools.run import startup_error

    assert startup_error("[20:17:25.411] Loading script addon.py\n[20:17:25.539] error in script addon.py\n"
                         "Traceback (most recent call last):\n"
                         '    raise OptionsError(f"replayguard: bad rules file: {e}") from None\n'
                         "mitmproxy.exceptions.OptionsError: replayguard: bad rules file: r.yaml:2: reason\n"
                         "[20:17:25.541] HTTP(S) proxy listening at 127.0.0.1:43897.\n"
                         "Error logged during startup, exiting...\n") == "replayguard: bad rules file: r.yaml:2: reason"
    assert startup_error("[20:18:06.201] [Errno 98] HTTP(S) proxy failed to listen on 127.0.0.1:50583 with [Errno 98] "
                         "error while attempting to bind on address ('127.0.0.1', 50583): address already in use\n"
                         "Try specifying a different port by using `--mode regular@50585`.\n"
                         "Error logged during startup, exiting...\n") == \
        "HTTP(S) proxy failed to listen on 127.0.0.1:50583: address already in use"
    assert startup_error("/venv/bin/mitmdump: Received multiple values for confdir: ['a', 'b']\n") == \
        "/venv/bin/mitmdump: Received multiple values for confdir: ['a', 'b']"


def test_summarize_counts_by_trigger_and_code():
    from replayguard.tools.run import summarize

    def r(event: str, session: str = "s1", **fields: Any) -> dict[str, Any]:
        return {"event": event, "session": session, **fields}

    summary = summarize([
        r("session.start"), r("session.start", "s2"),
        r("turn.start", turn=1), r("turn.end", turn=1, status="completed"),
        r("recovery", turn=2, trigger="connection rotated before its age limit"),
        r("turn.start", turn=2), r("recovery", turn=2, trigger="upstream closed"),
        r("turn.end", turn=2, status="completed"),
        r("turn.start", turn=3),
        r("fail_close", turn=3, error={"type": "error", "error": {"code": "upstream_unavailable"}}, close_code=1011),
        r("turn.end", turn=3, status="error", error={"status": 502, "code": "upstream_unavailable"}),
        r("turn.start", "s2", turn=1),
        r("turn.end", "s2", turn=1, status="error", error={"status": 500, "code": "server_error"}),
        r("turn.start", "s2", turn=2),  # still in flight when COMMAND exited
    ])
    assert (summary.sessions, summary.turns, summary.rotations) == (2, 5, 1)
    assert dict(summary.recoveries) == {"upstream closed": 1}
    assert dict(summary.fail_closes) == {"upstream_unavailable": 1}
    assert dict(summary.upstream_errors) == {"server_error": 1}  # the fail-closed turn's error is replayguard's
    assert dict(summary.statuses) == {"completed": 2, "error": 2}
