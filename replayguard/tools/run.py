"""`replayguard run -- COMMAND`: one command puts an agent behind replayguard.

It starts mitmdump (or mitmweb) with addon.py in regular mode on a free 127.0.0.1 port, with a confdir of its own so
the CA is fresh, waits until the proxy listens, then runs COMMAND in the foreground of the terminal with an
environment that sends its HTTP(S) and WebSocket traffic through the proxy and trusts the proxy's CA. When COMMAND
exits the proxy is stopped, a summary is printed from the run's chain trace, and `run` exits with COMMAND's status.

The proxy runs in a session of its own with stdin from /dev/null and its output in a log file: Ctrl-C, Ctrl-\\ and
window changes reach COMMAND (the terminal's foreground process group) and never the proxy.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

from ..core.records import read_records
from ..core.recovery import Trigger
from .harness import ROOT, listening_ports, mitmdump_command

PROG = "replayguard run"
START_TIMEOUT = 60.0  # seconds for mitmproxy to listen (a cold start on a loaded machine takes a few)
STOP_TIMEOUT = 10.0  # replayguard closes every session within 3 s of SIGTERM; then mitmproxy exits
CA_FILE = "mitmproxy-ca-cert.pem"  # mitmproxy writes its CA certificate here in its confdir at startup

# Options `run` sets itself; a user's --set of one of them replaces run's value instead of clashing with it
# (mitmproxy refuses two values for one option).
MANAGED = ("listen_host", "listen_port", "confdir", "replayguard_trace", "replayguard_rules", "save_stream_file",
           "web_host", "web_port", "web_open_browser")
# The proxy variables COMMAND gets. HTTPS_PROXY/HTTP_PROXY/ALL_PROXY are what curl, Python (urllib, requests,
# httpx), Rust (reqwest, Codex), Go and Node (with NODE_USE_ENV_PROXY) read; WSS_PROXY/WS_PROXY come first for the
# `websockets` library (the openai Python SDK's WebSocket), so a user's own value there must not win over ours.
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "WSS_PROXY", "WS_PROXY")
# CA variables whose file replaces the client's whole trust store: they get a bundle of the roots the client
# trusted before (the user's file, else certifi's) plus mitmproxy's CA, so hosts COMMAND reaches directly
# (NO_PROXY) still verify.
REPLACING_CA = (
    "SSL_CERT_FILE",  # OpenSSL: Python's ssl (websockets, httpx, the openai SDK), Ruby, Go, Rust's openssl/native-tls
    "REQUESTS_CA_BUNDLE",  # requests
    "CURL_CA_BUNDLE",  # curl, requests
    "GIT_SSL_CAINFO",  # git over HTTPS (it honours https_proxy): tools an agent runs inherit the environment
)
# CA variables whose certificates are added to the client's own roots: the user's file, if any, plus mitmproxy's CA.
ADDING_CA = (
    "NODE_EXTRA_CA_CERTS",  # Node (the openai Node SDK, npm)
    "CODEX_CA_CERTIFICATE",  # Codex CLI, for HTTPS and its WebSocket (it wins over SSL_CERT_FILE there)
)
# Trust-store variables of other tools an agent may run: rewritten (the user's file plus mitmproxy's CA) only where
# the user set them, since setting one where it was not set would replace that tool's own default store.
IF_SET_CA = ("PIP_CERT", "AWS_CA_BUNDLE", "HTTPLIB2_CA_CERTS", "NIX_SSL_CERT_FILE", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
             "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE", "DENO_CERT", "NPM_CONFIG_CAFILE", "npm_config_cafile")


class RunError(Exception):
    """Bad input or a proxy that cannot start: one line for the user, and the exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


