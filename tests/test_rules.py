"""replayguard.proxy.rules: the shipped rules.yaml, matching, and a file:line report for every kind of mistake."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from mitmproxy.test import tflow

from replayguard.core.records import Bodies
from replayguard.core.recovery import Policy
from replayguard.proxy.rules import (
    DEFAULT_MATCH,
    DEFAULT_RULES,
    LimitRules,
    MatchRule,
    RecoveryRules,
    Rules,
    RulesError,
    UpstreamRules,
    load_rules,
    parse_rules,
)

SHIPPED = Path(__file__).resolve().parent.parent / "rules.yaml"
MATCH = "match:\n  - path: /v1/responses\n"


def write(tmp_path: Path, text: str | bytes, name: str = "rules.yaml") -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


# -- the shipped file ------------------------------------------------------------------------------------
def test_default_rules_path_is_the_shipped_file():
    assert DEFAULT_RULES == SHIPPED and SHIPPED.is_file()


@pytest.mark.parametrize("path", [None, "", str(SHIPPED), SHIPPED], ids=["none", "empty", "str", "path"])
def test_shipped_rules_load_with_the_documented_defaults(path):
    rules = load_rules(path)
    assert rules.source == str(SHIPPED)
    assert rules.match == (
        MatchRule(host="api.openai.com", path="/v1/responses"),
        MatchRule(host="chatgpt.com", path="/backend-api/codex/responses"),
        MatchRule(path="*/responses"),
    )
    # the values the README documents
    assert rules.upstream == UpstreamRules(
        ping_idle=20, ping_timeout=2, keepalive_interval=15, first_event_timeout=10, rotation_age=3300,
        connect_timeout=10, max_message_size=67108864,
    )
    assert rules.recovery == RecoveryRules(policy=Policy.PAIR_AWARE, max_retries=1)
    assert rules.limits == LimitRules(max_chain_bytes=268435456, max_saved_responses=10000)
    # and the file agrees with the dataclass defaults
    assert rules.upstream == UpstreamRules() and rules.recovery == RecoveryRules() and rules.limits == LimitRules()
    assert rules.recovery.policy is Policy.PAIR_AWARE


def test_sections_are_optional_and_default():
    rules = parse_rules(MATCH, "x.yaml")
    assert rules.source == "x.yaml"
    assert (rules.upstream, rules.recovery, rules.limits) == (UpstreamRules(), RecoveryRules(), LimitRules())


def test_every_key_can_be_set():
    text = MATCH + (
        "upstream:\n  ping_idle: 0\n  ping_timeout: 0.5\n  keepalive_interval: 0\n  first_event_timeout: 3\n"
        "  rotation_age: 60\n  connect_timeout: 1.5\n  max_message_size: 1024\n"
        "recovery:\n  policy: strict\n  max_retries: 0\n"
        "limits:\n  max_chain_bytes: 1\n  max_saved_responses: 1\n"
    )
    rules = parse_rules(text)
    assert rules.upstream == UpstreamRules(0, 0.5, 0, 3, 60, 1.5, 1024)
    assert rules.recovery == RecoveryRules(Policy.STRICT, 0)
    assert rules.limits == LimitRules(1, 1)


def test_a_partial_section_keeps_the_other_defaults():
    rules = parse_rules(MATCH + "upstream:\n  ping_idle: 5\n")
    assert rules.upstream.ping_idle == 5
    assert rules.upstream.ping_timeout == UpstreamRules().ping_timeout
    assert rules.upstream.max_message_size == UpstreamRules().max_message_size


# -- matching --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "path", "matched"),
    [
        ("api.openai.com", "/v1/responses", True),
        ("API.OpenAI.com", "/v1/responses", True),
        ("chatgpt.com", "/backend-api/codex/responses", True),
        ("127.0.0.1", "/v1/responses", True),
        ("gateway.example", "/openai/v1/responses", True),
        ("localhost", "/responses", True),
        ("api.openai.com", "/v1/responses?model=gpt-5", True),
        ("chatgpt.com", "/backend-api/codex/responses?x=1&y=/z", True),
        ("api.openai.com", "/v1/chat/completions", False),
        ("api.openai.com", "/v1/realtime", False),
        ("api.openai.com", "/v1/responses/resp_123", False),
        ("chatgpt.com", "/backend-api/codex/responses/compact", False),
        ("example.com", "/v1/responsesX", False),
        ("example.com", "/v1/RESPONSES", False),
        ("example.com", "/?next=/v1/responses", False),
        ("example.com", "/", False),
    ],
)
def test_shipped_rules_matching(host, path, matched):
    assert load_rules().matches(host, path) is matched


@pytest.mark.parametrize(
    ("rule", "host", "path", "matched"),
    [
        (MatchRule(host="api.openai.com"), "api.openai.com", "/anything", True),
        (MatchRule(host="api.openai.com"), "api.openai.com.evil", "/v1/responses", False),
        (MatchRule(host="*.openai.com"), "eu.api.openai.com", "/x", True),
        (MatchRule(host="*.openai.com"), "openai.com", "/x", False),
        (MatchRule(host="API.OPENAI.COM"), "api.openai.com", "/x", True),
        (MatchRule(path="/v1/responses"), "any.host", "/v1/responses?a=b", True),
        (MatchRule(path="/v1/responses"), "any.host", "/v1/Responses", False),
        (MatchRule(path="/v?/responses"), "h", "/v2/responses", True),
        (MatchRule(host="a.com", path="/v1/responses"), "b.com", "/v1/responses", False),
        (MatchRule(host="a.com", path="/v1/responses"), "a.com", "/v1/other", False),
        (MatchRule(), "anything", "/at/all", True),
    ],
)
def test_match_rule(rule, host, path, matched):
    assert rule.matches(host, path) is matched


def test_rules_with_no_matchers_match_nothing():
    assert not Rules(match=()).matches("api.openai.com", "/v1/responses")
    assert parse_rules("match: []\n").match == ()


def test_filter_matcher_needs_the_flow():
    rules = parse_rules("match:\n  - host: '*.openai.com'\n    filter: '~h \"OpenAI-Beta: responses_websockets\"'\n")
    (rule,) = rules.match
    assert rule.filter == '~h "OpenAI-Beta: responses_websockets"'
    flow = tflow.tflow()
    flow.request.headers["OpenAI-Beta"] = "responses_websockets=2026-02-06"
    assert rules.matches("api.openai.com", "/v1/responses", flow)
    assert not rules.matches("api.openai.com", "/v1/responses")  # no flow: a filter cannot match
    assert not rules.matches("example.com", "/v1/responses", flow)  # the host must match too
    plain = tflow.tflow()
    assert not rules.matches("api.openai.com", "/v1/responses", plain)


# -- mistakes: FILE:LINE: reason -------------------------------------------------------------------------
MISTAKES = [
    # (id, text, line, reason regex)
    ("yaml-tab", MATCH + "recovery:\n\tpolicy: strict\n", 4, r"invalid YAML: found character '\\t'"),
    ("yaml-mapping-in-scalar", "match:\n  - path: a: b\n", 2, r"invalid YAML: mapping values are not allowed"),
    ("yaml-unclosed-flow", "match: [ {path: /x}\n", 2, r"invalid YAML: expected ',' or ']'"),
    ("yaml-unclosed-quote", MATCH + "upstream:\n  ping_idle: \"20\n", 5, r"invalid YAML: found unexpected end of stream"),
    ("yaml-undefined-alias", "match:\n  - path: *p\n", 2, r"invalid YAML: found undefined alias 'p'"),
    ("yaml-control-character", "match:\n  - path: /x\n  - host: \"a\x07\"\n", 3, r"invalid YAML: unacceptable character #x0007"),
    ("top-level-not-mapping", "- path: /v1/responses\n", 1, r"the top level must be a mapping"),
    ("unknown-section", MATCH + "\nretry:\n  max: 1\n", 4,
     r"unknown section 'retry'; expected one of match, upstream, recovery, limits, trace, client, faults$"),
    ("non-scalar-top-key", MATCH + "? [a]\n: 1\n", 3, r"the top level: keys must be plain names"),
    ("section-not-mapping", MATCH + "upstream: 5\n", 3, r"section 'upstream' must be a mapping"),
    ("unknown-upstream-key", MATCH + "upstream:\n  ping_idle: 5\n  ping_timout: 1\n", 5,
     r"unknown key upstream\.ping_timout; expected one of ping_idle, ping_timeout, keepalive_interval, "
     r"first_event_timeout, rotation_age, connect_timeout, max_message_size$"),
    ("unknown-recovery-key", MATCH + "recovery:\n  retries: 2\n", 4,
     r"unknown key recovery\.retries; expected one of policy, max_retries$"),
    ("negative-resume-ttl", MATCH + "limits:\n  resume_ttl: -5\n", 4,
     r"limits\.resume_ttl: expected a number >= 0, got -5$"),
    ("unknown-limits-key", MATCH + "limits:\n  max_bytes: 2\n", 4,
     r"unknown key limits\.max_bytes; expected one of max_chain_bytes, max_saved_responses, resume_ttl, flow_messages$"),
    ("string-for-number", MATCH + "upstream:\n  ping_idle: \"20\"\n", 4,
     r"upstream\.ping_idle: expected a number >= 0, got '20'"),
    ("word-for-number", MATCH + "upstream:\n  first_event_timeout: ten\n", 4,
     r"upstream\.first_event_timeout: expected a number >= 0\.001, got 'ten'"),
    ("bool-for-number", MATCH + "upstream:\n  keepalive_interval: true\n", 4,
     r"upstream\.keepalive_interval: expected a number >= 0, got True"),
    ("bool-for-integer", MATCH + "recovery:\n  max_retries: yes\n", 4,
     r"recovery\.max_retries: expected an integer >= 0, got True"),
    ("float-for-integer", MATCH + "recovery:\n  max_retries: 1.5\n", 4,
     r"recovery\.max_retries: expected an integer >= 0, got 1\.5"),
    ("list-for-number", MATCH + "limits:\n  max_saved_responses: [1]\n", 4,
     r"limits\.max_saved_responses: expected an integer >= 1, got \[1\]"),
    ("null-for-number", MATCH + "upstream:\n  ping_timeout: 1\n  # set later\n  keepalive_interval:\n", 6,
     r"upstream\.keepalive_interval: expected a number >= 0, got None"),
    ("negative-number", MATCH + "upstream:\n  ping_idle: -1\n", 4, r"upstream\.ping_idle: expected a number >= 0, got -1"),
    ("negative-integer", MATCH + "recovery:\n  max_retries: -2\n", 4,
     r"recovery\.max_retries: expected an integer >= 0, got -2"),
    ("zero-timeout", MATCH + "upstream:\n  ping_timeout: 0\n", 4, r"upstream\.ping_timeout: expected a number >= 0\.001, got 0"),
    ("zero-chain-bytes", MATCH + "limits:\n  max_chain_bytes: 0\n", 4,
     r"limits\.max_chain_bytes: expected an integer >= 1, got 0"),
    ("small-message-size", MATCH + "upstream:\n  max_message_size: 1000\n", 4,
     r"upstream\.max_message_size: expected an integer >= 1024, got 1000"),
    ("nan", MATCH + "upstream:\n  ping_timeout: .nan\n", 4, r"upstream\.ping_timeout: expected a number >= 0\.001, got nan"),
    ("python-tag", MATCH + "upstream:\n  ping_idle: !!python/name:os.system\n", 4,
     r"upstream\.ping_idle: cannot read this value: could not determine a constructor"),
    ("bad-timestamp-tag", MATCH + "upstream:\n  ping_idle: !!timestamp abc\n", 4, r"upstream\.ping_idle: cannot read this value"),
    ("local-tag-in-match", "match:\n  - path: !glob /x\n", 2, r"match\.path: cannot read this value"),
    ("bad-policy", MATCH + "recovery:\n  policy: lenient\n", 4,
     r"recovery\.policy: expected one of pair-aware, strict, got 'lenient'$"),
    ("policy-case", MATCH + "recovery:\n  policy: Strict\n", 4, r"recovery\.policy: expected one of pair-aware, strict"),
    ("policy-underscore", MATCH + "recovery:\n  max_retries: 1\n  policy: pair_aware\n", 5,
     r"recovery\.policy: expected one of pair-aware, strict, got 'pair_aware'"),
    ("match-mapping", "match:\n  host: api.openai.com\n", 2, r"match must be a list of \{host, path, filter\} matchers"),
    ("match-string", "\nmatch: /v1/responses\n", 2, r"match must be a list"),
    ("match-entry-empty-mapping", "match:\n  - path: /x\n  - {}\n", 3, r"a match entry needs host, path or filter"),
    ("match-entry-null", "match:\n  - path: /x\n  -\n", 3, r"a match entry must be a mapping"),
    ("match-entry-string", "match:\n  - /v1/responses\n", 2, r"a match entry must be a mapping"),
    ("match-empty-glob", "match:\n  - host: ''\n", 2, r"match\.host: expected a non-empty string \(a glob\), got ''"),
    ("match-number-glob", "match:\n  - path: /x\n  - path: 5\n", 3, r"match\.path: expected a non-empty string"),
    ("unknown-match-key", "match:\n  - host: api.openai.com\n    paht: /v1/responses\n", 3,
     r"unknown key match\.paht; expected one of host, path, filter$"),
    ("invalid-filter", "match:\n  - path: /x\n  - filter: '~q ~~~'\n", 3,
     r"match\.filter: invalid filter expression '~q ~~~'"),
    ("unbalanced-filter", "match:\n  - filter: '(~h foo'\n", 2, r"match\.filter: invalid filter expression"),
    ("empty-filter", "match:\n  - filter: ''\n", 2, r"match\.filter: expected a mitmproxy filter expression"),
    ("keepalive-word", MATCH + "client:\n  keepalive_interval: often\n", 4,
     r"client\.keepalive_interval: expected a number >= 0, got 'often' or auto"),
    ("pong-zero", MATCH + "client:\n  pong_timeout: 0\n", 4, r"client\.pong_timeout: expected a number >= 0\.001"),
    ("flow-messages-tiny", MATCH + "limits:\n  flow_messages: 5\n", 4,
     r"limits\.flow_messages: expected 0 \(keep all\) or at least 100 messages, got 5"),
    ("duplicate-top-key", MATCH + "match:\n  - path: /y\n", 3, r"the top level: duplicate key 'match'"),
    ("duplicate-section-key", MATCH + "\n\nupstream:\n  ping_idle: 1\n  ping_idle: 2\n", 7,
     r"section 'upstream': duplicate key 'ping_idle'"),
    ("duplicate-section", MATCH + "recovery:\n  max_retries: 1\nlimits: {}\nrecovery:\n  policy: strict\n", 6,
     r"the top level: duplicate key 'recovery'"),
    ("duplicate-match-key", "match:\n  - path: /x\n    path: /y\n", 3, r"a match entry: duplicate key 'path'"),
]


@pytest.mark.parametrize(("text", "line", "reason"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistakes_report_file_line_and_reason(tmp_path, text, line, reason):
    path = write(tmp_path, text)
    with pytest.raises(RulesError) as info:
        load_rules(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.path, err.line) == (str(path), line)
    assert str(err) == f"{path}:{line}: {err.reason}"
    assert re.search(reason, err.reason), err.reason
    # parse_rules reports the same with the name it is given
    with pytest.raises(RulesError, match=rf"^cfg\.yaml:{line}: "):
        parse_rules(text, "cfg.yaml")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n", "---\n"],
                         ids=["empty", "blank", "comments", "empty-document"])
def test_a_file_that_states_nothing_keeps_every_default(tmp_path, text):
    path = write(tmp_path, text)
    assert load_rules(path) == replace(load_rules(), source=str(path))


# -- a rules file states only what it changes ---------------------------------------------------------------------
def test_the_defaults_are_the_shipped_file():
    assert load_rules() == Rules(source=str(SHIPPED))
    assert load_rules().match == DEFAULT_MATCH


def test_a_file_without_match_keeps_the_default_match(tmp_path):
    path = write(tmp_path, "trace: {bodies: full}\n")
    rules = load_rules(path)
    assert rules.trace.bodies is Bodies.FULL
    assert rules == replace(load_rules(), trace=rules.trace, source=str(path))
    assert rules.matches("api.openai.com", "/v1/responses") and not rules.matches("example.com", "/")


def test_only_the_keys_given_change(tmp_path):
    path = write(tmp_path, "recovery:\n  policy: strict\nclient:\n  pong_timeout: 5\n")
    rules, shipped = load_rules(path), load_rules()
    assert rules.recovery == replace(shipped.recovery, policy=Policy.STRICT)
    assert rules.client == replace(shipped.client, pong_timeout=5)
    assert (rules.match, rules.upstream, rules.limits, rules.trace, rules.faults) == (
        shipped.match, shipped.upstream, shipped.limits, shipped.trace, shipped.faults)


def test_an_empty_match_list_still_means_match_nothing():
    assert parse_rules("match: []\n").match == ()


# -- every mistake at once -----------------------------------------------------------------------------------------
def test_every_mistake_of_a_file_is_reported_at_once(tmp_path):
    path = write(tmp_path, (
        "match:\n"
        "  - host: api.openai.com\n"
        "    paht: /v1/responses\n"             # 3
        "  - filter: '~q ~~~'\n"                # 4
        "upstream:\n"
        "  ping_idle: soon\n"                   # 6
        "  ping_timeout: 1\n"
        "  rotation_ag: 60\n"                   # 8
        "recovery:\n"
        "  policy: lenient\n"                   # 10
        "retry: 3\n"                            # 11
        "faults:\n"
        "  - kind: drop\n"                      # 13: no after_turn
        "  - kind: close\n"
        "    after_turn: 1\n"
        "    seconds: 2\n"                      # 16
        "trace:\n"
        "  bodies: everything\n"                # 18
    ))
    with pytest.raises(RulesError) as info:
        load_rules(path)
    err = info.value
    assert [line for line, _ in err.problems] == [3, 4, 6, 8, 10, 11, 13, 16, 18]
    text = str(err).splitlines()
    assert len(text) == 9 and all(line.startswith(f"{path}:") for line in text)
    assert text[0] == f"{path}:3: unknown key match.paht; expected one of host, path, filter"
    assert text[2] == f"{path}:6: upstream.ping_idle: expected a number >= 0, got 'soon'"
    assert text[5].startswith(f"{path}:11: unknown section 'retry'")
    assert text[6] == f"{path}:13: fault drop: needs after_turn (a turn number) or probability (0..1)"
    assert text[8] == f"{path}:18: trace.bodies: expected one of none, summary, full, got 'everything'"
    assert (err.line, err.reason) == (3, "unknown key match.paht; expected one of host, path, filter")
    assert err.lines() == text


def test_invalid_yaml_is_one_mistake_the_parser_stops_at():
    with pytest.raises(RulesError) as info:
        parse_rules("upstream:\n  ping_idle: 1\n\tping_timeout: 2\nrecovery: [\n", "f.yaml")
    assert len(info.value.problems) == 1 and info.value.line == 3


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert info.value.line is None
    assert str(info.value) == f"{path}: cannot read rules file: No such file or directory"


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: cannot read rules file: ")
    assert info.value.line is None


def test_not_utf8(tmp_path):
    path = write(tmp_path, b"match:\n  - path: /v1/r\xe9sponses\n")
    with pytest.raises(RulesError, match=rf"^{re.escape(str(path))}: not UTF-8 text: "):
        load_rules(path)


def test_good_file_after_comments_and_blank_lines(tmp_path):
    path = write(tmp_path, "# header\n\n" + MATCH + "\n# tuning\nrecovery:\n  policy: strict  # like sub2api\n")
    rules = load_rules(path)
    assert rules.recovery.policy is Policy.STRICT and rules.source == str(path)


def test_line_numbers_follow_the_file_not_the_section():
    # the mistake is on the ninth line, deep inside a commented file
    text = "# c1\n# c2\nmatch:\n  - host: a\n    path: /v1/responses\n\nupstream:\n  ping_idle: 1\n  rotation_age: 0.5\n"
    with pytest.raises(RulesError) as info:
        parse_rules(text, "f.yaml")
    assert info.value.line == 9 and "upstream.rotation_age: expected a number >= 1, got 0.5" in str(info.value)


def test_infinity_is_a_number():
    # .inf is a valid number (e.g. never rotate); only NaN is rejected
    assert math.isinf(parse_rules(MATCH + "upstream:\n  rotation_age: .inf\n").upstream.rotation_age)


def test_section_with_every_key_commented_out_uses_defaults(tmp_path):
    f = tmp_path / "rules.yaml"
    f.write_text("match:\n  - path: '*/responses'\nupstream:\n  # ping_idle: 5\nrecovery:\n")
    rules = load_rules(f)
    assert rules.upstream == UpstreamRules()
    assert rules.recovery == RecoveryRules()


def test_snapshot_is_a_rules_document_that_reads_back_the_same():
    """What a session's trace keeps of its rules is itself a valid rules.yaml (a recording can be run again)."""
    text = (MATCH + "upstream:\n  ping_idle: 5\n  rotation_age: 60\nrecovery:\n  policy: strict\n"
            "limits:\n  resume_ttl: 0\ntrace:\n  bodies: full\nfaults:\n  - kind: close\n    code: 4000\n"
            "    after_turn: 2\n    path: /v1/*\n  - kind: refuse\n    status: 429\n    count: 2\n"
            "    probability: 0.5\n    seed: 7\n    times: 3\n")
    rules = parse_rules(text)
    doc = rules.snapshot()
    assert doc["upstream"]["ping_idle"] == 5 and doc["recovery"]["policy"] == "strict"
    assert doc["faults"] == [{"kind": "close", "after_turn": 2, "code": 4000, "path": "/v1/*"},
                             {"kind": "refuse", "probability": 0.5, "seed": 7, "times": 3, "status": 429,
                              "count": 2}]
    again = parse_rules(yaml.safe_dump(doc))
    assert again.snapshot() == doc
    assert again.upstream == rules.upstream and again.recovery == rules.recovery and again.limits == rules.limits
