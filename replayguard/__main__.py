"""The command line, `replayguard <command>` (or `python -m replayguard <command>`): the developer tools of
:mod:`replayguard.tools`, each behind one subcommand. This module only parses arguments and dispatches."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from .tools.fake_upstream import FakeUpstream


def _refusal(text: str) -> tuple[int, int]:
    count, _, status = text.partition(":")
    try:
        return int(count), int(status or 503)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected COUNT[:STATUS], e.g. 2:503, got {text!r}") from None


def fake_upstream(args: argparse.Namespace) -> int:
    fake = FakeUpstream(host=args.host, port=args.port)
    fake.close_after_responses = args.close_after_responses
    fake.drop_after_responses = args.drop_after_responses
    fake.blackhole_after_responses = args.blackhole_after_responses
    fake.max_connection_age = args.max_connection_age
    fake.response_delay = args.response_delay
    if args.refuse:
        fake.refuse_next(*args.refuse)
    fake.start()
    print(f"fake upstream listening on {fake.url} (scripted model: say TOOL for a tool call)", flush=True)
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

    counts = run(args.sessions, args.turns, args.seed)
    print(report(counts), flush=True)
    return 0 if counts.ok() else 1


def bench(args: argparse.Namespace) -> int:
    from .tools.bench import run

    print(run(quick=args.quick), flush=True)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name())
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("fake-upstream", help="run a faithful fake Responses WebSocket upstream (no tokens spent)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    p.add_argument("--close-after-responses", type=int, default=None, metavar="N",
                   help="close each connection with 1011 after its Nth response")
    p.add_argument("--drop-after-responses", type=int, default=None, metavar="N",
                   help="cut each connection's TCP (no close frame) after its Nth response")
    p.add_argument("--blackhole-after-responses", type=int, default=None, metavar="N",
                   help="each connection stops answering anything, pings included, after its Nth response")
    p.add_argument("--max-connection-age", type=float, default=None, metavar="SECONDS",
                   help="the upstream's 60-minute limit, shortened: websocket_connection_limit_reached, then close")
    p.add_argument("--refuse", type=_refusal, default=None, metavar="COUNT[:STATUS]",
                   help="refuse the first COUNT handshakes with HTTP STATUS (default 503)")
    p.add_argument("--response-delay", type=float, default=0.0, metavar="SECONDS")
    p.set_defaults(run=fake_upstream)
    c = commands.add_parser("client", help="drive a tool-call chain over a Responses WebSocket (for the recipe)")
    c.add_argument("url", help="e.g. ws://127.0.0.1:8000/v1/responses")
    c.add_argument("--turns", type=int, default=6)
    c.add_argument("--header", type=_header, action="append", default=[], metavar="NAME:VALUE")
    c.add_argument("--store", action="store_true", help="store=true (default: store=false, like Codex)")
    c.add_argument("--connect", type=_address, metavar="HOST:PORT",
                   help="open the TCP connection here; the URL's host is still the name sent (SNI, Host)")
    c.add_argument("--cacert", metavar="FILE", help="CA certificate to trust for wss:// (e.g. mitmproxy's)")
    c.add_argument("--proxy", metavar="URL", help="go through this proxy (http://, socks5h://); default: none")
    c.add_argument("--timeout", type=float, default=30, metavar="SECONDS",
                   help="for the handshake and for each event (default 30)")
    c.set_defaults(run=client)
    t = commands.add_parser(
        "trace", help="show a recording (trace, flow file, fixture, Codex rollout, HAR) as per-session timelines, "
                      "with a diagnosis",
        description="Reads a replayguard trace (--set replayguard_trace=FILE), a mitmproxy flow file "
                    "(mitmdump -w FILE), a fixture (reproduce --write-test), a Codex CLI session file "
                    "($CODEX_HOME/sessions/.../rollout-*.jsonl) or a HAR export (mitmdump --set hardump=FILE, "
                    "a browser's Save as HAR), told apart by content. Exit status: 0, or 1 when the file cannot be "
                    "read, or 2 with --check when a chain problem was found.")
    t.add_argument("file")
    t.add_argument("--json", action="store_true", help="the sessions, turns, calls and problems as JSON")
    t.add_argument("--session", metavar="ID", help="only the session whose id starts with ID")
    t.add_argument("--check", action="store_true", help="exit 2 when a problem (orphaned call_id, ...) is found")
    t.add_argument("--html", metavar="FILE", help="write the chain as one self-contained HTML page to FILE")
    t.set_defaults(run=trace)
    k = commands.add_parser("soak", help="concurrent tool-call sessions through a randomly failing upstream")
    k.add_argument("--sessions", type=int, default=100)
    k.add_argument("--turns", type=int, default=20)
    k.add_argument("--seed", type=int, default=1)
    k.set_defaults(run=soak)
    b = commands.add_parser("bench", help="benchmark replayguard against plain mitmdump (offline)")
    b.add_argument("--quick", action="store_true", help="a smaller run (under a minute), for CI smoke tests")
    b.set_defaults(run=bench)
    r = commands.add_parser(
        "reproduce", help="run a recorded session again offline and compare the outcomes turn by turn",
        description="Reads a chain trace written with trace.bodies: full, a mitmproxy flow file (mitmdump -w), a "
                    "fixture (--write-test), a Codex CLI rollout or a HAR export, and runs it again: the fake "
                    "upstream answers each turn as recorded and fails where the upstream failed, mitmdump runs the "
                    "recording's rules, and a client sends the recorded messages. Exit status: 0 every turn had the "
                    "recorded outcome, 1 a turn differs, 2 the recording cannot be reproduced.")
    r.add_argument("recording", help="trace (.jsonl), flow file, fixture (.json), Codex rollout or HAR file")
    r.add_argument("--check", action="store_true", help="print only the differences and the summary (for CI)")
    r.add_argument("--against", choices=["replayguard", "plain"], default="replayguard",
                   help="plain: through mitmdump without replayguard, to see what happens without it")
    r.add_argument("--policy", choices=["pair-aware", "strict"], help="override recovery.policy")
    r.add_argument("--rules", metavar="FILE", help="run with this rules.yaml instead of the recording's")
    r.add_argument("--keep", metavar="DIR", help="keep the work directory (rules, trace, flows, mitmdump log) here")
    r.add_argument("--trace", metavar="FILE", help="where the reproduced run's trace goes (default: a temp file)")
    r.add_argument("--session", metavar="ID", help="only the sessions whose id starts with ID")
    r.add_argument("--timeout", type=float, metavar="SECONDS", help="per turn (default: from the rules' timers)")
    r.add_argument("--write-test", metavar="PATH", help="write the recording as a compact, redacted fixture and exit")
    r.add_argument("--keep-text", action="store_true", help="with --write-test: keep the message text")
    r.set_defaults(run=reproduce)
    u = commands.add_parser(
        "run", help="run COMMAND (codex, an openai SDK program) behind replayguard: proxy, CA and environment set up",
        usage="%(prog)s [--rules FILE] [--trace FILE|DIR/] [--web] [-w FILE] [--log FILE|-] [--set OPTION=VALUE ...] "
              "-- COMMAND [ARGS...]",
        description="Starts mitmdump with replayguard on a free 127.0.0.1 port (regular mode, a fresh CA), runs "
                    "COMMAND in the foreground with HTTPS_PROXY and the CA variables its clients read set, then "
                    "stops the proxy and prints a summary of the run's sessions, turns, recoveries and fail-closes. "
                    "Exit status: COMMAND's (128+N when signal N killed it); 127 COMMAND not found; 2 bad input or "
                    "a proxy that cannot start.")
    u.add_argument("--rules", metavar="FILE", help="replayguard rules file (default: rules.yaml beside addon.py)")
    u.add_argument("--trace", metavar="FILE|DIR/", help="write the chain trace here (default: the run's work dir)")
    u.add_argument("--web", action="store_true", help="run mitmweb instead of mitmdump (its URL is printed)")
    u.add_argument("-w", dest="flows", metavar="FILE", help="save the flows to FILE (with --web: the work dir)")
    u.add_argument("--log", metavar="FILE|-", help="mitmproxy's output (default: a file in the work dir; - for "
                                                   "this terminal)")
    u.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="a mitmproxy option, e.g. ssl_verify_upstream_trusted_ca=ca.pem or mode=upstream:URL")
    u.add_argument("run_command", nargs=argparse.REMAINDER, metavar="COMMAND", help="the program and its arguments")
    u.set_defaults(run=run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
