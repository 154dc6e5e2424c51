"""rules.yaml: which flows replayguard handles and how it recovers them.

A rules file states only what it changes: every key it leaves out, ``match`` included, keeps the default (the
shipped rules.yaml states every default). Loading validates every key against a schema and reports every mistake
at once, each as ``file:line: reason``.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from mitmproxy import flowfilter

from ..core.faults import FaultKind, FaultRule, InjectedError
from ..core.records import Bodies
from ..core.protocol import Settings
from ..core.recovery import Policy

DEFAULT_RULES = Path(__file__).resolve().parents[2] / "rules.yaml"  # beside addon.py


class RulesError(ValueError):
    """The mistakes of one rules file, in file order: ``problems`` holds (line, reason) for each; ``line`` and
    ``reason`` are the first's. Its text is one ``file:line: reason`` line per mistake."""

    def __init__(self, path: str, line: int | None, reason: str,
                 more: tuple[tuple[int | None, str], ...] = ()) -> None:
        self.path, self.line, self.reason = path, line, reason
        self.problems = [(line, reason), *more]
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.path}:{line}: {reason}" if line is not None else f"{self.path}: {reason}"
                for line, reason in self.problems]


@dataclass(frozen=True, slots=True)
class MatchRule:
    """One matcher: host and path are shell-style globs; ``filter`` is a mitmproxy flow filter expression."""

    host: str | None = None
    path: str | None = None
    filter: str | None = None
    _compiled: Any = field(default=None, compare=False, repr=False)

    def matches(self, host: str, path: str, flow: Any = None) -> bool:
        if self.host is not None and not fnmatch.fnmatchcase(host.lower(), self.host.lower()):
            return False
        if self.path is not None and not fnmatch.fnmatchcase(path.split("?", 1)[0], self.path):
            return False
        if self._compiled is not None and (flow is None or not self._compiled(flow)):
            return False
        return True


_CORE = Settings()  # the core's defaults


@dataclass(frozen=True, slots=True)
class UpstreamRules:
    # The protocol's timers, with the core's defaults (core.protocol.Settings), and the connection's own limits.
    ping_idle: float = _CORE.ping_idle
    ping_timeout: float = _CORE.ping_timeout
    keepalive_interval: float = _CORE.keepalive_interval
    first_event_timeout: float = _CORE.first_event_timeout
    rotation_age: float = _CORE.rotation_age
    connect_timeout: float = 10.0
    max_message_size: int = 64 * 2**20


@dataclass(frozen=True, slots=True)
class RecoveryRules:
    policy: Policy = Policy.PAIR_AWARE
    max_retries: int = 1


@dataclass(frozen=True, slots=True)
class ClientRules:
    """The client's side of a session: kept alive through mitmproxy's idle timeout while it answers pings."""

    keepalive_interval: float | str = "auto"  # seconds between pings; auto: a quarter of mitmproxy's tcp_timeout
    pong_timeout: float = 20.0  # a client that does not answer a ping within this is gone
    compression: bool = False  # let the client's leg negotiate permessage-deflate (a client on another machine)

    def interval(self, idle_timeout: float) -> float:
        """Seconds between pings to the client (0: none), well inside mitmproxy's idle timeout."""
        if self.keepalive_interval == "auto":
            return max(0.5, min(idle_timeout / 4, 150.0))
        return float(self.keepalive_interval)


@dataclass(frozen=True, slots=True)
class LimitRules:
    max_chain_bytes: int = 256 * 2**20
    max_saved_responses: int = 10_000
    resume_ttl: float = 600.0
    flow_messages: int = 0  # keep at most this many WebSocket messages of a live session's flow (0: all)


@dataclass(frozen=True, slots=True)
class TraceRules:
    bodies: Bodies = Bodies.SUMMARY


# The shipped rules.yaml's match list (tests/test_rules.py checks that they agree).
DEFAULT_MATCH = (
    MatchRule(host="api.openai.com", path="/v1/responses"),
    MatchRule(host="chatgpt.com", path="/backend-api/codex/responses"),
    MatchRule(path="*/responses"),
)


