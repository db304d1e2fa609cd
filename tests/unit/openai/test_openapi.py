"""GET /openapi.json: every route, the validator's own schemas, our error shape, security."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from mpcapi.config.settings import Settings
from mpcapi.http.app import Gateway
from mpcapi.openai.openapi import BODY_SCHEMAS, build_document, expand_rule, routes_of
from mpcapi.openai.validation import SCHEMA_NAMES, load_schema
from tests.support.gateway import Harness, json_body, make_harness


def schema_validator(document: dict[str, Any], name: str) -> Draft202012Validator:
    """A validator of the component schema ``name`` that resolves the document's $refs."""
    registry: Registry = Registry().with_resource(
        "urn:openapi", Resource.from_contents(document, DRAFT202012)
    )
    return Draft202012Validator(
        {"$ref": f"urn:openapi#/components/schemas/{name}"}, registry=registry
    )


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in all_refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in all_refs(value)]
    return []


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/")
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


@pytest_twisted.ensureDeferred
async def test_served_document_is_openapi_3_1(harness: Harness) -> None:
    response = await harness.get("/openapi.json")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert response.headers.getRawHeaders("x-request-id")
    document = await json_body(response)
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "MPC-API"
    again = await harness.get("/openapi.json")
    assert await again.content() == json.dumps(document, indent=1).encode()


def test_every_route_of_the_app_is_documented_and_nothing_else() -> None:
    document = build_document(Gateway.app.url_map, Settings())
    documented = {
        (path, method.upper()) for path, item in document["paths"].items() for method in item
    }
    routes = {(path, method) for path, method, _ in routes_of(Gateway.app.url_map)}
    assert documented == routes
    for path in ("/health", "/health/ready", "/openapi.json"):
        assert (path, "GET") in documented
    for prefix in ("/api", "/v1"):
        assert (f"{prefix}/models", "GET") in documented
        assert (f"{prefix}/ws", "GET") in documented
        for route in ("chat/completions", "completions", "embeddings"):
            assert (f"{prefix}/{route}", "POST") in documented


def test_operation_ids_are_unique_and_refs_resolve() -> None:
    document = build_document(Gateway.app.url_map, Settings(auth="keys"))
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    for ref in all_refs(document):
        resolve(document, ref)


def test_expand_rule() -> None:
    assert expand_rule("/<any(api, v1):prefix>/models") == ["/api/models", "/v1/models"]
    assert expand_rule("/dashboard/<string:name>") == ["/dashboard/{name}"]
    assert expand_rule("/health") == ["/health"]


def test_request_bodies_are_the_validators_schemas() -> None:
    assert set(BODY_SCHEMAS.values()) == set(SCHEMA_NAMES)
    document = build_document(Gateway.app.url_map, Settings())
    operation = document["paths"]["/v1/chat/completions"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = resolve(document, ref)
    original = load_schema("chat_completions")
    assert "$id" not in schema and "$schema" not in schema
    assert schema == {k: v for k, v in original.items() if k not in ("$id", "$schema")}
    for name in SCHEMA_NAMES:
        Draft202012Validator.check_schema(schema)
        del name


def test_error_responses_and_request_ids() -> None:
    document = build_document(Gateway.app.url_map, Settings())
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert {"$ref": "#/components/parameters/RequestId"} in operation["parameters"]
            assert {"408", "500", "503"} <= set(operation["responses"]), (path, method)
            for response in operation["responses"].values():
                if "$ref" in response:
                    response = resolve(document, response["$ref"])
                assert "x-request-id" in response["headers"], (path, method)
    chat = document["paths"]["/api/chat/completions"]["post"]["responses"]
    for status in ("400", "404", "413", "429", "502", "504"):
        assert status in chat
    error = document["components"]["responses"]["Error502"]["content"]["application/json"]
    assert error["schema"] == {"$ref": "#/components/schemas/Error"}
    assert "Allow" in document["components"]["responses"]["Error405"]["headers"]


@pytest.mark.parametrize("error_format", ["openai", "seed"])
@pytest_twisted.ensureDeferred
async def test_each_error_format_is_documented_as_it_is_served(error_format: str) -> None:
    harness = make_harness(error_format=error_format)
    document = await json_body(await harness.get("/openapi.json"))
    validator = schema_validator(document, "Error")
    body = await json_body(await harness.post("/api/chat/completions", {"model": "m"}))
    validator.validate(body)
    other = "seed" if error_format == "openai" else "openai"
    other_body = await json_body(
        await make_harness(error_format=other).post("/api/chat/completions", {"model": "m"})
    )
    assert not validator.is_valid(other_body), "the documented shape tells the formats apart"


@pytest_twisted.ensureDeferred
async def test_real_errors_match_the_documented_shape(harness: Harness) -> None:
    document = await json_body(await harness.get("/openapi.json"))
    validator = schema_validator(document, "Error")
    bad = await harness.post("/api/chat/completions", {"model": "m", "messages": []})
    assert bad.code == 400
    body = await json_body(bad)
    validator.validate(body)
    assert body["details"]
    missing = await harness.get("/api/nothing")
    assert missing.code == 404
    validator.validate(await json_body(missing))
    wrong = await harness.get("/api/embeddings")
    assert wrong.code == 405
    validator.validate(await json_body(wrong))
    health = await json_body(await harness.get("/health"))
    schema_validator(document, "Health").validate(health)


@pytest.mark.parametrize(
    ("settings", "openai", "metrics"),
    [
        (Settings(), None, [{"adminKey": []}]),
        (Settings(auth="keys"), [{"clientKey": []}], [{"adminKey": []}]),
        (Settings(metrics_public=True), None, None),
    ],
)
def test_security_follows_the_configuration(settings: Settings, openai: Any, metrics: Any) -> None:
    document = build_document(Gateway.app.url_map, settings)
    schemes = document["components"]["securitySchemes"]
    assert schemes["clientKey"] == {**schemes["clientKey"], "type": "http", "scheme": "bearer"}
    for path in ("/api/chat/completions", "/v1/embeddings"):
        operation = document["paths"][path]["post"]
        assert operation.get("security") == openai
        assert ("401" in operation["responses"]) == (openai is not None)
    assert document["paths"]["/api/models"]["get"].get("security") == openai
    assert document["paths"]["/metrics"]["get"].get("security") == metrics
    stats = document["paths"]["/api/stats"]["get"]
    assert stats["security"] == [{"adminKey": []}]
    assert {"401", "403"} <= set(stats["responses"])
    assert "security" not in document["paths"]["/health"]["get"]