class Interrupted(Exception):
    """A signal arrived before COMMAND was running: stop, clean up, exit as if killed by it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class Options:
    command: list[str]
    rules: str | None = None  # --rules FILE
    trace: str | None = None  # --trace FILE or DIR/
    web: bool = False  # mitmweb instead of mitmdump
    sets: list[str] = field(default_factory=list)  # --set OPTION=VALUE, passed to mitmproxy
    flows: str | None = None  # -w FILE: save the flows
    log: str | None = None  # mitmproxy's output: a file (default: in the work directory), or "-" for the terminal


# -- arguments -----------------------------------------------------------------------------------------
def split_sets(sets: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """The user's --set values: those of options run manages (last one wins), and the rest, passed as given."""
    managed: dict[str, str] = {}
    passed: list[str] = []
    for spec in sets:
        name, eq, value = spec.partition("=")
        if not eq or not name:
            raise RunError(f"--set {spec}: expected OPTION=VALUE, e.g. --set ssl_insecure=true")
        if name in MANAGED:
            managed[name] = value
        else:
            passed.append(spec)
    return managed, passed


def find_command(command: list[str], path: str | None) -> str:
    """COMMAND's executable, as the shell would find it (exit 127 when missing, 126 when not executable)."""
    if not command or not command[0]:
        raise RunError("no COMMAND: give the program to run after --, e.g. replayguard run -- codex")
    name = command[0]
    if os.sep in name:
        if not os.path.exists(name):
            raise RunError(f"COMMAND not found: {name}", 127)
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            raise RunError(f"COMMAND is not executable: {name}", 126)
        return name
    found = shutil.which(name, path=path)
    if found is None:
        raise RunError(f"COMMAND not found: {name} (not on PATH)", 127)
    return found


# -- the proxy -----------------------------------------------------------------------------------------
def _parent_death_signal() -> None:
    """In the proxy's child process: get SIGTERM when `run` dies, even by SIGKILL (Linux), so no proxy is orphaned."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def describe_status(status: int) -> str:
    """A Popen return code in words: "exited with status N" or "killed by signal N (NAME)"."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = "?"
        return f"killed by signal {-status} ({name})"
    return f"exited with status {status}"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _stamp_free(line: str) -> str:
    return re.sub(r"^\[\d\d:\d\d:\d\d\.\d+\]\s*", "", line).strip()


def startup_error(text: str) -> str:
    """The line of mitmproxy's output that says why it did not start: replayguard's own error (a bad rules file:
    ``file:line: reason``), a port it could not bind, or the exception that stopped it."""
    lines = [_stamp_free(line) for line in text.splitlines() if line.strip()]
    mistakes = [line for line in lines if line.startswith("replayguard: bad rules file: ")]
    if mistakes:  # replayguard lists every mistake of a rules file, one line each, then says it does not start
        return "replayguard: bad rules file: " + "; ".join(m.removeprefix("replayguard: bad rules file: ")
                                                          for m in mistakes)
    raised = [m.group(1) for m in (re.match(r"^[\w.]*(?:Error|Exception): (.+)$", line) for line in lines) if m]
    for reason in raised:
        if reason.startswith("replayguard:"):
            return reason
    for line in lines:
        m = re.search(r"(\S[^\]]* failed to listen on \S+) with .*?([A-Za-z][A-Za-z ]+)$", line)
        if m:
            return f"{m.group(1).lstrip('] ')}: {m.group(2).lower()}"  # ... address already in use
    if raised:
        return raised[-1]
    rest = [line for line in lines if not line.startswith(("Error logged during startup", "Errors logged", "Try "))]
    return rest[-1] if rest else "no output"