@dataclass(frozen=True, slots=True)
class Rules:
    match: tuple[MatchRule, ...] = DEFAULT_MATCH
    upstream: UpstreamRules = UpstreamRules()
    recovery: RecoveryRules = RecoveryRules()
    limits: LimitRules = LimitRules()
    trace: TraceRules = TraceRules()
    client: ClientRules = ClientRules()
    faults: tuple[FaultRule, ...] = ()
    source: str = "<defaults>"

    def matches(self, host: str, path: str, flow: Any = None) -> bool:
        return any(rule.matches(host, path, flow) for rule in self.match)

    def faults_for(self, host: str, path: str, flow: Any = None) -> list[FaultRule]:
        """The fault rules scoped to this flow (none unless rules.yaml has a ``faults`` list)."""
        return [f for f in self.faults if f.match is None or f.match.matches(host, path, flow)]

    def snapshot(self) -> dict[str, Any]:
        """These rules as a rules.yaml document (what a session ran with: kept in its trace, so that a recording
        can be run again under the same rules). Made once per rules: every session of them shares it."""
        return _snapshot(self)

    def _document(self) -> dict[str, Any]:
        def matcher(m: MatchRule) -> dict[str, Any]:
            return {k: v for k, v in (("host", m.host), ("path", m.path), ("filter", m.filter)) if v is not None}

        def section(obj: Any) -> dict[str, Any]:
            return {name: getattr(getattr(obj, name), "value", getattr(obj, name)) for name in obj.__dataclass_fields__}

        faults = []
        for f in self.faults:
            default = FaultRule(f.kind)
            entry: dict[str, Any] = {"kind": f.kind.value}
            for key in FAULT_KEYS:
                value = getattr(f, key)
                if key != "kind" and value is not None and (value != getattr(default, key) or key == "after_turn"):
                    entry[key] = getattr(value, "value", value)
            if f.match is not None:
                entry.update(matcher(f.match))
            faults.append(entry)
        doc: dict[str, Any] = {"match": [matcher(m) for m in self.match], "upstream": section(self.upstream),
                               "recovery": section(self.recovery), "limits": section(self.limits),
                               "trace": section(self.trace), "client": section(self.client)}
        if faults:
            doc["faults"] = faults
        return doc


@functools.lru_cache(maxsize=8)
def _snapshot(rules: Rules) -> dict[str, Any]:
    return rules._document()


# -- validation ----------------------------------------------------------------------------------
Check = Callable[[Any], Any]


def _number(minimum: float, integer: bool = False) -> Check:
    def check(value: Any) -> Any:
        wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
        if wrong_type or not value >= minimum:  # `not >=` also rejects NaN
            raise ValueError(f"expected {'an integer' if integer else 'a number'} >= {minimum:g}, got {value!r}")
        return value

    return check


def _policy(value: Any) -> Policy:
    try:
        return Policy(value)
    except ValueError:
        raise ValueError(f"expected one of {', '.join(p.value for p in Policy)}, got {value!r}") from None


def _choice(enum_type: type[enum.Enum]) -> Check:
    def check(value: Any) -> Any:
        try:
            return enum_type(value)
        except ValueError:
            raise ValueError(f"expected one of {', '.join(str(m.value) for m in enum_type)}, got {value!r}") from None

    return check


def _range(low: float, high: float, integer: bool = False) -> Check:
    def check(value: Any) -> Any:
        wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
        if wrong_type or not low <= value <= high:
            kind = "an integer" if integer else "a number"
            raise ValueError(f"expected {kind} from {low:g} to {high:g}, got {value!r}")
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _auto_or(check: Check) -> Check:
    def auto_or(value: Any) -> Any:
        if value == "auto":
            return value
        try:
            return check(value)
        except ValueError as e:
            raise ValueError(f"{e} or auto") from None

    return auto_or


def _flow_messages(value: Any) -> int:
    count = _number(0, integer=True)(value)
    if 0 < count < 100:
        raise ValueError(f"expected 0 (keep all) or at least 100 messages, got {value!r}")
    return count


def _close_code(value: Any) -> int:
    code = _range(1000, 4999, integer=True)(value)
    if code in (1004, 1005, 1006, 1015):
        raise ValueError(f"close code {code} cannot be sent in a close frame")
    return code


