"""Running the real Codex CLI offline (`codex exec`) against a local Responses WebSocket server, with a CODEX_HOME of
its own, and finding the session file it wrote. Tests find the CLI through REPLAYGUARD_CODEX or `codex` on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CODEX = os.environ.get("REPLAYGUARD_CODEX") or shutil.which("codex")
SKIP_REASON = "Codex CLI not installed (.ci/run installs it with npm; or set REPLAYGUARD_CODEX)"
KEY = "sk-codex-SECRET-0123456789"


def stop_daemons(home: Path, timeout: float = 5.0) -> list[int]:
    """Stop what Codex left running from ``home``: its interactive UI starts an app-server daemon (installed under
    CODEX_HOME) that outlives it. A test stops what it started; returns the pids it stopped."""
    import signal
    import time

    prefix = str(home)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        if argv0.startswith(prefix):
            pids.append(int(entry.name))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


@dataclass
class CodexRun:
    returncode: int
    stdout: str
    stderr: str
    home: Path

    @property
    def rollout(self) -> Path:
        """The session file of the run (Codex writes one per `codex exec`)."""
        (path,) = sorted(self.home.glob("sessions/*/*/*/rollout-*.jsonl"))
        return path


def run_codex(tmp: Path, url: str, prompt: str = "please run TOOL ls", provider: str = "",
              timeout: float = 180, resume: bool = False) -> CodexRun:
    """`codex exec PROMPT` with the provider at ``url`` (ws:// or http://, the server's root) over WebSocket.
    ``provider`` adds lines to the provider block (e.g. ``stream_idle_timeout_ms = 3000``). Codex's approval policy
    is `never` and its sandbox read-only in exec mode: the fake model's `ls` runs, offline. ``resume``: `codex exec
    resume --last PROMPT` in the same CODEX_HOME (it appends to the last session's file)."""
    home = tmp / "codex-home"
    home.mkdir(parents=True, exist_ok=resume)
    (home / "config.toml").write_text(f'''model = "demo-model"
model_provider = "local"

[model_providers.local]
name = "local Responses server"
base_url = "{url.replace('ws://', 'http://')}/v1"
wire_api = "responses"
env_key = "DEMO_API_KEY"
supports_websockets = true
{provider}
''')
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(CODEX_HOME=str(home), DEMO_API_KEY=KEY)
    assert CODEX is not None
    command = [CODEX, "exec", "--skip-git-repo-check", *(["resume", "--last"] if resume else []), prompt]
    result = subprocess.run(command, cwd=work, env=env,
                            capture_output=True, text=True, timeout=timeout)
    return CodexRun(result.returncode, result.stdout, result.stderr, home)