class Proxy:
    """mitmdump or mitmweb with addon.py, in regular mode on 127.0.0.1, started in a session of its own."""

    def __init__(self, work: Path, options: Options, managed: dict[str, str], passed: list[str]) -> None:
        self.work = work
        self.tool = "mitmweb" if options.web else "mitmdump"
        self.host = managed.get("listen_host") or "127.0.0.1"
        self.requested_port = int(managed.get("listen_port") or 0)
        self.own_confdir = "confdir" not in managed
        self.confdir = Path(managed["confdir"]).expanduser() if "confdir" in managed else work / "mitmproxy"
        self.trace_option = managed.get("replayguard_trace", options.trace)
        if self.trace_option is None:
            self.trace_option = str(work / "trace.jsonl")  # the summary needs one
        self.rules = managed.get("replayguard_rules", options.rules)
        self.flows = managed.get("save_stream_file", options.flows)
        if self.flows is None and options.web:
            self.flows = str(work / "flows.mitm")  # mitmweb's flows outlive it: open them again with mitmweb -r
        self.to_terminal = options.log == "-"
        self.log_path = None if self.to_terminal else Path(options.log or work / "mitmproxy.log").expanduser()
        self.managed = managed
        self.passed = passed
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.web_port = managed.get("web_port") or ("0" if Path("/proc/net/tcp").exists()  # found in /proc
                                                     else str(_free_port("127.0.0.1")))
        self.web_url: str | None = None
        self.log_start = 0  # the log file's size before the run (an existing file is appended to)
        self._seen: list[bytes] = []  # mitmproxy's output, when it goes to the terminal
        self.stopping = False
        self._lock = threading.Lock()  # stopping and died: the watcher thread and stop() agree on who saw the end
        self.trace_start = 0  # the trace file's size before the run: an existing file's older records are not ours
        self.trace_existed = False
        self.died: int | None = None  # the proxy's exit status when it died while COMMAND ran

    @property
    def ca(self) -> Path:
        return self.confdir / CA_FILE

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        addon = ROOT / "addon.py"
        if not addon.exists():
            raise RunError(f"cannot find addon.py at {addon}: install replayguard from a checkout "
                           f"(pip install -e .)", 1)
        sets = [f"confdir={self.confdir}", f"replayguard_trace={self.trace_option}"]
        if self.rules is not None:
            sets.append(f"replayguard_rules={Path(self.rules).expanduser().resolve()}")
        if self.flows is not None:
            sets.append(f"save_stream_file={self.flows}")
        if self.tool == "mitmweb":
            sets += [f"web_host={self.managed.get('web_host', '127.0.0.1')}", f"web_port={self.web_port}",
                     f"web_open_browser={self.managed.get('web_open_browser', 'false')}"]
        cmd = mitmdump_command(self.tool) + ["--listen-host", self.host, "--listen-port", str(self.requested_port),
                                             "-s", str(addon)]
        for spec in sets + self.passed:
            cmd += ["--set", spec]
        return cmd

    def start(self) -> None:
        if self.own_confdir:
            self.confdir.mkdir(mode=0o700)
        trace = self.trace_path()
        if trace is not None:
            self.trace_start = trace.stat().st_size
            self.trace_existed = True
        # mitmproxy's own connections go direct (or by --set mode=upstream:...): a proxy variable in its
        # environment would only loop tools it runs back into itself.
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        # Unbuffered: what it logs is in the file before it listens, so a startup error is never missed.
        env["PYTHONUNBUFFERED"] = "1"
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out: Any = open(self.log_path, "ab")
            self.log_start = out.tell()
        else:
            out = subprocess.PIPE  # copied to the terminal by a thread of ours, which also reads why it stopped
        try:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                cwd=self.work, start_new_session=True,
                preexec_fn=_parent_death_signal if sys.platform.startswith("linux") else None)
        finally:
            if out is not subprocess.PIPE:
                out.close()
        if self.log_path is None:
            threading.Thread(target=self._copy_output, daemon=True, name="proxy-output").start()

    def _copy_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self._seen.append(line)
            try:
                sys.stderr.buffer.write(line.replace(b"\n", b"\r\n") if sys.stderr.isatty() else line)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def output(self) -> str:
        """mitmproxy's output in this run."""
        if self.log_path is None:
            return b"".join(self._seen).decode("utf-8", errors="replace")
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_start)
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _quiet(self) -> bool:
        """Its output will not say where it listens: a verbosity below info."""
        verbosity = [s.partition("=")[2] for s in self.passed if s.startswith("termlog_verbosity=")]
        return bool(verbosity and verbosity[-1] in ("warn", "error"))

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until the proxy listens and its CA file exists; a RunError with mitmproxy's reason when it exits."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        listening = re.compile(r"(?<!Web server )listening at (?:\[[^\]]*\]|[^\s:]+):(\d+)")
        where = f" (log: {self.log_path})" if self.log_path is not None else ""
        while time.monotonic() < deadline:
            text = self.output()
            if self.proc.poll() is not None:
                time.sleep(0.1)  # the last lines reach the file
                text = self.output()
                reason = startup_error(text) if text.strip() else f"exited with status {self.proc.returncode}"
                if reason.startswith("replayguard: "):
                    raise RunError(reason.removeprefix("replayguard: "))  # a bad rules file: file:line: reason
                raise RunError(f"{self.tool} did not start: {reason}{where}")
            if "error in script" in text or "Error logged during startup" in text:
                time.sleep(0.05)
                continue  # it is about to exit: its reason is reported then
            if not self.port:
                m = listening.search(text)
                if m:
                    self.port = int(m.group(1))
                elif self._quiet() and Path("/proc/net/tcp").exists():
                    ports = listening_ports(self.proc.pid) - {int(self.web_port)}
                    if ports and (self.tool == "mitmdump" or self.web_port != "0"):
                        self.port = min(ports)
            if self.port and self.ca.exists() and self._loaded(text) and (self.tool == "mitmdump"
                                                                            or self._web_ready(text)):
                return
            time.sleep(0.05)
        raise RunError(f"{self.tool} did not start within {timeout:.0f} s{where}")

    def _loaded(self, text: str) -> bool:
        """replayguard has loaded its rules and opened the trace. mitmproxy loads scripts in a task of their own, so
        the proxy may listen before that: a client let in then would pass replayguard by."""
        if "replayguard: rules from" in text:
            return True
        if not self.trace_existed and self.trace_path() is not None:
            return True  # the addon opens the trace right after loading its rules
        # Nothing says it (a verbosity below info, with an existing trace or none): listening has to do.
        return self._quiet() and (self.trace_existed or not self.trace_option)

    def _web_ready(self, text: str) -> bool:
        if self._quiet():
            return True  # no URL to print: mitmweb's own output does not say it either
        m = re.search(r"Web server listening at (\S+)", text)
        if not m:
            return False
        url = m.group(1)
        if self.web_port == "0":
            assert self.proc is not None
            ports = listening_ports(self.proc.pid) - {self.port}
            if len(ports) != 1:
                return False
            url = re.sub(r":0/", f":{ports.pop()}/", url, count=1)
        self.web_url = url
        return True

    def watch(self) -> None:
        """Say at once (on stderr) if the proxy dies while COMMAND runs: COMMAND's connections fail from then on."""
        def wait() -> None:
            assert self.proc is not None
            status = self.proc.wait()
            with self._lock:
                if self.stopping:
                    return
                self.died = status
            end = "\r\n" if sys.stderr.isatty() else "\n"  # a full-screen COMMAND may have the terminal raw
            sys.stderr.write(f"{end}{PROG}: {self.tool} {describe_status(status)} while COMMAND ran; "
                             f"see {self.log_path or 'its output above'}{end}")
            sys.stderr.flush()

        threading.Thread(target=wait, daemon=True, name="proxy-watch").start()

    def stop(self) -> None:
        """SIGTERM (replayguard closes its sessions within a few seconds), then SIGKILL if it does not exit."""
        with self._lock:
            if self.stopping:
                return
            self.stopping = True
            if self.proc is None:
                return
            if self.proc.poll() is not None:
                self.died = self.proc.returncode  # before we asked it to stop: it died under COMMAND
                return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def trace_path(self) -> Path | None:
        """The trace file this run wrote (a directory gets a new file named with the proxy's pid)."""
        if not self.trace_option:
            return None
        p = Path(self.trace_option).expanduser()
        if p.is_dir() or self.trace_option.endswith(("/", os.sep)):
            if self.proc is None:
                return None
            found = sorted(p.glob(f"replayguard-*-{self.proc.pid}.jsonl"))
            return found[-1] if found else None
        return p if p.exists() else None


