"""The tree says what runs where: the core is sans-I/O, and imports point from the proxy and the tools to the core,
never back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "replayguard"
IO_MODULES = {"asyncio", "socket", "ssl", "selectors", "threading", "subprocess", "mitmproxy", "websockets"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(relative level, absolute-ish module name) of every import in a file, relative ones resolved."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level]
                name = ".".join(base + ((node.module,) if node.module else ()))
                out.append((node.level, name))
            else:
                out.append((0, node.module or ""))
    return out


def modules(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).glob("*.py"))


def test_core_does_no_io_and_imports_only_itself():
    for path in modules("core"):
        for _, name in imports(path):
            top = name.split(".")[0]
            assert top not in IO_MODULES, f"{path.name} imports {name}: the core stays sans-I/O"
            if top == "replayguard":
                assert name.startswith("replayguard.core"), f"{path.name} imports {name}: the core imports only itself"


def test_proxy_and_tools_do_not_import_each_other():
    for sub, other in (("proxy", "tools"), ("tools", "proxy")):
        for path in modules(sub):
            for _, name in imports(path):
                assert not name.startswith(f"replayguard.{other}"), f"{sub}/{path.name} imports {name}"


def test_importing_the_core_starts_no_io_machinery():
    code = ("import sys, replayguard.core.chain, replayguard.core.recovery, replayguard.core.events, "
            "replayguard.core.records, replayguard.core.redact, replayguard.core.faults, replayguard.core.messages;"
            "print(sorted(m for m in ('asyncio', 'mitmproxy', 'websockets', 'socket') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
