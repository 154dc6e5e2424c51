"""The command line, `replayguard <command>` (or `python -m replayguard <command>`): the developer tools of
:mod:`replayguard.tools`, each behind one subcommand. This module only parses arguments and dispatches."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from .tools.failure import ToolError, describe
from .tools.fake_upstream import FakeUpstream
from .tools.harness import StartFailed


def _refusal(text: str) -> tuple[int, int]:
    count, _, status = text.partition(":")
    try:
        return int(count), int(status or 503)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected COUNT[:STATUS], e.g. 2:503, got {text!r}") from None


def _count(text: str) -> int:
    """A positive integer (sessions, turns, responses)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"expected 0 seconds or more, got {text}")
    return value


def _ws_url(text: str) -> str:
    if not text.startswith(("ws://", "wss://")):
        raise argparse.ArgumentTypeError(f"expected a ws:// or wss:// URL, e.g. ws://127.0.0.1:8000/v1/responses, "
                                         f"got {text!r}")
    return text


def fake_upstream(args: argparse.Namespace) -> int:
    fake = FakeUpstream(host=args.host, port=args.port)
    fake.close_after_responses = args.close_after_responses
    fake.drop_after_responses = args.drop_after_responses
    fake.blackhole_after_responses = args.blackhole_after_responses
    fake.max_connection_age = args.max_connection_age
    fake.response_delay = args.response_delay
    if args.refuse:
        fake.refuse_next(*args.refuse)
    try:
        fake.start()
    except OSError as e:  # the port is in use, the host is not an address of this machine
        raise ToolError(f"cannot listen on {args.host}:{args.port}: {describe(e)}") from None
    print(f"fake upstream listening on {fake.url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return 0


def client(args: argparse.Namespace) -> int:
    from .tools.client import run

    headers = dict(h.split(":", 1) for h in args.header)
    return run(args.url, args.turns, {k.strip(): v.strip() for k, v in headers.items()}, store=args.store,
               connect_to=args.connect, cafile=args.cacert, proxy=args.proxy, timeout=args.timeout)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}") from None


def _header(text: str) -> str:
    if ":" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return text


def trace(args: argparse.Namespace) -> int:
    from .tools.viewer import main as view

    return view(args.file, as_json=args.json, session=args.session, check=args.check, html=args.html)


def soak(args: argparse.Namespace) -> int:
    from .tools.soak import report, run

    try:
        counts = run(args.sessions, args.turns, args.seed)
    except StartFailed as e:
        raise ToolError(e.reason) from None
    print(report(counts), flush=True)
    return 0 if counts.ok() else 1


def bench(args: argparse.Namespace) -> int:
    from .tools.bench import run

    try:
        print(run(quick=args.quick), flush=True)
    except StartFailed as e:
        raise ToolError(e.reason) from None
    return 0


def reproduce(args: argparse.Namespace) -> int:
    from .tools.reproduce import main as run

    return run(args.recording, check=args.check, against=args.against, policy=args.policy, rules=args.rules,
               keep=args.keep, trace=args.trace, session=args.session, write_test=args.write_test,
               keep_text=args.keep_text, timeout=args.timeout)


def run(args: argparse.Namespace) -> int:
    from .tools.run import Options, main as run_command

    options = Options(command=args.run_command, rules=args.rules, trace=args.trace, web=args.web, sets=args.set,
                      flows=args.flows, log=args.log)
    return run_command(options, program=program_name())


