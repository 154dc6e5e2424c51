"""A fork server for the tests' mitmdump processes: importing mitmproxy and replayguard costs about 0.8 s of CPU per
process, most of what a test that starts one spends, and the suite is CPU-bound on 2 cores. One server per test
process imports them once, single-threaded, and forks a child per mitmdump; each child runs mitmproxy's own
``mitmdump`` entry point with its arguments, working directory, environment and output pipe, exactly as the
installed ``mitmdump`` script would. Used only for starts a fork cannot get wrong (``ForkedMitmdump`` in
conftest.py: no environment of the test's own, no open-files limit); ``REPLAYGUARD_NO_FORK=1`` turns it off.

Run as a script, this file is the server. Messages over a SOCK_SEQPACKET socket pair, JSON each:
  test -> server: {"argv": [...], "cwd": "...", "env": {...}} with the output pipe's write end attached
  server -> test: {"pid": N} (or {"error": "..."}), and {"exit": N, "code": C} when child N ends
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from typing import IO, Any


# -- the server (a process of its own) -------------------------------------------------------------------------
def _serve(sock: socket.socket) -> None:
    import selectors

    # Import now, once, so that every child starts with mitmproxy and replayguard already loaded.
    import mitmproxy.addons  # noqa: F401
    import mitmproxy.tools.dump  # noqa: F401
    import mitmproxy.tools.main  # noqa: F401

    import replayguard.proxy.addon  # noqa: F401

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is for pytest, which ends us
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    live: set[int] = set()

    def end() -> None:  # the test process has gone: so do its mitmdumps, and we
        for pid in live:
            os.kill(pid, signal.SIGKILL)
        os._exit(0)

    def send(message: dict[str, Any]) -> None:
        try:
            sock.send(json.dumps(message).encode())
        except OSError:
            end()

    while True:
        for key, _ in sel.select():
            if key.fileobj is sock:
                try:
                    data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 1)
                except OSError:
                    data, fds = b"", []
                if not data:
                    end()
                request = json.loads(data)
                pid = os.fork()
                if pid == 0:
                    _child(sock, wake_r, wake_w, fds[0], request)
                os.close(fds[0])
                live.add(pid)
                send({"pid": pid})
            else:
                os.read(wake_r, 4096)
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    live.discard(pid)
                    send({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _child(sock: socket.socket, wake_r: int, wake_w: int, out: int, request: dict[str, Any]) -> None:
    code: Any = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in any Python process
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
        os.setpgid(0, 0)  # a process group of its own, as a process started for a test is the leader of nothing
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        import secrets

        import replayguard.proxy.addon as addon

        addon.PRINCIPAL_KEY = secrets.token_bytes(32)  # a key of its own, as every mitmdump process has
        from mitmproxy.tools.main import mitmdump

        mitmdump(sys.argv[1:])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


# -- the test side ----------------------------------------------------------------------------------------------
class ForkedProcess:
    """What the tests use of ``subprocess.Popen``, for a child of the fork server."""

    def __init__(self, pid: int, stdout: IO[str]) -> None:
        self.pid, self.stdout = pid, stdout
        self.returncode: int | None = None
        self.ended = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self.ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"mitmdump (pid {self.pid})", timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                     start_new_session=True)
        theirs.close()
        self.sock = ours
        self.lock = threading.Lock()  # the children and early exits
        self.requests = threading.Lock()  # one request at a time: replies come in order
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.children: dict[int, ForkedProcess] = {}
        self.early: dict[int, int] = {}  # exits heard before the pid's reply was handled
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                self.replies.put({"error": "the fork server ended"})
                return
            message = json.loads(data)
            if "exit" in message:
                with self.lock:
                    child = self.children.pop(message["exit"], None)
                    if child is None:
                        self.early[message["exit"]] = message["code"]
                        continue
                child.returncode = message["code"]
                child.ended.set()
            else:
                self.replies.put(message)

    def spawn(self, argv: list[str], cwd: str, env: dict[str, str]) -> ForkedProcess:
        read, write = os.pipe()
        with self.requests:
            try:
                socket.send_fds(self.sock, [json.dumps({"argv": argv, "cwd": cwd, "env": env}).encode()], [write])
            finally:
                os.close(write)
            reply = self.replies.get(timeout=30)
        if "pid" not in reply:
            os.close(read)
            raise RuntimeError(reply.get("error", "the fork server did not answer"))
        child = ForkedProcess(reply["pid"], open(read, encoding="utf-8", errors="replace"))
        with self.lock:
            code = self.early.pop(child.pid, None)
            if code is None:
                self.children[child.pid] = child
        if code is not None:
            child.returncode = code
            child.ended.set()
        return child

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes our reader's recv; close alone would leave the socket open
        except OSError:
            pass
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    _serve(socket.socket(fileno=int(sys.argv[1])))