# -- COMMAND's environment -----------------------------------------------------------------------------
def default_roots() -> str:
    """The public roots a client trusts when nothing is set: certifi's bundle (mitmproxy depends on it), else
    OpenSSL's default file."""
    try:
        import certifi

        return _read(certifi.where())
    except ImportError:
        import ssl

        return _read(ssl.get_default_verify_paths().openssl_cafile)


def _read(path: str | None) -> str:
    if not path:
        return ""
    try:
        return Path(path).expanduser().read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def trust_files(directory: Path, ca: Path, env: dict[str, str]) -> dict[str, str]:
    """Each CA variable's file: what the client trusted before (see REPLACING_CA, ADDING_CA) and mitmproxy's CA.
    Variables that end up with the same certificates share one file."""
    mitm = ca.read_text(encoding="ascii")
    roots: str | None = None
    files: dict[str, str] = {}
    written: dict[str, str] = {}  # content -> path
    for name in REPLACING_CA + ADDING_CA + IF_SET_CA:
        before = _read(env.get(name))
        if name in IF_SET_CA and not before.strip():
            continue
        if name in REPLACING_CA and not before.strip():
            if roots is None:
                roots = _read(env.get("SSL_CERT_FILE")) or default_roots()
            before = roots
        content = (before.rstrip("\n") + "\n" + mitm) if before.strip() else mitm
        if content not in written:
            if content == mitm:
                path = ca if ca.parent == directory else directory / CA_FILE
            else:
                path = directory / (f"ca-bundle-{len(written)}.pem" if written else "ca-bundle.pem")
            if path != ca:
                path.write_text(content, encoding="utf-8")
            written[content] = str(path)
        files[name] = written[content]
    return files


