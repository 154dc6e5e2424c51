"""Reading messages cheaply (replayguard.core.messages), tested directly."""

import pytest

from replayguard.core.messages import is_delta


@pytest.mark.parametrize(("message", "expected"), [
    ('{"type":"response.output_text.delta","delta":"x"}', True),  # the upstream's compact form
    ('{"type": "response.function_call_arguments.delta", "delta": "{"}', True),
    ('{"type":"response.reasoning_summary_text.delta"}', True),
    ('{"type":"response.output_text.done","text":"x"}', False),
    ('{ "type" : "response.completed", "response": {}}', False),
    ('{"delta":"x","type":"response.output_text.delta"}', False),  # type not first: decoded the slow, safe way
    ('{"type":"error","error":{}}', False),
    ("[1, 2]", False),
    ("not json", False),
])
def test_is_delta(message, expected):
    assert is_delta(message) is expected
