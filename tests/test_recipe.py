"""The README's offline recipe, step by step as written (ports picked free instead of 9000/8000)."""

from __future__ import annotations

import re
import subprocess
import sys

from replayguard.tools.harness import ROOT, Mitmdump
from test_trace import of, records


def test_readme_recipe(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "--set replayguard_rules=examples/faults.yaml --set replayguard_trace=trace.jsonl" in readme
    fake = subprocess.Popen([sys.executable, "-m", "replayguard", "fake-upstream", "--port", "0"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    proxy = None
    try:
        port = int(re.search(r"ws://127\.0\.0\.1:(\d+)", fake.stdout.readline()).group(1))
        trace = tmp_path / "trace.jsonl"
        proxy = Mitmdump(tmp_path / "mitm", ["--mode", f"reverse:http://127.0.0.1:{port}",
                                             "--set", f"replayguard_rules={ROOT / 'examples' / 'faults.yaml'}",
                                             "--set", f"replayguard_trace={trace}"], None).start()
        run = subprocess.run([sys.executable, "-m", "replayguard", "client", f"{proxy.url}/v1/responses",
                              "--turns", "6", "--header", "Authorization: Bearer sk-recipe-SECRET-0000"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert run.returncode == 0, run.stdout + run.stderr
        lines = run.stdout.splitlines()
        assert len(lines) == 6 and all(" completed in " in line for line in lines)
        assert "got: function_call(call_1)" in lines[0] and "sent: function_call_output(call_1)" in lines[1]
        recs = records(trace, until="session.end")
        assert [(f["phase"], f["kind"], f["turn"]) for f in of(recs, "fault")] == [
            ("fired", "drop", 2), ("fired", "error", 4), ("applied", "error", 5)]
        recoveries = of(recs, "recovery")
        assert [(r["turn"], r["trigger"]) for r in recoveries] == [
            (3, "upstream connection dropped"), (5, "upstream answered previous_response_not_found")]
        for r in recoveries:
            kinds = [(i["type"], i.get("call_id")) for i in r["input"]]
            for n, (kind, call_id) in enumerate(kinds):
                if kind == "function_call_output":
                    assert ("function_call", call_id) in kinds[:n]
        assert "SECRET" not in trace.read_text() and "SECRET" not in proxy.log
    finally:
        if proxy is not None:
            proxy.stop()
        fake.terminate()
        fake.wait(10)
