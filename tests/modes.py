"""What the mode tests need besides mitmdump: a corporate CONNECT proxy, an iptables redirect scoped to a group of
its own, the local-capture redirector's prerequisites, and the scripted client run as a separate process.

Everything a helper creates (firewall rules, groups, processes) is removed by the helper, also when a test fails.
"""

from __future__ import annotations

import asyncio
import base64
import grp
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class ConnectProxy:
    """An HTTP CONNECT proxy on 127.0.0.1 (port 0) that tunnels only to the targets it is given (by name, resolved
    by itself, as a corporate proxy does), asks for Basic credentials, and records every tunnel."""

    def __init__(self, targets: dict[str, tuple[str, int]], credentials: str | None = None) -> None:
        self.targets = {k.lower(): v for k, v in targets.items()}  # "name:port" -> address to connect to
        self.credentials = credentials
        self.tunnels: list[dict[str, Any]] = []  # target, authorized, status, outbound (our local address)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ConnectProxy":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="connect-proxy")
        self._thread.start()
        assert ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._loop is not None and self._server is not None
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)

    @property
    def outbound(self) -> set[tuple[str, int]]:
        """The local addresses of the proxy's connections to targets: what the upstream sees as its peer."""
        return {t["outbound"] for t in self.tunnels if t.get("outbound")}

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        lines = head.split("\r\n")
        method, target, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        record: dict[str, Any] = {"method": method, "target": target.lower()}
        self.tunnels.append(record)
        if self.credentials is not None:
            expected = "Basic " + base64.b64encode(self.credentials.encode()).decode()
            record["authorized"] = headers.get("proxy-authorization") == expected
            if not record["authorized"]:
                return await self._answer(writer, record, 407, "Proxy Authentication Required")
        if method != "CONNECT" or target.lower() not in self.targets:
            return await self._answer(writer, record, 403, "Forbidden")
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.targets[target.lower()])
        except OSError:
            return await self._answer(writer, record, 502, "Bad Gateway")
        record["outbound"] = tuple(up_writer.get_extra_info("sockname")[:2])
        record["status"] = 200
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, record: dict[str, Any], status: int, reason: str) -> None:
        record["status"] = status
        extra = 'Proxy-Authenticate: Basic realm="corp"\r\n' if status == 407 else ""
        writer.write(f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


# -- iptables ----------------------------------------------------------------------------------------
def transparent_unavailable() -> str | None:
    """Why transparent mode cannot be tested here, or None."""
    if os.geteuid() != 0:
        return "transparent mode needs root (iptables nat rules and a group of its own)"
    if shutil.which("iptables") is None:
        return "iptables is not installed (.ci/run installs it with apt-get)"
    probe = subprocess.run(["iptables", "-t", "nat", "-S", "OUTPUT"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"iptables nat table unusable here: {probe.stderr.strip()}"
    return None


class Redirect:
    """A throwaway group whose processes' TCP connections to 127.0.0.1:<port> are redirected to mitmdump by an
    iptables nat OUTPUT rule (what `mitmdump --mode transparent` expects); mitmdump itself, not in the group, is
    never redirected. Rules carry a comment naming this process, so leftovers of a killed run are swept."""

    PREFIX = "rgtest"

    def __init__(self) -> None:
        self.name = f"{self.PREFIX}{os.getpid()}"
        self.gid = -1
        self.rules: list[list[str]] = []

    def __enter__(self) -> "Redirect":
        self.sweep()
        subprocess.run(["groupadd", self.name], check=True, capture_output=True)
        self.gid = grp.getgrnam(self.name).gr_gid
        return self

    def add(self, port: int, to_port: int) -> None:
        rule = ["-p", "tcp", "-d", "127.0.0.1", "--dport", str(port), "-m", "owner", "--gid-owner", str(self.gid),
                "-m", "comment", "--comment", self.name, "-j", "REDIRECT", "--to-ports", str(to_port)]
        subprocess.run(["iptables", "-t", "nat", "-I", "OUTPUT", "1", *rule], check=True, capture_output=True)
        self.rules.append(rule)

    def __exit__(self, *exc: Any) -> None:
        for rule in self.rules:
            subprocess.run(["iptables", "-t", "nat", "-D", "OUTPUT", *rule], capture_output=True)
        self.rules.clear()
        subprocess.run(["groupdel", self.name], capture_output=True)
        assert self.name not in subprocess.run(["iptables", "-t", "nat", "-S", "OUTPUT"], capture_output=True,
                                               text=True).stdout, "iptables rules left behind"

    @classmethod
    def sweep(cls) -> None:
        """Remove the rules and groups of earlier runs whose process is gone (a SIGKILLed test run)."""
        listing = subprocess.run(["iptables", "-t", "nat", "-S", "OUTPUT"], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            m = re.search(rf"--comment {cls.PREFIX}(\d+)", line)
            if m and not Path(f"/proc/{m.group(1)}").exists():
                subprocess.run(["iptables", "-t", "nat", *line.replace("-A ", "-D ", 1).split()], capture_output=True)
        for group in grp.getgrall():
            m = re.fullmatch(rf"{cls.PREFIX}(\d+)", group.gr_name)
            if m and not Path(f"/proc/{m.group(1)}").exists():
                subprocess.run(["groupdel", group.gr_name], capture_output=True)


# -- local capture mode ------------------------------------------------------------------------------
SUDO_SHIM = r"""#!/bin/sh
# mitmproxy's Linux redirector runs `sudo` even as root; we are root: drop sudo's options and run the command.
# The redirector attaches to the cgroup2 hierarchy at /sys/fs/cgroup; where cgroup2 is mounted elsewhere it runs
# in a mount namespace of its own with cgroup2 mounted there (gone with the process). Print nothing: mitmproxy
# treats any output of the redirector as an error.
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; break;;
    -*) shift;;
    *) break;;
  esac
done
if [ "$(stat -f -c %T /sys/fs/cgroup/ 2>/dev/null)" = "cgroup2fs" ]; then
  exec "$@"
fi
exec unshare --mount --propagation private -- sh -c 'mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$@"' sh "$@"
"""


def local_mode_unavailable() -> str | None:
    """Why `--mode local` cannot be tested here, or None."""
    try:
        from mitmproxy import version
    except ImportError:  # pragma: no cover
        return "mitmproxy not installed"
    major, minor = (int(x) for x in version.VERSION.split(".")[:2])
    if (major, minor) < (11, 1):
        return f"local capture mode on Linux needs mitmproxy >= 11.1 (this is {version.VERSION})"
    if os.geteuid() != 0:
        return "local capture mode needs root (eBPF, a tun device)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun missing (the kernel has no TUN support)"
    if "cgroup2" not in Path("/proc/filesystems").read_text():
        return "the kernel has no cgroup2 filesystem (the redirector attaches its eBPF program to one)"
    for tool in ("unshare", "mount", "stat", "ip"):
        if shutil.which(tool) is None:
            return f"{tool!r} not found on PATH"
    if not (Path(sys.executable).parent / "mitmproxy-linux-redirector").exists():
        return "mitmproxy-linux-redirector is not installed beside mitmdump"
    return None


def sudo_shim(directory: Path) -> dict[str, str]:
    """An environment whose PATH starts with the pass-through sudo."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "sudo"
    shim.write_text(SUDO_SHIM)
    shim.chmod(0o755)
    return {"PATH": f"{directory}:{os.environ.get('PATH', '')}"}


def leftover_redirector_rules() -> list[str]:
    """IPv6 policy rules the redirector adds for its tun device (removed when it exits cleanly)."""
    out = subprocess.run(["ip", "-6", "rule"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if re.search(r"oif tun\d+", line)]


# -- the scripted client as a process ----------------------------------------------------------------
def client_command(url: str, *args: str, name: str | None = None) -> list[str]:
    """`python -m replayguard client URL ARGS`, optionally with its process name set (local mode targets it)."""
    if name is None:
        return [sys.executable, "-m", "replayguard", "client", url, *args]
    code = ("import ctypes, sys, runpy; ctypes.CDLL(None).prctl(15, sys.argv.pop(1).encode(), 0, 0, 0); "
            "sys.argv[0] = 'replayguard'; runpy.run_module('replayguard', run_name='__main__')")
    return [sys.executable, "-c", code, name, "client", url, *args]


def client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = str(ROOT)
    return env
