"""`replayguard reproduce RECORDING`: run a recorded session again, offline, and compare the outcomes turn by turn.

The recording (a chain trace with full bodies, a mitmproxy flow file, a fixture from ``--write-test``, a Codex CLI
rollout or a HAR export) is read into a model (:mod:`replayguard.tools.recording`). The fake upstream is scripted
with it: every turn is answered with the recorded output items and usage, in the recorded event order, and the
upstream's own failures happen at the same turn and the same point within it. A real mitmdump runs addon.py in
reverse mode in front of the fake, with the recording's rules (so the faults replayguard injected by rule are
injected again by the same rules), and a client sends the recorded client messages in order, one session after
another, chained on the new response ids. What the client gets for each turn (completed, replayed, failed closed, a
client error, the connection lost) is compared with what the recording says it got: a recording becomes a regression
test.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import yaml
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.protocol import State
from websockets.sync.client import ClientConnection, connect

from ..core.chain import TERMINAL
from ..core.errors import PREFIX
from ..core.records import read_records
from ..core.redact import scrub
from .fake_upstream import Answer, Break, FakeUpstream, Script, ScriptedTurn
from .harness import ROOT, Mitmdump
from .recording import (
    Failure, Outcome, Recording, RecordedSession, RecordedTurn, RecordingError, error_code,
    sessions_from_records, to_fixture,
)
from .sources import read_recording  # every format, told apart by content

log = logging.getLogger(__name__)

SETTLE = 0.3  # seconds after an idle failure before the next turn, so the proxy sees it as idle, as recorded
ANSWERS = frozenset({"completed", "error", "response.failed", "response.incomplete"})


class ReproduceError(Exception):
    """The reproduction could not run (the proxy did not start, a rules file is unreadable, ...)."""


@dataclass
class Options:
    against: str = "replayguard"  # or "plain": mitmdump without the addon
    policy: str | None = None  # overrides recovery.policy
    rules: str | None = None  # a rules.yaml to use instead of the recording's
    keep: str | None = None  # keep the work directory here
    trace: str | None = None  # where the reproduced run's trace goes
    session: str | None = None  # only sessions whose id starts with this
    timeout: float | None = None  # per turn; default from the rules' timers


@dataclass
class Row:
    """One compared line: a turn (or a session's handshake, ``turn`` 0)."""

    session: int
    session_id: str
    turn: int
    recorded: Outcome
    reproduced: Outcome

    @property
    def same(self) -> bool:
        recorded, reproduced = self.recorded.key(), self.reproduced.key()
        if self.recorded.close_unknown:  # any close code (or none) is the recorded outcome
            recorded, reproduced = recorded[:3], reproduced[:3]
        return recorded == reproduced


@dataclass
class Result:
    recording: Recording
    sessions: list[RecordedSession]
    options: Options
    rules: dict[str, Any]
    rules_from: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # where the recording stopped, what was not reproduced
    injected: list[str] = field(default_factory=list)  # what the fake did from the script
    trace: Path | None = None
    workdir: Path | None = None
    mitmdump: str = ""
    fake_sent: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    @property
    def differ(self) -> list[Row]:
        return [row for row in self.rows if not row.same]


# -- the script -----------------------------------------------------------------------------------
def _break(failure: Failure) -> Break:
    return Break(failure.kind, failure.code or 1011, error=failure.error)


def script_for(sessions: list[RecordedSession], plain: bool = False) -> Script:
    """The fake upstream's script: each recorded turn's answers and the upstream's own failures. Failures a
    replayguard fault rule injected are left to the rules, except against plain mitmdump, which has no rules: there
    the fake does them, so the same failures happen."""
    def ours(failure: Failure | dict[str, Any]) -> bool:
        injected = failure["injected"] if isinstance(failure, dict) else failure.injected
        return plain or not injected

    turns: dict[tuple[int, int], ScriptedTurn] = {}
    for index, session in enumerate(sessions):
        turns[(index, 0)] = ScriptedTurn(idle=[_break(f) for f in session.open_idle if ours(f)],
                                         handshakes=[h["status"] for h in session.open_handshakes if ours(h)])
        for turn in session.reproducible:
            answers = []
            for failure in turn.failures:
                if ours(failure):
                    partial = turn.status not in ANSWERS  # the answer broke off: its events are recorded
                    answers.append(Answer(output=turn.output, events=turn.events if partial else None,
                                          after=failure.after, cut=_break(failure)))
            if turn.status in ANSWERS:
                answers.append(Answer(status=turn.status, output=turn.output, usage=turn.usage, events=turn.events,
                                      error=turn.error))
            turns[(index, turn.number)] = ScriptedTurn(
                answers=answers, idle=[_break(f) for f in turn.idle if ours(f)],
                handshakes=[h["status"] for h in turn.handshakes if ours(h)])
    return Script(turns)


# -- rules ----------------------------------------------------------------------------------------
def rules_for(sessions: list[RecordedSession], options: Options) -> tuple[dict[str, Any], str]:
    """The rules document the reproduction runs with, and where it came from."""
    if options.rules:
        try:
            doc = yaml.safe_load(Path(options.rules).read_text(encoding="utf-8"))
        except OSError as e:
            raise ReproduceError(f"cannot read rules file {options.rules}: {e.strerror or e}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ReproduceError(f"{options.rules}: not a rules.yaml document: {e}") from None
        source = options.rules
    else:
        recorded = [s.rules for s in sessions if s.rules]
        if recorded:
            doc, source = recorded[0], "the recording"
        else:
            doc, source = yaml.safe_load((ROOT / "rules.yaml").read_text()), "the defaults (none recorded)"
    if not isinstance(doc, dict):
        raise ReproduceError(f"{options.rules or 'the recorded rules'}: not a rules.yaml mapping")
    doc = json.loads(json.dumps(doc))
    doc.setdefault("trace", {})
    if not isinstance(doc["trace"], dict):
        doc["trace"] = {}
    doc["trace"]["bodies"] = "full"  # the reproduced run can itself be reproduced
    if options.policy:
        if not isinstance(doc.get("recovery"), dict):
            doc["recovery"] = {}
        doc["recovery"]["policy"] = options.policy
    return doc, source


def _turn_timeout(rules: dict[str, Any]) -> float:
    """Long enough for every recovery the rules allow: first event timeout, ping and reconnect per attempt."""
    upstream = rules.get("upstream") if isinstance(rules.get("upstream"), dict) else {}
    recovery = rules.get("recovery") if isinstance(rules.get("recovery"), dict) else {}

    def number(key: str, default: float) -> float:
        value = upstream.get(key, default)
        return float(value) if isinstance(value, (int, float)) else default

    per_attempt = number("first_event_timeout", 10) + number("ping_timeout", 2) + number("connect_timeout", 10)
    retries = recovery.get("max_retries", 1)
    return per_attempt * ((retries if isinstance(retries, int) else 1) + 2) + 5


# -- the client -----------------------------------------------------------------------------------
@dataclass
class Seen:
    """What the client saw for one turn, and on which of its connections."""

    outcome: Outcome
    client: str | None = None  # the client's address (the session's ``client`` in the reproduced trace)
    turn: int = 0  # the turn's number on that connection
    reconnected: bool = False


class Driver:
    """Sends the recorded client messages over a real WebSocket, one turn at a time, response ids mapped."""

    def __init__(self, port: int, script: Script, timeout: float) -> None:
        self.port = port
        self.script = script
        self.timeout = timeout
        self.ids: dict[str, str] = {}  # recorded response id -> reproduced

    def _connect(self, session: RecordedSession) -> tuple[ClientConnection, str]:
        parts = urlsplit(session.url or "ws://api.openai.com/v1/responses")
        authority = parts.netloc.rsplit("@", 1)[-1] or "api.openai.com"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = [(k, v) for k, v in session.headers.items() if k.lower() not in ("x-codex-turn-state", "host")]
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        address = "%s:%d" % sock.getsockname()[:2]
        try:
            # Entered by hand: the connection lives across turns.
            ws = connect(f"ws://{authority}{path}", sock=sock, additional_headers=headers, max_size=None,
                         open_timeout=10, proxy=None).__enter__()
        except BaseException:
            sock.close()
            raise
        return ws, address

    def run_session(self, index: int, session: RecordedSession) -> tuple[Outcome | None, list[Seen]]:
        """Returns what the first handshake got (None: accepted) and what each turn got."""
        self.script.begin(index, 0)
        ws: ClientConnection | None = None
        address: str | None = None
        on_conn = 0
        first: Outcome | None = None
        seen: list[Seen] = []
        try:
            ws, address = self._connect(session)
        except InvalidStatus as e:
            first = Outcome("refused", code=str(e.response.status_code))
        except (OSError, WebSocketException, TimeoutError) as e:
            first = Outcome("connection lost", note=f"cannot connect: {e}")
        ended: int | None = None  # the turn whose failure closed the connection
        for turn in session.reproducible:
            self.script.begin(index, turn.number)
            reconnected = False
            if ended is not None:
                # The recording went on where the reproduction lost the connection: the rest was never sent.
                seen.append(Seen(Outcome("not sent", note=f"the connection closed in turn {ended}")))
                continue
            if ws is None or ws.protocol.state is not State.OPEN:
                if ws is not None:
                    ws.close()
                try:
                    ws, address = self._connect(session)
                except InvalidStatus as e:
                    ws = None
                    seen.append(Seen(Outcome("refused", code=str(e.response.status_code)), None, 0, True))
                    continue
                except (OSError, WebSocketException, TimeoutError) as e:
                    ws = None
                    seen.append(Seen(Outcome("connection lost", note=f"cannot connect: {e}"), None, 0, True))
                    continue
                on_conn, reconnected = 0, bool(seen) or first is not None
            on_conn += 1
            outcome = self._turn(ws, turn)
            seen.append(Seen(outcome, address, on_conn, reconnected))
            if outcome.kind in ("failed closed", "connection lost", "no outcome"):
                ended = turn.number
            if turn.idle and ws.protocol.state is State.OPEN:
                scripted = self.script.turns.get((index, turn.number))
                if scripted is not None and scripted.idle:
                    self.script.wait_idle(index, turn.number, 5)
                time.sleep(SETTLE)  # the proxy sees the failure while idle, as recorded
        if ws is not None:
            ws.close()
        return first, seen

    def _map(self, text: str) -> str:
        for old, new in self.ids.items():
            text = text.replace(old, new)
        return text

    def _turn(self, ws: ClientConnection, turn: RecordedTurn) -> Outcome:
        request = dict(turn.request)
        previous = request.get("previous_response_id")
        if isinstance(previous, str) and previous in self.ids:
            request["previous_response_id"] = self.ids[previous]
        deadline = time.monotonic() + self.timeout
        try:
            for message in turn.before:
                ws.send(self._map(message))
            ws.send(json.dumps(request))
            while True:
                message = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
                try:
                    event = json.loads(message)
                except ValueError:
                    continue  # a binary or broken frame: the client only waits for the turn's end
                if isinstance(event, dict) and event.get("type") in TERMINAL:
                    break
        except TimeoutError:
            ws.close()
            return Outcome("no outcome", note=f"nothing within {self.timeout:g} s")
        except ConnectionClosed:
            rcvd = ws.protocol.close_rcvd
            return Outcome("connection lost", close=rcvd.code if rcvd is not None else None)
        kind = event["type"]
        if kind == "response.completed":
            response = event.get("response") or {}
            if turn.response_id and isinstance(response.get("id"), str):
                self.ids[turn.response_id] = response["id"]
            return Outcome("completed")
        if kind == "error" and str((event.get("error") or {}).get("message", "")).startswith(PREFIX):
            try:
                while True:
                    ws.recv(timeout=5)
            except (ConnectionClosed, TimeoutError):
                pass
            rcvd = ws.protocol.close_rcvd
            return Outcome("failed closed", code=error_code(event), close=rcvd.code if rcvd is not None else None)
        return Outcome("client error", code=error_code(event) if kind == "error" else kind)


# -- running ------------------------------------------------------------------------------------
def select(recording: Recording, session: str | None) -> list[RecordedSession]:
    sessions = recording.sessions
    if session is not None:
        sessions = [s for s in sessions if s.id.startswith(session)]
        if not sessions:
            raise ReproduceError(f"no session whose id starts with {session!r} in {recording.path} "
                                 f"(it has {', '.join(s.id for s in recording.sessions)})")
    return sessions


def reproduce(recording: Recording, options: Options) -> Result:
    """Run the recording again and compare (raises ReproduceError when it cannot run). Sessions are reproduced one
    after another in the order they started, through one mitmdump (so a client that reconnected with an old
    previous_response_id is resumed from the earlier session's chain, as recorded)."""
    sessions = select(recording, options.session)
    plain = options.against == "plain"
    rules, source = rules_for(sessions, options)
    if options.rules and not options.policy:
        source += " (used as it is)"
    result = Result(recording, sessions, options, rules, source)
    result.notes += recording.warnings
    if recording.stopped:
        result.notes.append(f"the recording stops: {recording.stopped}")
    if len({json.dumps(s.rules, sort_keys=True) for s in sessions if s.rules}) > 1 and not options.rules:
        result.notes.append("the sessions ran with different rules; this run uses the first session's")
    for s in sessions:
        cut = s.turns[len(s.reproducible):]
        if cut:
            last = s.reproducible[-1].number if s.reproducible else None
            why = "the client left during it" if cut[0].outcome.kind == "aborted" else "its outcome is not recorded"
            result.notes.append(f"session {s.id[:8]}: reproduced up to turn {last} (the last complete turn); "
                                f"turn {cut[0].number} not reproduced: {why}")
    script = script_for(sessions, plain)
    if options.keep:
        work = Path(options.keep).expanduser()
        if work.exists() and (not work.is_dir() or any(work.iterdir())):
            raise ReproduceError(f"--keep {work}: not an empty directory (the run's files would mix with others)")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="replayguard-reproduce-"))
    trace = work / "trace.jsonl"
    fake = FakeUpstream()
    fake.script = script
    proxy: Mitmdump | None = None
    timeout = options.timeout or _turn_timeout(rules)
    try:
        fake.start()
        args = ["--mode", f"reverse:http://127.0.0.1:{fake.port}", "--set", "keep_host_header=true",
                "-w", str(work / "flows.mitm")]
        given = options.rules and not options.policy  # the user's own file: its errors name its lines
        if not plain:
            args += ["--set", f"replayguard_trace={trace}"]
            if given:
                args += ["--set", f"replayguard_rules={Path(str(options.rules)).resolve()}"]
        proxy = Mitmdump(work, args, None if plain or given else rules, addon=not plain)
        try:
            proxy.start()
        except RuntimeError as e:
            raise ReproduceError(f"mitmdump did not start: {_why(str(e))}") from None
        if "error in script" in proxy.log or "Error logged during startup" in proxy.log:
            hint = "; run with other rules with --rules FILE" if source == "the recording" else ""
            raise ReproduceError(f"mitmdump did not start: {_why(proxy.log)}{hint}")
        result.mitmdump = f"mitmdump {version('mitmproxy')} {'without replayguard' if plain else 'with replayguard'}"
        log.info("reproducing %s: fake upstream on %s, mitmdump on port %d", recording.path, fake.url, proxy.port)
        driver = Driver(proxy.port, script, timeout)
        seen: list[tuple[Outcome | None, list[Seen]]] = []
        for index, session in enumerate(sessions):
            log.info("session %d (%s): %d turns", index + 1, session.id, len(session.reproducible))
            seen.append(driver.run_session(index, session))
        proxy.stop()
        (work / "mitmdump.log").write_text(proxy.log + "\n")
        traced = _traced(trace) if not plain else {}
        for index, (session, (first, turns)) in enumerate(zip(sessions, seen)):
            if session.refused is not None or first is not None:
                recorded = Outcome("refused", code=str(session.refused)) if session.refused else Outcome("connected")
                result.rows.append(Row(index, session.id, 0, recorded, first or Outcome("connected")))
            for turn, got in zip(session.reproducible, turns):
                result.rows.append(Row(index, session.id, turn.number, turn.outcome, _reproduced(got, traced)))
        result.injected = [f"session {key[0] + 1} turn {key[1]}: {what}" for key, what in script.applied]
        result.fake_sent = list(fake.sent)
    finally:
        if proxy is not None:
            proxy.stop()
        fake.stop()
        if not plain and trace.exists():
            if options.keep and not options.trace:
                result.trace = trace
            else:
                if options.trace:
                    target = Path(options.trace)
                    target.parent.mkdir(parents=True, exist_ok=True)
                else:
                    fd, name = tempfile.mkstemp(prefix=f"replayguard-reproduce-{time.strftime('%Y%m%d-%H%M%S')}-",
                                                suffix=".jsonl")
                    os.close(fd)
                    target = Path(name)
                shutil.copyfile(trace, target)
                target.chmod(0o600)
                result.trace = target
        if options.keep:
            result.workdir = work
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