def command_environment(base: dict[str, str], proxy_url: str, trust: dict[str, str]) -> dict[str, str]:
    """COMMAND's environment: every request through the proxy, the proxy's CA trusted.

    NO_PROXY/no_proxy stay as the user set them, and loopback is not added: COMMAND reaches the proxy by its
    address whatever NO_PROXY says, a local server is still reached through the proxy (it runs on the same
    host), and a Responses upstream on loopback (a local gateway, the fake upstream) must go through it to be
    guarded at all.
    """
    env = dict(base)
    for name in PROXY_VARIABLES:
        env[name] = proxy_url
        env[name.lower()] = proxy_url
    env["NODE_USE_ENV_PROXY"] = "1"  # Node >= 22.21/24.5: fetch and the http(s) agents follow HTTPS_PROXY
    env.update(trust)
    return env


# -- COMMAND in the foreground -------------------------------------------------------------------------
class Foreground:
    """Runs COMMAND as a shell runs a foreground job: in `run`'s own process group, on the same terminal.

    Signals the terminal generates (Ctrl-C, Ctrl-\\, window changes, hangup) go to the whole foreground process
    group, so COMMAND gets them itself; `run` only ignores SIGINT and SIGQUIT while COMMAND runs (as a shell
    does) and forwards SIGTERM and SIGHUP sent to `run` alone. SIGINT and SIGQUIT are forwarded only when `run`
    is not the terminal's foreground group (no terminal, or started in the background), where nothing else
    would deliver them.
    """

    SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.killed_by: int | None = None  # the signal that killed COMMAND
        self._previous: dict[int, Any] = {}
        self._tty: int | None = None

    def __enter__(self) -> "Foreground":
        try:
            self._tty = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
        except OSError:
            self._tty = None
        for sig in self.SIGNALS:
            # A signal the user's shell ignores for us (nohup, a background job) stays ignored, for COMMAND too.
            # A Python handler (not SIG_IGN) is reset to the default in COMMAND when it starts.
            if signal.getsignal(sig) != signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        if self._tty is not None:
            os.close(self._tty)

    def _in_foreground(self) -> bool:
        if self._tty is None:
            return False
        try:
            return os.tcgetpgrp(self._tty) == os.getpgrp()
        except OSError:
            return False

    def _handle(self, signum: int, frame: Any) -> None:
        child = self.child
        if child is None:
            raise Interrupted(signum)  # still starting: stop the proxy and leave
        if child.returncode is not None:
            return
        if signum in (signal.SIGINT, signal.SIGQUIT) and self._in_foreground():
            return  # the terminal sent it to COMMAND too
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    def run(self, argv: list[str], executable: str, env: dict[str, str]) -> int:
        """COMMAND's exit status, 128+N when a signal N killed it (as shells report it)."""
        try:
            self.child = subprocess.Popen(argv, executable=executable, env=env)
        except OSError as e:
            raise RunError(f"cannot run {argv[0]}: {e.strerror or e}", 126) from None
        status = self.child.wait()
        if status < 0:
            self.killed_by = -status
            return 128 - status
        return status


