"""Start a real mitmdump running addon.py, as users start it, on 127.0.0.1 with port 0 (tests and the bench)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]  # the checkout: addon.py, rules.yaml
QUIET = "(listening)"  # ready: the process listens (for verbosities that log nothing at startup)


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on, read from /proc (for runs whose log does not name them)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def mitmdump_command(tool: str = "mitmdump") -> list[str]:
    """How to run mitmproxy's ``tool`` (mitmdump, mitmweb) from this interpreter's environment."""
    exe = Path(sys.executable).parent / tool
    if exe.exists():
        return [str(exe)]
    found = shutil.which(tool)
    if found:
        return [found]
    return [sys.executable, "-c", f"from mitmproxy.tools.main import {tool}; {tool}()"]


class StartFailed(RuntimeError):
    """mitmdump exited or stayed silent at startup; ``reason`` is its last log line, the message its whole log."""

    def __init__(self, what: str, log: str) -> None:
        super().__init__(f"{what}:\n{log}")
        lines = [line for line in log.splitlines() if line.strip()]
        self.reason = f"{what}: {lines[-1].strip()}" if lines else what


class Mitmdump:
    """A real mitmdump subprocess running addon.py, listening on 127.0.0.1 (port 0)."""

    READY = r"listening at 127\.0\.0\.1:(\d+)"
    TOOL = "mitmdump"

    def __init__(self, tmp: Path, args: list[str], rules: dict[str, Any] | None, addon: bool = True,
                 verbosity: str = "info", env: dict[str, str] | None = None, ready: str | None = None,
                 nofile: tuple[int, int] | None = None) -> None:
        """``ready``: the log line that says mitmdump is ready (its group 1, if any, is the listening port);
        ``env``: variables added to the environment (proxy variables are always removed)."""
        self.tmp = tmp
        self.extra_env = env or {}
        self.nofile = nofile  # (soft, hard) open-files limit to start it under, as `ulimit -n` would
        self.ready = ready or self.READY
        tmp.mkdir(parents=True, exist_ok=True)
        self.addon = addon
        self.verbosity = verbosity
        self.args = args
        self.rules_path: Path | None = None
        if rules is not None:
            self.rules_path = tmp / "rules.yaml"
            self.rules_path.write_text(yaml.safe_dump(rules))
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def command(self) -> list[str]:
        cmd = mitmdump_command(self.TOOL) + [
            "--listen-host", "127.0.0.1", "--listen-port", "0",
            "--set", f"confdir={self.tmp / 'conf'}",
            "--set", "flow_detail=0", "--set", f"termlog_verbosity={self.verbosity}",
            *(["-s", str(ROOT / "addon.py")] if self.addon else []),
            *self.args,
        ]
        if self.rules_path is not None:
            cmd += ["--set", f"replayguard_rules={self.rules_path}"]
        return cmd

    def start(self, timeout: float = 30) -> "Mitmdump":
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update(self.extra_env)
        self.proc = self._launch(env)
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready == QUIET:  # nothing is logged at this verbosity: it is ready when it listens
                ports = listening_ports(self.proc.pid)
                if ports:
                    self.port = min(ports)
                    return self
            for line in list(self.lines):
                m = re.search(self.ready, line)
                if m:
                    self.port = int(m.group(1)) if m.groups() else 0
                    return self
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise StartFailed(f"{self.TOOL} exited with {self.proc.returncode}", self.log)
            time.sleep(0.05)
        raise StartFailed(f"{self.TOOL} did not start within {timeout:g} s", self.log)

    def _launch(self, env: dict[str, str]) -> Any:
        """The process, with its output on ``stdout`` (a subclass may start it another way)."""
        return subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=self.tmp,
            preexec_fn=self._limits if self.nofile else None,
        )

    def _limits(self) -> None:
        import resource

        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 5) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log)
            if m:
                return m
            time.sleep(0.05)
        raise AssertionError(f"log never matched {pattern!r}:\n{self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"
