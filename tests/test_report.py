"""`replayguard trace FILE --html PAGE`: the page opens from every format `trace` reads, and a real headless Chromium
shows what the model holds: a row per turn, a marker per replay, fault, loss and fail-close in the row where it
happened, every call linked to its output, ORPHANED outputs, items that open to their JSON, and nothing fetched.
`REPLAYGUARD_DOCS=1 pytest tests/test_report.py` refreshes the README's screenshot (docs/report.png)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from browser import Browser, chromium
from test_har import Recorded, record

from replayguard.core.pairing import OUTPUT_CALLS
from replayguard.tools.harness import ROOT
from replayguard.tools.sources import trace_records
from replayguard.tools.viewer import build_sessions

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DOCS_SCREENSHOT = ROOT / "docs" / "report.png"
needs_browser = pytest.mark.skipif(chromium() is None, reason="chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    yield record(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if chromium() is None:
        pytest.skip("chromium is not installed (.ci/run installs it with apt-get)")
    with Browser(1400, 1000) as b:
        yield b


def write_page(source: Path, target: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "replayguard", "trace", str(source), "--html", str(target)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {target} (")
    return target.read_text()


def expected(source: Path) -> dict[str, int]:
    """What the page must draw, counted from the model the text output is made of."""
    records, _, _ = trace_records(source)
    views = build_sessions(records)
    events = [r["event"] for r in records]
    orphaned = sum(1 for v in views for t in v.turns for i in t.input if i.get("type") in OUTPUT_CALLS
                   and v.calls.get(i.get("call_id")) is not None and v.calls[i["call_id"]].state == "ORPHANED")
    return {"sessions": len(views), "turns": sum(len(v.turns) for v in views), "replay": events.count("recovery"),
            "fault": events.count("fault"), "fail-close": events.count("fail_close"),
            "loss": events.count("upstream.lost") + sum(1 for r in records if r["event"] == "handshake"
                                                        and not r.get("ok")),
            "orphaned": orphaned, "problems": sum(len(v.problems) for v in views)}


DRAWN = """(() => {
  const q = s => document.querySelectorAll(s).length;
  const links = [...document.querySelectorAll('a.call-link, a.marker, .label a')];
  return {
    sessions: q('section.session'), turns: q('.turn[data-turn]:not([data-turn="open"])'),
    replay: q('.track .marker.replay'), fault: q('.track .marker.fault'), loss: q('.track .marker.loss'),
    'fail-close': q('.track .marker.fail-close'), orphaned: q('details.item.orphaned .orphan-badge'),
    problems: q('ul.problems li'),
    dangling: links.filter(a => !document.querySelector(a.getAttribute('href'))).map(a => a.getAttribute('href')),
    fetched: performance.getEntriesByType('resource').length,
    active: q('script, img, iframe, link, object, embed, [src]'),
    csp: document.querySelector('meta[http-equiv="Content-Security-Policy"]')?.content || '',
  };
})()"""


def formats(recorded: Recorded) -> dict[str, Path]:
    return {"trace": recorded.trace, "flow file": recorded.flows, "HAR": recorded.har,
            "fixture (tool chain with a drop)": FIXTURES / "tool_chain_drop.json",
            "fixture (orphaned output)": FIXTURES / "orphaned_output.json",
            "codex rollout (No tool call found)": FIXTURES / "codex" / "no_tool_call_found.jsonl",
            "codex rollout (response broke off)": FIXTURES / "codex" / "drop_mid_response.jsonl"}


@needs_browser
def test_the_page_draws_the_model_from_every_format(recorded, browser, tmp_path):
    for name, source in formats(recorded).items():
        page_path = tmp_path / f"{name.split()[0]}-{source.stem}.html"
        html = write_page(source, page_path)
        assert "SECRET" not in html, name
        want = expected(source)
        page = browser.open(page_path.as_uri())
        page.wait_for_text("replayguard chain report")
        page.wait_loaded()
        drawn = page.eval(DRAWN)
        assert drawn["dangling"] == [] and drawn["fetched"] == 0 and drawn["active"] == 0, (name, drawn)
        assert drawn["csp"].startswith("default-src 'none'"), name
        assert {k: drawn[k] for k in want} == want, name
        # Every item opens to its JSON: a call's JSON names its call_id.
        calls = page.eval("[...document.querySelectorAll('details.item.call')].length")
        if calls:
            opened = page.eval("""(() => { const d = document.querySelector('details.item.call');
                d.querySelector('summary').click();
                const pre = d.querySelector('pre');
                return [d.open, pre.offsetHeight > 0, JSON.parse(pre.textContent).call_id,
                        d.querySelector('summary').textContent]; })()""")
            assert opened[0] and opened[1] and opened[2] and opened[2] in opened[3], (name, opened)


@needs_browser
def test_a_recovered_session_shows_where_it_recovered_and_what_was_orphaned(recorded, browser, tmp_path):
    page_path = tmp_path / "report.html"
    write_page(recorded.trace, page_path)
    page = browser.open(page_path.as_uri())
    page.wait_for_text("replayguard chain report")
    page.wait_loaded()
    # The replays are in the rows of the turns they replayed; the drop and the cache loss before them.
    assert page.eval("!!document.querySelector('#s0-t3 .track .marker.replay')")
    assert page.eval("!!document.querySelector('#s0-t5 .track .marker.replay')")
    assert page.eval("!!document.querySelector('#s0-t2 .track .marker.fault')")
    assert page.eval("document.querySelector('#s0-t3 .events').innerText").count(
        "turn 3 replayed on upstream #2 after upstream connection dropped") == 1
    # Turns in time order on one axis.
    lefts = page.eval("[...document.querySelectorAll('#s0 .turn .bar')].map(b => parseFloat(b.style.left))")
    assert len(lefts) == 6 and lefts == sorted(lefts) and lefts[0] < lefts[-1]
    # A call links to its output in the next turn and back.
    link = page.eval("document.querySelector('#s0-t1 a.to-output').getAttribute('href')")
    assert page.eval(f"document.querySelector('{link}').closest('.turn').id") == "s0-t2"
    back = page.eval(f"document.querySelector('{link} a.to-call').getAttribute('href')")
    assert page.eval(f"document.querySelector('{back}').closest('.turn').id") == "s0-t1"
    # The fail-close and the orphans stand out.
    assert page.eval("!!document.querySelector('#s1 .track .marker.fail-close')")
    assert page.eval("document.querySelector('#s1').classList.contains('has-problems')")
    orphan = page.eval("[...document.querySelectorAll('details.item.orphaned')].map(d => d.textContent)")
    assert any("call_never_made" in t and "ORPHANED" in t for t in orphan)
    assert any("call_lost" in t and "ORPHANED" in t for t in orphan)
    assert page.eval("getComputedStyle(document.querySelector('.orphan-badge')).backgroundColor") == "rgb(217, 45, 32)"
    shot = tmp_path / "report.png"
    page.screenshot(shot)
    assert shot.stat().st_size > 10_000
    if os.environ.get("REPLAYGUARD_DOCS"):  # refresh the README's screenshot from this run
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(shot, DOCS_SCREENSHOT)


HOSTILE = "</pre><script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"


def hostile_trace(path: Path) -> None:
    def rec(event: str, ts: float, **fields: Any) -> str:
        return json.dumps({"ts": ts, "session": "s'><svg onload=alert(1)>", "event": event, **fields}) + "\n"
    path.write_text(
        rec("session.start", 1, url="ws://h/v1/responses?x=" + HOSTILE) +
        rec("turn.start", 2, turn=1, input=[{"type": "message", "role": "user",
                                             "text": "my key sk-proj-SECRETSECRET123456 " + HOSTILE}]) +
        rec("turn.end", 3, turn=1, status="completed", response_id="resp_\"><b>x", output=[
            {"type": "function_call", "call_id": "c'\"><img src=y>", "name": HOSTILE}], ms=1) +
        rec("turn.start", 4, turn=2, previous_response_id=None, input=[
            {"type": "function_call_output", "call_id": "c'\"><img src=y>"}]) +
        rec("turn.end", 5, turn=2, status="error", response_id=None, output=[], ms=1,
            error={"status": 400, "code": HOSTILE, "message": "No tool call found for function call output with "
                                                              "call_id c'\"><img src=y>."}) +
        rec("fail_close", 6, turn=2, reason=HOSTILE, error={"error": {"code": HOSTILE}}, close_code=1011))


def test_everything_from_the_recording_is_escaped_and_scrubbed(tmp_path):
    source = tmp_path / "hostile.jsonl"
    hostile_trace(source)
    html = write_page(source, tmp_path / "hostile.html")
    assert "SECRET" not in html
    body = html.split("<body>", 1)[1]
    for tag in ("<script", "<img", "<svg", "<b>x"):
        assert tag not in body.lower(), tag


@needs_browser
def test_a_hostile_recording_draws_as_text(browser, tmp_path):
    source = tmp_path / "hostile.jsonl"
    hostile_trace(source)
    page_path = tmp_path / "hostile.html"
    write_page(source, page_path)
    page = browser.open(page_path.as_uri())
    page.wait_for_text("replayguard chain report")
    page.wait_loaded()
    assert page.eval("document.title").startswith("replayguard chain report")
    assert page.eval("document.querySelectorAll('script, img, svg, iframe').length") == 0
    assert "<script>document.title='pwned'</script>" in page.eval("document.body.textContent")  # shown as text
    assert page.eval("document.querySelectorAll('details.item.orphaned').length") == 1
    assert page.eval(DRAWN)["dangling"] == []


def test_a_huge_request_draws_its_ends_and_every_orphan(tmp_path):
    """A client resending its whole history: at most 100 items of a request are drawn, never hiding an ORPHANED one."""
    items = [{"type": "message", "role": "user"}] * 250 + [{"type": "function_call_output", "call_id": "call_x"}] + \
        [{"type": "message", "role": "user"}] * 249
    source = tmp_path / "huge.jsonl"
    source.write_text("".join(json.dumps({"ts": ts, "session": "s", **r}) + "\n" for ts, r in enumerate([
        {"event": "session.start", "url": "ws://h/v1/responses"},
        {"event": "turn.start", "turn": 1, "input": items},
        {"event": "turn.end", "turn": 1, "status": "error", "output": [], "ms": 1}], 1)))
    html = write_page(source, tmp_path / "huge.html")
    assert html.count("<details class='item") == 100 + 1 + 1  # 100 drawn, the orphan, the turn's JSON
    assert html.count("<span class='orphan-badge'>ORPHANED</span>") == 1 and "call_x" in html
    assert "… 200 items left out" in html and "… 199 items left out" in html
