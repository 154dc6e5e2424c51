"""The command line: it names itself as it was run, every subcommand and option says what it does, its default and
how long the command runs, and every tool fails on an expected error (connection refused, port in use, file
missing, bad argument) in one line on stderr, with no traceback, and a non-zero exit status."""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from tls import self_signed_context

from replayguard import __main__ as cli
from replayguard.__main__ import build_parser, program_name
from replayguard.tools.fake_upstream import FakeUpstream
from replayguard.tools.harness import ROOT, StartFailed

FIXTURE = ROOT / "tests" / "fixtures" / "cache_loss.json"


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "replayguard", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def one_line_failure(result: subprocess.CompletedProcess[str], status: int, pattern: str) -> str:
    """The command failed with ``status`` and said why in one line on stderr matching ``pattern``."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# -- names and help ------------------------------------------------------------------------------------------------
def test_program_name():
    assert program_name("/venv/bin/replayguard") == "replayguard"
    assert program_name("/src/replayguard/__main__.py") == "python -m replayguard"


def test_help_names_the_console_script_and_the_module():
    script = Path(sys.executable).parent / "replayguard"
    as_script = subprocess.run([str(script), "trace", "--help"], capture_output=True, text=True, check=True)
    assert as_script.stdout.startswith("usage: replayguard trace ")
    as_module = run("--help")
    assert as_module.returncode == 0
    assert as_module.stdout.startswith("usage: python -m replayguard ")
    assert "fake-upstream" in as_module.stdout and "trace" in as_module.stdout


def subcommands() -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """name -> (its parser, its one-line summary in the top-level help)."""
    (group,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    summaries = {choice.dest: choice.help for choice in group._choices_actions}
    return {name: (parser, summaries[name]) for name, parser in group.choices.items()}


DURATION = re.compile(r"runs until Ctrl-C|runs until COMMAND exits|runs for --turns turns|about \d+ (minutes|s)\b|"
                      r"seconds")


def test_every_subcommand_says_what_it_does_and_how_long_it_runs():
    commands = subcommands()
    assert set(commands) == {"fake-upstream", "client", "trace", "soak", "bench", "reproduce", "run"}
    for name, (parser, summary) in commands.items():
        assert summary and DURATION.search(summary), (name, summary)
        assert parser.description and re.search(r"\b(Runs|Reads the file and exits)\b", parser.description), name


def test_every_option_has_help_and_states_its_default():
    for name, (parser, _) in subcommands().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest}: no help"
            shown = formatter._expand_help(action)  # the text --help prints for it
            if action.option_strings and action.nargs != 0:  # a flag (nargs 0) is off unless given
                assert "default" in shown, f"{name} {action.option_strings[-1]}: no default in {shown!r}"
            if action.default not in (None, False, []):
                assert str(action.default) in shown, f"{name} {action.dest}: {shown!r}"


def test_the_fake_upstream_explains_its_scripted_model_in_its_help():
    help_text = " ".join(run("fake-upstream", "--help").stdout.split())
    assert "contains TOOL" in help_text and "function_call" in help_text and "Runs until Ctrl-C" in help_text


# -- expected errors: one line, non-zero ---------------------------------------------------------------------------
def test_client_to_a_closed_port(closed_port):
    one_line_failure(run("client", f"ws://127.0.0.1:{closed_port}/v1/responses"), 2,
                     rf"^python -m replayguard client: cannot connect to ws://127\.0\.0\.1:{closed_port}/v1/responses:"
                     r" connection refused$")


def test_client_through_a_proxy_that_is_not_there(fake, closed_port):
    one_line_failure(run("client", f"ws://127.0.0.1:{fake.port}/v1/responses", "--proxy",
                         f"http://127.0.0.1:{closed_port}"), 2, r"through http://127\.0\.0\.1:\d+: connection refused$")


def test_client_refused_handshake_shows_the_status_and_body(fake):
    fake.refuse_next(1, 503)
    line = one_line_failure(run("client", f"{fake.url}/v1/responses"), 2,
                            r"answered the WebSocket handshake with HTTP 503")
    assert len(line) < 500


def test_client_untrusted_tls(tmp_path):
    upstream = FakeUpstream(ssl_context=self_signed_context(tmp_path)).start()
    try:
        one_line_failure(run("client", f"wss://127.0.0.1:{upstream.port}/v1/responses", "--timeout", "10"), 2,
                         r"TLS certificate not trusted: .*--cacert")
    finally:
        upstream.stop()


def test_client_connection_closed_mid_run(fake):
    fake.close_after_responses = 1
    result = run("client", f"{fake.url}/v1/responses", "--turns", "3")
    assert result.stdout.startswith("turn 1: ") and result.stdout.count("\n") == 1
    one_line_failure(result, 1, r"turn 2: the connection closed before the turn ended: close 1011")


def test_client_silent_server(fake):
    fake.mute = True  # the handshake completes, then nothing is ever said
    one_line_failure(run("client", f"{fake.url}/v1/responses", "--timeout", "0.5"), 1,
                     r"turn 1: no event within 0\.5 s \(--timeout\)$")


def test_fake_upstream_on_a_port_in_use(busy_port):
    one_line_failure(run("fake-upstream", "--port", str(busy_port)), 2,
                     rf"fake-upstream: cannot listen on 127\.0\.0\.1:{busy_port}: address already in use$")


def test_fake_upstream_start_raises_the_bind_error_at_once(busy_port):
    with pytest.raises(OSError, match="address already in use"):
        FakeUpstream(port=busy_port).start()


@pytest.mark.parametrize(("args", "pattern"), [
    (("trace", "missing.jsonl"), r"cannot read missing\.jsonl: No such file or directory"),
    (("reproduce", "missing.jsonl"), r"cannot read missing\.jsonl: No such file or directory"),
    (("client", "wss://127.0.0.1:9/v1/responses", "--cacert", "missing.pem"),
     r"cannot use CA file missing\.pem: no such file or directory"),
    (("reproduce", str(FIXTURE), "--keep", "/proc/none/keep"), r"cannot write /proc/none: No such file or directory"),
], ids=["trace", "reproduce", "client-cacert", "reproduce-keep"])
def test_a_missing_file(args, pattern):
    result = run(*args)
    assert result.returncode in (1, 2)
    one_line_failure(result, result.returncode, pattern)


@pytest.mark.parametrize("args", [
    ("client", "http://127.0.0.1:8000/v1/responses"),
    ("client", "ws://127.0.0.1:8000/v1/responses", "--turns", "0"),
    ("client", "ws://127.0.0.1:8000/v1/responses", "--header", "no-colon"),
    ("client", "ws://127.0.0.1:8000/v1/responses", "--connect", "nowhere"),
    ("fake-upstream", "--port", "70000"),
    ("fake-upstream", "--refuse", "two"),
    ("fake-upstream", "--response-delay", "-1"),
    ("soak", "--sessions", "0"),
    ("soak", "--turns", "many"),
    ("bench", "--rounds", "3"),
    ("reproduce", str(FIXTURE), "--against", "nothing"),
    ("trace",),
    ("nosuchcommand",),
])
def test_a_bad_argument(args):
    result = run(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"python -m replayguard"), result.stderr
    assert "error: " in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["soak", "bench"])
def test_mitmdump_that_does_not_start_is_one_line(command, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise StartFailed("mitmdump exited with 1", "Loading script addon.py\nsomething went wrong here\n")

    module = __import__(f"replayguard.tools.{command}", fromlist=["run"])
    monkeypatch.setattr(module, "run", fail)
    assert cli.main([command]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"{program_name()} {command}: mitmdump exited with 1: something went wrong here"]


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    import replayguard.tools.soak as soak

    monkeypatch.setattr(soak, "run", interrupted)
    assert cli.main(["soak"]) == 130
    assert capsys.readouterr().err.strip().endswith("soak: interrupted")
