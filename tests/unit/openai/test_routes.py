"""The route table: each entry is served under /api and /v1 by the one pipeline, described
in /openapi.json, and read for usage as it says."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from mpcapi.http.app import Gateway
from mpcapi.openai.openapi import routes_of
from mpcapi.openai.routes import CACHEABLE_PATHS, ROUTES, SCHEMA_NAMES
from mpcapi.openai.validation import RequestValidator
from tests.support.gateway import Harness, json_body


def test_every_route_of_the_table_is_in_the_router_under_both_prefixes() -> None:
    served = {(path, method, endpoint) for path, method, endpoint in routes_of(Gateway.app.url_map)}
    for route in ROUTES:
        for prefix in ("/api", "/v1"):
            assert (prefix + route.path, route.method, route.name) in served


def test_every_schema_of_the_table_is_compiled_and_every_cacheable_route_has_a_body() -> None:
    validator = RequestValidator()
    message = {"role": "user", "content": "x"}
    body = json.dumps({"model": "m", "messages": [message], "prompt": "x", "input": "x"}).encode()
    for name in SCHEMA_NAMES:
        assert validator.validate(name, body)["model"] == "m"
    assert set(CACHEABLE_PATHS) <= {route.path for route in ROUTES if route.schema}


@pytest.mark.parametrize("route", ROUTES, ids=[route.name for route in ROUTES])
@pytest_twisted.ensureDeferred
async def test_openapi_describes_every_route(harness: Harness, route: object) -> None:
    document = await json_body(await harness.get("/openapi.json"))
    for prefix in ("/api", "/v1"):
        operation = document["paths"][prefix + route.path][route.method.lower()]  # type: ignore[attr-defined]
        assert operation["summary"] == route.summary  # type: ignore[attr-defined]
        assert ("requestBody" in operation) == (route.schema is not None)  # type: ignore[attr-defined]
