"""The route table: each entry is served under its prefixes (/api and /v1, or Anthropic's)
by the one pipeline, described in /openapi.json, and read for usage as it says."""

from __future__ import annotations

import json
import re

import pytest
import pytest_twisted

from mpcapi.http.app import Gateway
from mpcapi.openai.openapi import routes_of
from mpcapi.openai.routes import CACHEABLE_PATHS, ROUTES, SCHEMA_NAMES, Route
from mpcapi.openai.validation import RequestValidator
from tests.support.gateway import Harness, json_body


def openapi_path(path: str) -> str:
    """A werkzeug rule's path as OpenAPI writes it: ``<path:model_id>`` -> ``{model_id}``."""
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", path)


def test_every_route_of_the_table_is_in_the_router_under_each_of_its_prefixes() -> None:
    served = {(path, method, endpoint) for path, method, endpoint in routes_of(Gateway.app.url_map)}
    for route in ROUTES:
        for prefix in route.prefixes:
            assert (prefix + openapi_path(route.path), route.method, route.name) in served


def test_litellm_admin_routes_are_not_in_the_router() -> None:
    """Only the table is forwarded: LiteLLM's key, user, team and config routes never are."""
    served = {path for path, _, _ in routes_of(Gateway.app.url_map)}
    for prefix in ("", "/api", "/v1"):
        for admin in ("/key", "/user", "/team", "/config", "/model", "/spend", "/global"):
            assert not any(path.startswith(prefix + admin + "/") for path in served), admin


# A smallest valid body of each schema.
VALID = {
    "chat_completions": {"model": "m", "messages": [{"role": "user", "content": "x"}]},
    "completions": {"model": "m", "prompt": "x"},
    "embeddings": {"model": "m", "input": "x"},
    "responses": {"model": "m", "input": "x"},
    "responses_input_tokens": {"model": "m", "input": "x"},
    "anthropic_messages": {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
    },
    "anthropic_count_tokens": {"model": "m", "messages": [{"role": "user", "content": "x"}]},
    "rerank": {"model": "m", "query": "q", "documents": ["a"]},
    "moderations": {"model": "m", "input": "x"},
    "audio_speech": {"model": "m", "input": "x", "voice": "alloy"},
    "images_generations": {"model": "m", "prompt": "x"},
    "batches": {
        "model": "m",
        "input_file_id": "file-1",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    },
}


def test_every_schema_of_the_table_is_compiled_and_every_cacheable_route_has_a_body() -> None:
    validator = RequestValidator()
    assert set(VALID) == set(SCHEMA_NAMES)
    for name in SCHEMA_NAMES:
        assert validator.validate(name, json.dumps(VALID[name]).encode())["model"] == "m"
    assert set(CACHEABLE_PATHS) <= {route.path for route in ROUTES if route.schema}


@pytest.mark.parametrize("route", ROUTES, ids=[route.name for route in ROUTES])
@pytest_twisted.ensureDeferred
async def test_openapi_describes_every_route(harness: Harness, route: object) -> None:
    document = await json_body(await harness.get("/openapi.json"))
    assert isinstance(route, Route)
    for prefix in route.prefixes:
        operation = document["paths"][prefix + openapi_path(route.path)][route.method.lower()]
        assert operation["summary"] == route.summary
        assert ("requestBody" in operation) == (route.body != "none")