# -- the summary ---------------------------------------------------------------------------------------
TRIGGER_WORDS = {  # how the upstream was found dead, in a few words
    Trigger.CLOSED.value: "upstream closed",
    Trigger.DROPPED.value: "upstream dropped",
    Trigger.PING_TIMEOUT.value: "upstream silent (no pong)",
    Trigger.FIRST_EVENT_TIMEOUT.value: "upstream silent (no first event)",
    Trigger.PREVIOUS_NOT_FOUND.value: "previous_response_not_found",
    Trigger.CONNECTION_LIMIT.value: "connection limit reached",
    Trigger.RESUME.value: "reconnected client resumed",
}
CLIENT_ERRORS = ("error", "response.failed", "response.incomplete")


@dataclass
class Summary:
    sessions: int = 0
    turns: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # turn.end status -> count
    recoveries: Counter[str] = field(default_factory=Counter)  # trigger -> count
    rotations: int = 0
    fail_closes: Counter[str] = field(default_factory=Counter)  # error code -> count
    upstream_errors: Counter[str] = field(default_factory=Counter)  # error code -> count
    unreadable: int = 0  # trace lines that were not whole records


def _error_code(error: Any, status: str) -> str:
    if isinstance(error, dict):
        code = error.get("code")
        if code:
            return str(code)
        message = re.sub(r"resp_[A-Za-z0-9]+", "resp_…", str(error.get("message") or ""))
        if message:
            return message if len(message) <= 120 else message[:119] + "…"
    return status


def summarize(records: Iterable[dict[str, Any]], unreadable: int = 0) -> Summary:
    """What happened in the run, from its chain trace records (schema: replayguard.core.records)."""
    s = Summary(unreadable=unreadable)
    failed_closed: set[tuple[Any, Any]] = set()
    ended: list[dict[str, Any]] = []
    sessions: set[Any] = set()
    for r in records:
        event = r["event"]
        if event == "session.start":
            sessions.add(r.get("session"))
        elif event == "turn.start":
            s.turns += 1
        elif event == "turn.end":
            ended.append(r)
        elif event == "recovery":
            trigger = str(r.get("trigger"))
            if trigger == Trigger.ROTATION.value:
                s.rotations += 1
            else:
                s.recoveries[TRIGGER_WORDS.get(trigger, trigger)] += 1
        elif event == "fail_close":
            failed_closed.add((r.get("session"), r.get("turn")))
            error = (r.get("error") or {}).get("error") if isinstance(r.get("error"), dict) else None
            code = (error or {}).get("code") if isinstance(error, dict) else None
            s.fail_closes[str(code) if code else f"no error event, close {r.get('close_code')}"] += 1
    s.sessions = len(sessions)
    for r in ended:
        status = str(r.get("status"))
        s.statuses[status] += 1
        if status in CLIENT_ERRORS and (r.get("session"), r.get("turn")) not in failed_closed:
            s.upstream_errors[_error_code(r.get("error"), status)] += 1
    return s


def _counts(counter: Counter[str]) -> str:
    total = sum(counter.values())
    if not total:
        return "0"
    ordered = sorted(counter.items(), key=lambda item: (-item[1], item[0]))  # most first, then by name
    return f"{total} — " + "; ".join(f"{name}: {n}" for name, n in ordered)