def _why(log_text: str) -> str:
    """The line of mitmdump's output that says why it stopped."""
    lines = [line for line in log_text.splitlines() if line.strip()]
    mistakes = [line.split("replayguard: bad rules file: ", 1)[1].strip() for line in lines
                if "replayguard: bad rules file: " in line]  # one line per mistake of the rules file
    if mistakes:
        return "bad rules file: " + "; ".join(mistakes)
    return lines[-1].strip() if lines else "no output"


def _traced(trace: Path) -> dict[str, RecordedSession]:
    """The reproduced run's sessions, by the client address each came from."""
    if not trace.exists():
        return {}
    records, _ = read_records(trace.read_text(encoding="utf-8", errors="replace").splitlines())
    clients = {r.get("session"): r.get("client") for r in records if r["event"] == "session.start"}
    return {clients.get(s.id) or s.id: s for s in sessions_from_records(records, need_bodies=False)}


def _reproduced(got: Seen, traced: dict[str, RecordedSession]) -> Outcome:
    """What the client saw, with what the proxy did (recoveries, fail-closes) from the reproduced run's trace."""
    outcome = got.outcome
    session = traced.get(got.client or "")
    turn = next((t for t in session.turns if t.number == got.turn), None) if session is not None else None
    if turn is not None and outcome.kind != "no outcome" and turn.outcome.kind not in ("no outcome", "aborted"):
        outcome = turn.outcome
    if got.reconnected:
        outcome = Outcome(outcome.kind, outcome.recoveries, outcome.code, outcome.close,
                          "; ".join(filter(None, [outcome.note, "on a new client connection"])))
    return outcome