def program_name(argv0: str | None = None) -> str:
    """What the user typed to run us: `replayguard` for the console script, `python -m replayguard` otherwise."""
    name = os.path.basename(argv0 if argv0 is not None else sys.argv[0])
    return "python -m replayguard" if name in ("__main__.py", "-c", "") else name


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless its text states it or there is none (a flag, nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name(), formatter_class=_Help,
        description="replayguard's developer tools. `COMMAND --help` says what each does, its options with their "
                    "defaults, and how long it runs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=description, formatter_class=_Help)

    p = command(
        "fake-upstream", "run a faithful fake Responses WebSocket upstream (no tokens spent); runs until Ctrl-C",
        "A fake Responses WebSocket upstream on this machine: a connection-local cache, store semantics, call_id "
        "validation and the real event sequence. Its scripted model: a user message that contains TOOL (e.g. "
        "'please run TOOL ls') gets an exec_command function_call (TOOL2: two calls), a function_call_output gets "
        "'tool said: <output>', anything else 'reply to: <text>'. Serves ws://HOST:PORT/<any path>. Runs until Ctrl-C or SIGTERM. Exit status 2 when it "
        "cannot listen (port in use).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=_port, default=0, help="port to listen on; 0 picks a free one (printed)")
    p.add_argument("--close-after-responses", type=_count, metavar="N",
                   help="close each connection with 1011 after its Nth response (default: never)")
    p.add_argument("--drop-after-responses", type=_count, metavar="N",
                   help="cut each connection's TCP (no close frame) after its Nth response (default: never)")
    p.add_argument("--blackhole-after-responses", type=_count, metavar="N",
                   help="each connection stops answering anything, pings included, after its Nth response "
                        "(default: never)")
    p.add_argument("--max-connection-age", type=_seconds, metavar="SECONDS",
                   help="the upstream's 60-minute limit, shortened: websocket_connection_limit_reached, then close "
                        "(default: no limit)")
    p.add_argument("--refuse", type=_refusal, metavar="COUNT[:STATUS]",
                   help="refuse the first COUNT handshakes with HTTP STATUS (STATUS default 503; default: refuse none)")
    p.add_argument("--response-delay", type=_seconds, default=0.0, metavar="SECONDS",
                   help="wait this long before answering each response.create")
    p.set_defaults(run=fake_upstream)

    c = command(
        "client", "drive a tool-call chain over a Responses WebSocket (for the recipe); runs for --turns turns",
        "A scripted Responses WebSocket client: odd turns ask for a tool call ('please run TOOL ls'), even turns "
        "send its function_call_output chained with previous_response_id, store=false, as Codex does. One line per "
        "turn. Runs for its turns (about a second on the fake upstream), each handshake and event waiting at most "
        "--timeout. Exit status: 0 every turn completed; 1 a turn ended in an error event, or the connection closed "
        "or went silent; 2 no WebSocket could be opened (refused, unreachable, HTTP error, TLS not trusted).")
    c.add_argument("url", type=_ws_url, help="e.g. ws://127.0.0.1:8000/v1/responses")
    c.add_argument("--turns", type=_count, default=6, help="turns to send")
    c.add_argument("--header", type=_header, action="append", default=[], metavar="NAME:VALUE",
                   help="a handshake header, e.g. 'Authorization: Bearer sk-...' (repeatable; default: none)")
    c.add_argument("--store", action="store_true", help="store=true (default: store=false, like Codex)")
    c.add_argument("--connect", type=_address, metavar="HOST:PORT",
                   help="open the TCP connection here; the URL's host is still the name sent (SNI, Host) "
                        "(default: the URL's host)")
    c.add_argument("--cacert", metavar="FILE",
                   help="CA certificate to trust for wss://, e.g. ~/.mitmproxy/mitmproxy-ca-cert.pem "
                        "(default: the system's)")
    c.add_argument("--proxy", metavar="URL", help="go through this proxy (http://, socks5h://) (default: none)")
    c.add_argument("--timeout", type=_seconds, default=30, metavar="SECONDS",
                   help="for the handshake and for each event")
    c.set_defaults(run=client)

    t = command(
        "trace", "show a recording (trace, flow file, fixture, Codex rollout, HAR) as per-session timelines, with a "
        "diagnosis; seconds",
        "Reads a replayguard trace (--set replayguard_trace=FILE), a mitmproxy flow file (mitmdump -w FILE), a "
        "fixture (reproduce --write-test), a Codex CLI session file ($CODEX_HOME/sessions/.../rollout-*.jsonl) or a "
        "HAR export (mitmdump --set hardump=FILE, a browser's Save as HAR), told apart by content, and prints each "
        "session's turns, recoveries, calls and problems. Reads the file and exits (seconds). Exit status: 0, or 1 "
        "when the file cannot be read, or 2 with --check when a chain problem was found.")
    t.add_argument("file", help="trace (.jsonl), flow file, fixture (.json), Codex rollout or HAR file")
    t.add_argument("--json", action="store_true", help="the sessions, turns, calls and problems as JSON")
    t.add_argument("--session", metavar="ID", help="only the session whose id starts with ID (default: all)")
    t.add_argument("--check", action="store_true", help="exit 2 when a problem (orphaned call_id, ...) is found")
    t.add_argument("--html", metavar="FILE", help="write the chain as one self-contained HTML page to FILE (default: none, the text timeline only)")
    t.set_defaults(run=trace)

    k = command(
        "soak", "concurrent tool-call sessions through a randomly failing upstream; about 30 s",
        "SESSIONS concurrent tool-call sessions of TURNS turns through a real mitmdump with replayguard, while the "
        "fake upstream closes, drops, silences and refuses connections at random (under --seed) and the clients "
        "leave mid-turn, present another key's response id and go silent. Runs about 30 s at the defaults on 2 "
        "cores (22 s measured), longer with more sessions or turns. Exit status 1 unless nothing was lost, "
        "crossed or leaked.")
    k.add_argument("--sessions", type=_count, default=100, help="concurrent sessions")
    k.add_argument("--turns", type=_count, default=20, help="turns per session")
    k.add_argument("--seed", type=int, default=1, help="seed of the random failures (the same seed, the same run)")
    k.set_defaults(run=soak)

    b = command(
        "bench", "benchmark replayguard against plain mitmdump (offline); about 8 minutes, --quick about 30 s",
        "The same workloads, offline, straight to the fake upstream, through plain mitmdump and through mitmdump "
        "with replayguard, in one run; prints a table (compare the ratios). Runs about 8 minutes on 2 cores; "
        "--quick about 30 s.")
    b.add_argument("--quick", action="store_true", help="a smaller run (about 30 s), for CI smoke tests")
    b.set_defaults(run=bench)

    r = command(
        "reproduce", "run a recorded session again offline and compare the outcomes turn by turn; as long as the "
        "recorded turns, plus seconds",
        "Reads a chain trace written with trace.bodies: full, a mitmproxy flow file (mitmdump -w), a fixture "
        "(--write-test), a Codex CLI rollout or a HAR export, and runs it again: the fake upstream answers each turn "
        "as recorded and fails where the upstream failed, mitmdump runs the recording's rules, and a client sends "
        "the recorded messages. Runs about as long as the recorded turns took plus a few seconds to start mitmdump; "
        "--write-test exits at once. Exit status: 0 every turn had the recorded outcome, 1 a turn differs, 2 the "
        "recording cannot be reproduced.")
    r.add_argument("recording", help="trace (.jsonl), flow file, fixture (.json), Codex rollout or HAR file")
    r.add_argument("--check", action="store_true", help="print only the differences and the summary (for CI)")
    r.add_argument("--against", choices=["replayguard", "plain"], default="replayguard",
                   help="plain: through mitmdump without replayguard, to see what happens without it")
    r.add_argument("--policy", choices=["pair-aware", "strict"],
                   help="override recovery.policy (default: the recording's)")
    r.add_argument("--rules", metavar="FILE", help="run with this rules.yaml (default: the recording's rules)")
    r.add_argument("--keep", metavar="DIR",
                   help="keep the work directory (rules, trace, flows, mitmdump log) here (default: removed)")
    r.add_argument("--trace", metavar="FILE", help="where the reproduced run's trace goes (default: a temp file)")
    r.add_argument("--session", metavar="ID", help="only the sessions whose id starts with ID (default: all)")
    r.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                   help="per turn (default: from the rules' timers)")
    r.add_argument("--write-test", metavar="PATH", help="write the recording as a compact, redacted fixture and exit (default: reproduce it)")
    r.add_argument("--keep-text", action="store_true", help="with --write-test: keep the message text")
    r.set_defaults(run=reproduce)
    u = commands.add_parser(
        "run", help="run COMMAND (codex, an openai SDK program) behind replayguard: proxy, CA and environment set "
                    "up; runs until COMMAND exits", formatter_class=_Help,
        usage="%(prog)s [--rules FILE] [--trace FILE|DIR/] [--web] [-w FILE] [--log FILE|-] [--set OPTION=VALUE ...] "
              "-- COMMAND [ARGS...]",
        description="Starts mitmdump with replayguard on a free 127.0.0.1 port (regular mode, a fresh CA), runs "
                    "COMMAND in the foreground with HTTPS_PROXY and the CA variables its clients read set, then "
                    "stops the proxy and prints a summary of the run's sessions, turns, recoveries and fail-closes. "
                    "Runs until COMMAND exits, plus a second or two to start and stop the proxy. Exit status: COMMAND's (128+N when signal N killed it); 127 COMMAND not found; 2 bad input or "
                    "a proxy that cannot start.")
    u.add_argument("--rules", metavar="FILE", help="replayguard rules file (default: rules.yaml beside addon.py)")
    u.add_argument("--trace", metavar="FILE|DIR/", help="write the chain trace here (default: the run's work dir)")
    u.add_argument("--web", action="store_true", help="run mitmweb instead of mitmdump (its URL is printed)")
    u.add_argument("-w", dest="flows", metavar="FILE", help="save the flows to FILE (default: not saved; with --web: flows.mitm in the work dir)")
    u.add_argument("--log", metavar="FILE|-", help="mitmproxy's output (default: a file in the work dir; - for "
                                                   "this terminal)")
    u.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="a mitmproxy option, e.g. ssl_verify_upstream_trusted_ca=ca.pem or mode=upstream:URL "
                        "(repeatable; default: none)")
    u.add_argument("run_command", nargs=argparse.REMAINDER, metavar="COMMAND", help="the program and its arguments")
    u.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = f"{program_name()} {args.command}"
    try:
        return args.run(args)
    except ToolError as e:
        print(f"{name}: {e}", file=sys.stderr, flush=True)
        return e.status
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # whoever read the output left (`| head`): not worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
