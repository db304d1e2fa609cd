"""MPC-API's own errors in OpenAI's shape (what the SDKs read), and the seed's flat shape
with ``MPCAPI_ERROR_FORMAT=seed``: one producer of each status, through the gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from mpcapi.config.settings import ConfigError, load_settings
from mpcapi.errors import ApiError, openai_type
from tests.support.gateway import CHAT, Harness, answer, header, json_body, make_harness
from tests.support.keys import bearer, client_key, keyed_harness


def openai_error(document: dict[str, Any]) -> dict[str, Any]:
    """The ``error`` object, after checking the whole body has OpenAI's shape plus the
    seed's top-level message and request id."""
    error = document["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert document["message"] == error["message"]
    assert document["request_id"]
    return error


@pytest_twisted.ensureDeferred
async def test_a_validation_error_names_its_field_in_param() -> None:
    harness = make_harness()
    response = await harness.post("/api/chat/completions", {**CHAT, "temperature": 5})
    assert response.code == 400
    error = openai_error(await json_body(response))
    assert error == {
        "message": "temperature: 5 is greater than the maximum of 2",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "bad_request",
    }


@pytest_twisted.ensureDeferred
async def test_a_nested_field_is_named_by_its_path() -> None:
    harness = make_harness()
    body = {"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}
    error = openai_error(await json_body(await harness.post("/v1/chat/completions", body)))
    assert error["param"] == "messages[0].role"
    assert "messages[0].role" in error["message"] and "wizard" in error["message"]


@pytest_twisted.ensureDeferred
async def test_a_body_that_is_not_json_has_no_param() -> None:
    harness = make_harness()
    response = await harness.client.post(
        "http://mpcapi.test/api/chat/completions",
        data=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.code == 400
    error = openai_error(await json_body(response))
    assert error["param"] is None and error["type"] == "invalid_request_error"
    assert "not valid JSON" in error["message"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/api/nothing", 404, "not_found"),
        ("GET", "/api/chat/completions", 405, "method_not_allowed"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_routing_errors_are_invalid_requests(
    method: str, path: str, status: int, code: str
) -> None:
    harness = make_harness()
    response = await harness.client.request(method, f"http://mpcapi.test{path}")
    assert response.code == status
    error = openai_error(await json_body(response))
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, None)
    assert path in error["message"]


@pytest_twisted.ensureDeferred
async def test_a_missing_client_key_is_an_authentication_error() -> None:
    harness = keyed_harness({"k1": client_key("k1", "alice")})
    response = await harness.post("/api/chat/completions", CHAT)
    assert response.code == 401
    error = openai_error(await json_body(response))
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert "missing client key" in error["message"]


@pytest_twisted.ensureDeferred
async def test_a_rate_limit_is_a_rate_limit_error() -> None:
    harness = keyed_harness({"k1": client_key("k1", "alice", rpm=1)})
    assert (await harness.post("/api/chat/completions", CHAT, **bearer("k1"))).code == 200
    response = await harness.post("/api/chat/completions", CHAT, **bearer("k1"))
    assert response.code == 429
    error = openai_error(await json_body(response))
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert error["message"].startswith("rate limit of 1 requests per minute reached")
    assert header(response, "retry-after")


@pytest.mark.parametrize(
    ("litellm_status", "code"),
    [(500, "bad_gateway"), (401, "bad_gateway")],
)
@pytest_twisted.ensureDeferred
async def test_litellm_failures_are_server_errors(litellm_status: int, code: str) -> None:
    harness = make_harness(litellm_api_key="sk-ours")
    harness.fake.routes[("POST", "/chat/completions")] = answer(
        litellm_status, {"error": {"message": "down"}}
    )
    response = await harness.post("/api/chat/completions", CHAT)
    assert response.code == 502
    error = openai_error(await json_body(response))
    assert (error["type"], error["code"]) == ("server_error", code)


@pytest_twisted.ensureDeferred
async def test_litellm_errors_for_the_clients_request_are_relayed_unchanged() -> None:
    harness = make_harness()
    theirs = {"error": {"message": "no such model", "type": "invalid_request_error", "param": None}}
    harness.fake.routes[("POST", "/chat/completions")] = answer(404, theirs)
    response = await harness.post("/api/chat/completions", CHAT)
    assert response.code == 404
    assert await json_body(response) == theirs


# The seed's flat shape


@pytest.mark.parametrize(
    ("body", "status", "phrase"),
    [
        ({**CHAT, "temperature": 5}, 400, "Bad Request"),
        ({"model": "m"}, 400, "Bad Request"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_the_seed_format_keeps_the_flat_shape(
    body: dict[str, Any], status: int, phrase: str
) -> None:
    harness = make_harness(error_format="seed")
    response = await harness.post("/api/chat/completions", body)
    assert response.code == status
    document = await json_body(response)
    assert document["error"] == phrase
    assert set(document) == {"error", "message", "request_id", "details"}
    assert document["details"][0]["field"]


@pytest_twisted.ensureDeferred
async def test_the_seed_format_applies_to_routing_and_key_errors() -> None:
    seed: Harness = keyed_harness({"k1": client_key("k1", "alice")}, error_format="seed")
    missing = await json_body(await seed.get("/api/nothing"))
    unauthorized = await json_body(await seed.post("/api/chat/completions", CHAT))
    assert (missing["error"], unauthorized["error"]) == ("Not Found", "Unauthorized")
    assert set(unauthorized) == {"error", "message", "request_id"}


def test_an_unknown_error_format_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"MPCAPI_ERROR_FORMAT": "xml"}, cwd=tmp_path)
    assert "MPCAPI_ERROR_FORMAT" in str(caught.value) and "openai, seed" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "invalid_request_error"),
        (408, "invalid_request_error"),
        (413, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (503, "server_error"),
        (504, "server_error"),
    ],
)
def test_each_status_has_openais_type(status: int, kind: str) -> None:
    assert openai_type(status) == kind
    assert ApiError(status, "Some Reason", "why").document("r")["error"]["type"] == kind


def test_an_error_may_name_its_own_type_and_code() -> None:
    error = ApiError(429, "Too Many Requests", "spent", code="insufficient_quota", kind="q")
    assert error.document("r")["error"] == {
        "message": "spent",
        "type": "q",
        "param": None,
        "code": "insufficient_quota",
    }
