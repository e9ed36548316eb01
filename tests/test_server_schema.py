"""Schemathesis over the server's own OpenAPI spec (fetched over HTTP from a running server):
generated valid (positive) and invalid (negative) requests to every operation never get a 5xx.
Bounded for the default suite (25 examples per operation and mode, a short context so that no
generated request runs long); `pytest -m slow` runs 1,000 per operation and mode.

The strategies are driven by hypothesis directly: schemathesis' pytest plugin cannot load a schema
from a fixture under this pytest version."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

import ernie_edge
from ernie_edge.engine import Engine, EngineSettings
from serve_helpers import RunningServer, converted_tiny


@pytest.fixture(scope="module")
def api_schema(tiny_dir, tmp_path_factory):
    model = ernie_edge.load(converted_tiny(tiny_dir, tmp_path_factory), threads=1)
    # A short context: a generated max_tokens past it is a 400, so no example generates for long.
    with Engine(model, EngineSettings(slots=4, context=160, queue_size=64)) as engine:
        with RunningServer(engine) as server:
            yield schemathesis.openapi.from_url(server.url + "/openapi.json")


def check_operations(schema, mode: GenerationMode, examples: int) -> list[str]:
    """Run every operation's strategy; returns the labels of the operations checked (an
    operation without parameters has no negative cases)."""
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def no_server_error(case):
            case.call_and_validate(checks=[not_a_server_error], timeout=30)

        try:
            no_server_error()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE, operation.label
            continue
        labels.append(operation.label)
    return labels


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_no_server_errors(api_schema, mode):
    labels = set(check_operations(api_schema, mode, examples=25))
    assert {"POST /v1/chat/completions", "POST /v1/completions"} <= labels
    assert mode == GenerationMode.NEGATIVE or {"GET /v1/models", "GET /health", "GET /metrics"} <= labels


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_no_server_errors_long(api_schema, mode):
    check_operations(api_schema, mode, examples=1000)
