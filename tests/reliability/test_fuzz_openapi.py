"""schemathesis against the server's own /openapi.json, on the real engine: a bounded number
of generated requests per operation, valid and invalid (negative) ones, never a 5xx, and
every error an OpenAI error body."""
from __future__ import annotations

import pytest
import schemathesis  # a test dependency (pyproject): missing, the suite fails rather than skips
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

MAX_EXAMPLES = 10  # per operation and mode: the whole file stays well under a minute on 2 CPUs


def _check(case) -> None:
    if isinstance(case.body, dict) and case.path.startswith("/v1/"):
        # bound the work one generated request asks of the CPU engine
        mt = case.body.get("max_tokens")
        if isinstance(mt, int) and not isinstance(mt, bool) and mt > 4:
            case.body["max_tokens"] = 4
        case.body.setdefault("max_tokens", 2)
    resp = case.call()
    assert resp.status_code < 500, (case.method, case.path, case.body, resp.text)
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, resp.text
        assert isinstance(err["message"], str) and err["message"], resp.text


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_5xx_and_openai_errors(app, mode):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize"} <= {op.path for op in ops}
    seen = 0
    for op in ops:
        strategy = op.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case):
            nonlocal seen
            seen += 1
            _check(case)

        try:
            run()
        except Unsatisfiable:  # nothing can be made invalid (a GET without parameters)
            assert mode == "negative" and op.method.upper() == "GET", op.path
    assert seen >= len(ops) if mode == "positive" else seen >= 4 * MAX_EXAMPLES