# -- fixtures -------------------------------------------------------------------------------------
KEEP = frozenset({"type", "role", "call_id", "id", "name", "model", "previous_response_id", "status", "object",
                  "approval_request_id", "item_id", "tool_choice", "include", "effort", "summary", "verbosity",
                  "format", "service_tier", "truncation", "server_label", "response_id"})
FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit "


def filler(text: str) -> str:
    """A placeholder of the same length (the same text always gets the same placeholder, so a history resent by
    the client still matches the outputs it repeats)."""
    return (FILLER * (len(text) // len(FILLER) + 1))[: len(text)]


def redact_text(value: Any, key: str = "", in_tools: bool = False) -> Any:
    """Message text out of a request, an output item or a client message: every string but the structural ones
    (types, roles, call_ids, ids, tool names, models); JSON tool arguments keep their keys; tool definitions keep
    everything but their descriptions."""
    if isinstance(value, dict):
        return {k: redact_text(v, k, in_tools or k == "tools") for k, v in value.items()}
    if isinstance(value, list):
        return [redact_text(v, key, in_tools) for v in value]
    if not isinstance(value, str):
        return value
    if in_tools:
        return filler(value) if key == "description" else value
    if key in KEEP:
        return value
    if key == "arguments":
        try:
            parsed = json.loads(value)
        except ValueError:
            return filler(value)
        return json.dumps(redact_text(parsed)) if isinstance(parsed, (dict, list)) else filler(value)
    return filler(value)


def write_fixture(recording: Recording, path: str | Path, keep_text: bool = False,
                  session: str | None = None) -> Path:
    """The recording as a compact fixture: only what reproducing needs, secrets scrubbed, and message text
    replaced by placeholders of the same length unless ``keep_text``."""
    recording = Recording(recording.path, recording.kind, select(recording, session), recording.stopped,
                          recording.warnings, recording.origin)
    doc = to_fixture(recording)
    if not keep_text:
        for s in doc["sessions"]:
            for t in s["turns"]:
                t["request"] = redact_text(t["request"])
                t["output"] = redact_text(t["output"])
                t["before"] = [_redact_message(m) for m in t["before"]]
    text = scrub(json.dumps(doc, indent=1, ensure_ascii=False))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text + "\n", encoding="utf-8")
    return target


def _redact_message(message: str) -> str:
    try:
        return json.dumps(redact_text(json.loads(message)))
    except ValueError:
        return filler(message)


# -- output -------------------------------------------------------------------------------------
def _kind_of(recording: Recording) -> str:
    if recording.kind == "fixture" and recording.origin:
        return f"fixture, written from a {recording.origin}"
    return {"trace": "chain trace", "flow file": "mitmproxy flow file"}.get(recording.kind, recording.kind)


def render(result: Result, out: TextIO, check: bool = False) -> None:
    rec = result.recording
    against = "plain mitmdump" if result.options.against == "plain" else (
        f"replayguard, recovery.policy {(result.rules.get('recovery') or {}).get('policy', 'pair-aware')}")
    if not check:
        turns = sum(len(s.turns) for s in result.sessions)
        out.write(f"recording: {rec.path} ({_kind_of(rec)}): {len(result.sessions)} "
                  f"session{'s' if len(result.sessions) != 1 else ''}, {turns} turns\n")
        for index, s in enumerate(result.sessions, 1):
            out.write(f"  session {index}: {s.id}  {s.url or '-'}  {len(s.turns)} turns\n")
            scripted = [f"turn {t.number}: {f.describe()} " + (f"after {f.after} events" if f.after else
                                                                  "before the first event")
                        for t in s.turns for f in t.failures if not f.injected]
            scripted += [f"after turn {t.number}, idle: {f.describe()}" for t in s.turns for f in t.idle
                         if not f.injected]
            scripted += [f"turn {t.number}: handshake refused with HTTP {h['status']}" for t in s.turns
                         for h in t.handshakes if h["status"] and not h["injected"]]
            by_rule = [f"turn {t.number}: {f.how or f.describe()}" for t in s.turns for f in t.failures if f.injected]
            by_rule += [f"after turn {t.number}: {f.how or f.describe()}" for t in s.turns for f in t.idle
                        if f.injected]
            if scripted:
                out.write(f"    upstream failures: {'; '.join(scripted)}\n")
            if by_rule:
                out.write(f"    injected by replayguard's fault rules: {'; '.join(by_rule)}\n")
        unused = " (not used: plain mitmdump has no replayguard)" if result.options.against == "plain" else ""
        out.write(f"rules: from {result.rules_from}{unused}\n")
        out.write(f"reproduced through: {result.mitmdump or 'mitmdump'}, reverse mode, in front of the fake upstream "
                  f"scripted with the recording\n")
        for line in result.injected:
            out.write(f"  fake upstream: {line}\n")
        width = max([len(r.recorded.describe()) for r in result.rows] + [30]) + 2
        session = None
        for row in result.rows:
            if row.session != session:
                session = row.session
                out.write(f"session {row.session + 1} ({row.session_id[:8]})\n")
                out.write(f"  {'turn':<6}{'':<9}{'recorded':<{width}}reproduced\n")
            label = "open" if row.turn == 0 else str(row.turn)
            verdict = "same" if row.same else "DIFFERS"
            out.write(f"  {label:<6}{verdict:<9}{row.recorded.describe():<{width}}{row.reproduced.describe()}\n")
    else:
        for row in result.differ:
            label = "handshake" if row.turn == 0 else f"turn {row.turn}"
            out.write(f"DIFFERS session {row.session + 1} ({row.session_id[:8]}) {label}: recorded "
                      f"{row.recorded.describe()} | reproduced {row.reproduced.describe()}\n")
    for note in result.notes:
        out.write(f"note: {note}\n")
    tally: dict[str, int] = {}
    for row in result.rows:
        text = row.reproduced.describe()
        tally[text] = tally.get(text, 0) + 1
    outcomes = ", ".join(f"{text} x{n}" for text, n in tally.items())
    differ = len(result.differ)
    out.write(f"summary: {len(result.rows)} compared, {len(result.rows) - differ} same, {differ} differ "
              f"[recorded vs {against}]; reproduced: {outcomes or '-'}\n")
    if not check:
        if result.trace is not None:
            out.write(f"reproduced run's trace: {result.trace}\n")
        if result.workdir is not None:
            out.write(f"work directory: {result.workdir}\n")


def main(path: str, *, check: bool = False, against: str = "replayguard", policy: str | None = None,
         rules: str | None = None, keep: str | None = None, trace: str | None = None, session: str | None = None,
         write_test: str | None = None, keep_text: bool = False, timeout: float | None = None,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Exit status: 0 every turn reproduced the same, 1 a turn differs, 2 the recording or the run is unusable."""
    try:
        recording = read_recording(path)
        if write_test:
            target = write_fixture(recording, write_test, keep_text, session)
            turns = sum(len(s.turns) for s in select(recording, session))
            out.write(f"wrote {target} ({turns} turns, {'text kept' if keep_text else 'text redacted'}); "
                      f"replay it with: replayguard reproduce {target} --check\n")
            return 0
        if against == "plain" and policy:
            raise ReproduceError("--policy applies to replayguard; a plain mitmdump has no recovery policy")
        options = Options(against, policy, rules, keep, trace, session, timeout)
        result = reproduce(recording, options)
    except (RecordingError, ReproduceError) as e:
        err.write(f"replayguard reproduce: {e}\n")
        return 2
    except OSError as e:  # --keep, --trace or --write-test names a place that cannot be written
        err.write(f"replayguard reproduce: cannot write {e.filename}: {e.strerror or e}\n")
        return 2
    if not result.rows:
        render(result, out, check)
        err.write("replayguard reproduce: nothing was reproduced: the recording has no complete turn\n")
        return 2
    render(result, out, check)
    return 1 if result.differ else 0