def _glob(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string (a glob), got {value!r}")
    return value


def _filter(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a mitmproxy filter expression, got {value!r}")
    return value


SECTIONS: dict[str, tuple[type, dict[str, Check]]] = {
    "upstream": (
        UpstreamRules,
        {
            "ping_idle": _number(0),
            "ping_timeout": _number(0.001),
            "keepalive_interval": _number(0),
            "first_event_timeout": _number(0.001),
            "rotation_age": _number(1),
            "connect_timeout": _number(0.001),
            "max_message_size": _number(1024, integer=True),
        },
    ),
    "recovery": (RecoveryRules, {"policy": _policy, "max_retries": _number(0, integer=True)}),
    "limits": (LimitRules, {"max_chain_bytes": _number(1, integer=True), "max_saved_responses": _number(1, integer=True),
                            "resume_ttl": _number(0), "flow_messages": _flow_messages}),
    "trace": (TraceRules, {"bodies": _choice(Bodies)}),
    "client": (ClientRules, {"keepalive_interval": _auto_or(_number(0)), "pong_timeout": _number(0.001),
                             "compression": _boolean}),
}
MATCH_KEYS: dict[str, Check] = {"host": _glob, "path": _glob, "filter": _filter}

# faults entries: when, what, and the keys that only mean something for one kind.
FAULT_KEYS: dict[str, Check] = {
    "kind": _choice(FaultKind),
    "after_turn": _number(0, integer=True),
    "probability": _range(0, 1),
    "seed": _number(0, integer=True),
    "times": _number(1, integer=True),
    "code": _close_code,
    "status": _range(400, 599, integer=True),
    "count": _number(1, integer=True),
    "error": _choice(InjectedError),
    "seconds": _number(0),
}
FAULT_KIND_KEYS: dict[str, FaultKind] = {
    "code": FaultKind.CLOSE, "status": FaultKind.REFUSE, "count": FaultKind.REFUSE,
    "error": FaultKind.ERROR, "seconds": FaultKind.DELAY,
}


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Problems:
    """The mistakes found so far in one file; validation goes on past each, so that all are reported at once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.found: list[tuple[int | None, str]] = []

    def add(self, line: int | None, reason: str) -> None:
        self.found.append((line, reason))

    def check(self) -> None:
        if self.found:
            first, *more = sorted(self.found, key=lambda p: p[0] or 0)  # stable: one line's mistakes keep their order
            raise RulesError(self.path, first[0], first[1], tuple(more))


def _mapping(node: yaml.Node, problems: _Problems, what: str) -> list[tuple[yaml.ScalarNode, yaml.Node]] | None:
    """The usable (key, value) pairs of a mapping; None when it is not one. Odd and duplicate keys are reported."""
    if not isinstance(node, yaml.MappingNode):
        problems.add(_line(node), f"{what} must be a mapping")
        return None
    seen: set[str] = set()
    pairs = []
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            problems.add(_line(key), f"{what}: keys must be plain names")
        elif key.value in seen:
            problems.add(_line(key), f"{what}: duplicate key {key.value!r}")
        else:
            seen.add(key.value)
            pairs.append((key, value))
    return pairs


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _value(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except ValueError:
        raise
    except Exception as e:  # an unknown tag (!foo) or a malformed tagged scalar (!!timestamp x)
        raise ValueError(f"cannot read this value: {getattr(e, 'problem', None) or e}") from None
    finally:
        loader.dispose()


def _compile_filter(expr: str) -> Any:
    try:
        return flowfilter.parse(expr)
    except ValueError as e:
        raise ValueError(f"invalid filter expression {expr!r}: {e}") from None


def parse_rules(text: str, path: str = "<rules>") -> Rules:
    """The rules a file states, over the defaults; a RulesError with every mistake (YAML that does not parse stops
    at its first)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise RulesError(path, mark.line + 1 if mark else None, f"invalid YAML: {e.problem or e}") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (control characters)
        line = text.count("\n", 0, e.position) + 1
        raise RulesError(path, line, f"invalid YAML: {str(e).splitlines()[0]}") from None
    if root is None or _is_null(root):  # nothing but comments: nothing changed
        return Rules(source=path)
    problems = _Problems(path)
    sections: dict[str, Any] = {}
    for key, value in _mapping(root, problems, "the top level") or []:
        name = key.value
        if name == "match":
            match = _parse_match(value, problems)
            if match is not None:
                sections["match"] = match
        elif name == "faults":
            sections["faults"] = _parse_faults(value, problems)
        elif name in SECTIONS:
            sections[name] = _parse_section(name, value, problems)
        else:
            known = ", ".join(["match", *SECTIONS, "faults"])
            problems.add(_line(key), f"unknown section {name!r}; expected one of {known}")
    problems.check()
    return Rules(source=path, **sections)


def _parse_section(name: str, node: yaml.Node, problems: _Problems) -> Any:
    cls, checks = SECTIONS[name]
    kwargs = {}
    if _is_null(node):
        return cls()  # every key commented out: the defaults
    for k, v in _mapping(node, problems, f"section {name!r}") or []:
        check = checks.get(k.value)
        if check is None:
            problems.add(_line(k), f"unknown key {name}.{k.value}; expected one of {', '.join(checks)}")
            continue
        try:
            kwargs[k.value] = check(_value(v))
        except ValueError as e:
            problems.add(_line(v), f"{name}.{k.value}: {e}")
    return cls(**kwargs)


def _parse_match(node: yaml.Node, problems: _Problems) -> tuple[MatchRule, ...] | None:
    if not isinstance(node, yaml.SequenceNode):
        problems.add(_line(node), "match must be a list of {host, path, filter} matchers")
        return None
    rules = []
    for entry in node.value:
        pairs = _mapping(entry, problems, "a match entry")
        if pairs is None:
            continue
        fields: dict[str, Any] = {}
        bad = False
        for k, v in pairs:
            check = MATCH_KEYS.get(k.value)
            if check is None:
                problems.add(_line(k), f"unknown key match.{k.value}; expected one of {', '.join(MATCH_KEYS)}")
                bad = True
                continue
            try:
                fields[k.value] = check(_value(v))
                if k.value == "filter":
                    fields["_compiled"] = _compile_filter(fields["filter"])
            except ValueError as e:
                problems.add(_line(v), f"match.{k.value}: {e}")
                bad = True
        if not fields and not bad:
            problems.add(_line(entry), "a match entry needs host, path or filter")
        elif not bad:
            rules.append(MatchRule(**fields))
    return tuple(rules)


def _parse_faults(node: yaml.Node, problems: _Problems) -> tuple[FaultRule, ...]:
    if _is_null(node):
        return ()
    if not isinstance(node, yaml.SequenceNode):
        problems.add(_line(node), "faults must be a list of fault rules (each with kind and after_turn or probability)")
        return ()
    faults = []
    for entry in node.value:
        pairs = _mapping(entry, problems, "a fault rule")
        if pairs is None:
            continue
        fields: dict[str, Any] = {}
        scope: dict[str, Any] = {}
        lines: dict[str, int] = {}
        bad = False
        for k, v in pairs:
            check = FAULT_KEYS.get(k.value) or MATCH_KEYS.get(k.value)
            if check is None:
                known = ", ".join([*FAULT_KEYS, *MATCH_KEYS])
                problems.add(_line(k), f"unknown key faults.{k.value}; expected one of {known}")
                bad = True
                continue
            lines[k.value] = _line(k)
            try:
                value = check(_value(v))
                if k.value in MATCH_KEYS:
                    scope[k.value] = value
                    if k.value == "filter":
                        scope["_compiled"] = _compile_filter(value)
                else:
                    fields[k.value] = value
            except ValueError as e:
                problems.add(_line(v), f"faults.{k.value}: {e}")
                bad = True
        where = _line(entry)
        kind = fields.get("kind")
        if kind is None:
            if "kind" not in lines:  # a kind that is there but wrong is reported above
                problems.add(where, f"a fault rule needs kind: one of {', '.join(k.value for k in FaultKind)}")
            continue
        if "after_turn" not in lines and "probability" not in lines:
            problems.add(where, f"fault {kind.value}: needs after_turn (a turn number) or probability (0..1)")
            bad = True
        for key, owner in FAULT_KIND_KEYS.items():
            if key in fields and owner is not kind:
                problems.add(lines[key], f"faults.{key} applies to kind {owner.value}, not {kind.value}")
                bad = True
        if not bad:
            faults.append(FaultRule(match=MatchRule(**scope) if scope else None, line=where, **fields))
    return tuple(faults)


def load_rules(path: str | Path | None = None) -> Rules:
    p = Path(path) if path else DEFAULT_RULES
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise RulesError(str(p), None, f"cannot read rules file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise RulesError(str(p), None, f"not UTF-8 text: {e}") from None
    return parse_rules(text, str(p))
