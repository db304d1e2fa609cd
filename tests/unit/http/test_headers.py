"""Security headers on every answer; CORS only for the allowed origins."""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.support.gateway import CHAT, Harness, json_body, make_harness

APP = "https://app.example.com"


@pytest.mark.parametrize("path", ["/health", "/api/models", "/nowhere"])
@pytest_twisted.ensureDeferred
async def test_security_headers_on_every_answer(harness: Harness, path: str) -> None:
    response = await harness.get(path)
    headers = response.headers
    assert headers.getRawHeaders("x-content-type-options") == ["nosniff"]
    assert headers.getRawHeaders("x-frame-options") == ["DENY"]
    assert headers.getRawHeaders("referrer-policy") == ["no-referrer"]
    assert headers.getRawHeaders("server") == ["mpc-api"]


@pytest_twisted.ensureDeferred
async def test_cors_is_off_by_default(harness: Harness) -> None:
    response = await harness.post("/api/chat/completions", CHAT, headers={"Origin": APP})
    assert response.code == 200
    assert response.headers.getRawHeaders("access-control-allow-origin") is None
    preflight = await harness.client.request(
        "OPTIONS",
        "http://mpcapi.test/api/chat/completions",
        headers={"Origin": APP, "Access-Control-Request-Method": "POST"},
    )
    assert preflight.code == 403
    assert APP in (await json_body(preflight))["message"]


@pytest_twisted.ensureDeferred
async def test_an_allowed_origin_gets_cors_headers() -> None:
    harness = make_harness(cors_origins=f"{APP}, https://other.example.com")
    response = await harness.post("/api/chat/completions", CHAT, headers={"Origin": APP})
    assert response.headers.getRawHeaders("access-control-allow-origin") == [APP]
    assert response.headers.getRawHeaders("vary") == ["Origin"]
    exposed = response.headers.getRawHeaders("access-control-expose-headers")[0]
    assert "x-request-id" in exposed and "retry-after" in exposed
    stranger = await harness.post(
        "/api/chat/completions", CHAT, headers={"Origin": "https://evil.example.com"}
    )
    assert stranger.headers.getRawHeaders("access-control-allow-origin") is None


@pytest_twisted.ensureDeferred
async def test_preflight_of_an_allowed_origin() -> None:
    harness = make_harness(cors_origins=APP)
    response = await harness.client.request(
        "OPTIONS",
        "http://mpcapi.test/v1/chat/completions",
        headers={
            "Origin": APP,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type, X-Evil",
        },
    )
    assert response.code == 204
    headers = response.headers
    assert headers.getRawHeaders("access-control-allow-origin") == [APP]
    assert "POST" in headers.getRawHeaders("access-control-allow-methods")[0]
    assert headers.getRawHeaders("access-control-allow-headers") == ["authorization, content-type"]
    assert headers.getRawHeaders("access-control-max-age") == ["600"]
    assert harness.fake.seen == [], "a preflight never reaches LiteLLM"


@pytest_twisted.ensureDeferred
async def test_wildcard_allows_any_origin() -> None:
    harness = make_harness(cors_origins="*")
    response = await harness.get("/api/models", headers={"Origin": "https://any.example"})
    assert response.headers.getRawHeaders("access-control-allow-origin") == ["https://any.example"]