def render_summary(summary: Summary | None, command: list[str], status: int, killed_by: int | None, proxy: Proxy,
                   trace: Path | None, program: str) -> str:
    how = describe_status(-killed_by if killed_by is not None else status)
    lines = [f"{PROG}: {shlex.join(command)} {how}"]
    if summary is None:
        lines.append("  no trace: nothing to summarize" + (" (tracing was turned off)" if not proxy.trace_option
                                                              else ""))
    else:
        done = summary.statuses.get("completed", 0)
        others = [f"{n} {name}" for name, n in summary.statuses.most_common() if name != "completed"]
        in_flight = summary.turns - sum(summary.statuses.values())
        if in_flight > 0:
            others.append(f"{in_flight} without an end")
        lines.append(f"  sessions {summary.sessions}, turns {summary.turns} ({done} completed"
                     + "".join(f", {o}" for o in others) + ")")
        lines.append(f"  recoveries: {_counts(summary.recoveries)}"
                     + (f"; connections rotated: {summary.rotations}" if summary.rotations else ""))
        lines.append(f"  fail-closes: {_counts(summary.fail_closes)}")
        lines.append(f"  upstream errors passed through: {_counts(summary.upstream_errors)}")
        if summary.unreadable:
            lines.append(f"  ({summary.unreadable} trace lines were not whole records)")
    if trace is not None:
        lines.append(f"  trace: {trace}  (read it: {program} trace {shlex.quote(str(trace))})")
    lines.append(f"  log: {proxy.log_path if proxy.log_path is not None else 'shown above'}")
    if proxy.flows:
        lines.append(f"  flows: {proxy.flows}  (open them: mitmweb -r {shlex.quote(proxy.flows)})")
    if proxy.died is not None:
        lines.append(f"  {proxy.tool} {describe_status(proxy.died)} while COMMAND ran: what came after went nowhere")
    return "\n".join(lines)


def read_trace(path: Path, start: int) -> tuple[list[dict[str, Any]], int]:
    """The run's records: from ``start`` (the file's size before the run) to the end."""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", errors="replace")
    records, bad = read_records(text.splitlines())
    return records, len(bad)


# -- the whole command ---------------------------------------------------------------------------------
def main(options: Options, program: str = "replayguard", err: TextIO = sys.stderr) -> int:
    """Run COMMAND behind replayguard; returns COMMAND's exit status (or 2, 126, 127 for bad input)."""
    proxy: Proxy | None = None
    try:
        command = options.command[1:] if options.command[:1] == ["--"] else list(options.command)
        executable = find_command(command, os.environ.get("PATH"))
        managed, passed = split_sets(options.sets)
        if not (managed.get("listen_port") or "0").isdigit():
            raise RunError(f"--set listen_port={managed['listen_port']}: expected a port number")
        rules = managed.get("replayguard_rules", options.rules)
        if rules and not Path(rules).expanduser().is_file():
            raise RunError(f"bad rules file: {rules}: cannot read rules file: no such file")
        work = Path(tempfile.mkdtemp(prefix="replayguard-run-"))
        proxy = Proxy(work, options, managed, passed)
        with Foreground() as foreground:
            proxy.start()
            proxy.wait_ready()
            trust = trust_files(proxy.confdir if proxy.own_confdir else work, proxy.ca, dict(os.environ))
            env = command_environment(dict(os.environ), proxy.url, trust)
            where = f"{proxy.tool} on {proxy.host}:{proxy.port}"
            if proxy.web_url:
                where += f", web UI {proxy.web_url}"
            err.write(f"{PROG}: {where}; its log: {proxy.log_path or 'this terminal'}\n")
            err.flush()
            proxy.watch()
            status = foreground.run(command, executable, env)
            # Signals stay with the handlers until the end: stopping the proxy takes a few seconds at most.
            proxy.stop()
            trace = proxy.trace_path()
            summary = None
            if trace is not None:
                records, bad = read_trace(trace, proxy.trace_start)
                summary = summarize(records, bad)
            err.write(render_summary(summary, command, status, foreground.killed_by, proxy, trace, program) + "\n")
            err.flush()
        return status
    except RunError as e:
        err.write(f"{PROG}: {e}\n")
        return e.status
    except Interrupted as e:
        err.write(f"{PROG}: interrupted by signal {e.signum} before COMMAND started\n")
        return 128 + e.signum
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted before COMMAND started\n")
        return 128 + signal.SIGINT
    finally:
        if proxy is not None:
            proxy.stop()
            if proxy.own_confdir and proxy.confdir.exists():
                shutil.rmtree(proxy.confdir, ignore_errors=True)  # the CA's private key lives no longer than the run
