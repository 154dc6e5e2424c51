"""What the README tells a newcomer to type is safe and true: every proxy it starts listens on 127.0.0.1 only, and
what its recipes write into the checkout is ignored by git."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from replayguard.tools.harness import ROOT

README = (ROOT / "README.md").read_text()


def fenced_blocks(text: str = README) -> list[tuple[str, str]]:
    """(language, content) of every fenced code block, in order; indented fences (in a list item) included."""
    blocks, lang, lines, indent = [], None, [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if lang is None and stripped.startswith("```"):
            lang, lines, indent = stripped[3:].strip(), [], line[:len(line) - len(line.lstrip())]
        elif lang is not None and stripped == "```":
            blocks.append((lang, "\n".join(lines) + "\n"))
            lang = None
        elif lang is not None:
            lines.append(line[len(indent):] if line.startswith(indent) else line)
    return blocks


def commands() -> list[str]:
    """Every mitmdump or mitmweb command in the README that loads replayguard (code blocks and inline code)."""
    found = []
    for _, block in fenced_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            if re.search(r"\bmitm(dump|web)\b.*-s addon\.py|-s addon\.py.*\bmitm(dump|web)\b", line):
                found.append(" ".join(line.split()))
    prose = re.sub(r"^\s*```.*?^\s*```", "", README, flags=re.S | re.M)
    for code in re.findall(r"`([^`]+)`", prose):
        code = " ".join(code.split())  # inline code wrapped over two lines
        if re.search(r"\bmitm(dump|web)\b", code) and "addon.py" in code and code != "mitmdump -s":
            found.append(code)
    return found


def test_every_proxy_the_readme_starts_listens_on_loopback_only():
    found = commands()
    assert len(found) >= 10, found
    for command in found:
        if "--mode local:" in command:  # local capture binds no address
            continue
        assert "--listen-host 127.0.0.1" in command, command


def test_the_recipe_outputs_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = ["trace.jsonl", "traces/run.jsonl", "flows.mitm"]
    for name in outputs:
        assert name.split("/")[0] in README
    result = subprocess.run(["git", "check-ignore", "--no-index", *outputs], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.split() == outputs, result.stdout + result.stderr
