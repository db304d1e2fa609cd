"""Every route and every error row of the HTTP contract, in memory."""

from __future__ import annotations

import json
import re

import pytest
import pytest_twisted
from twisted.internet import defer

from mpcapi.exchange import Exchange
from mpcapi.http.requestlog import new_request_id
from mpcapi.openai.usage import Usage
from tests.support.gateway import (
    CHAT,
    COMPLETION,
    Harness,
    answer,
    json_body,
    make_harness,
    never_answer,
    observed_harness,
)


@pytest_twisted.ensureDeferred
async def test_health_never_touches_litellm(harness: Harness) -> None:
    harness.clock.advance(1_795_000_000.25)
    response = await harness.get("/health")
    assert response.code == 200
    document = await json_body(response)
    assert document["status"] == "ok"
    assert document["service"] == "mpc-api"
    assert document["litellm_url"] == "http://litellm.test:4000"
    assert document["version"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.250Z", document["timestamp"])
    assert harness.fake.seen == []


@pytest_twisted.ensureDeferred
async def test_ready_when_litellm_answers(harness: Harness) -> None:
    response = await harness.get("/health/ready")
    assert response.code == 200
    document = await json_body(response)
    assert document["status"] == "ready"
    assert document["litellm"]["status"] == 200
    assert harness.fake.seen[0].path == "/health/liveliness"


@pytest_twisted.ensureDeferred
async def test_ready_503_when_litellm_fails_its_probe(harness: Harness) -> None:
    harness.fake.routes[("GET", "/health/liveliness")] = answer(500, {"error": "down"})
    response = await harness.get("/health/ready")
    assert response.code == 503
    document = await json_body(response)
    assert document["status"] == "unavailable"
    assert "500" in document["litellm"]["error"]


@pytest_twisted.ensureDeferred
async def test_ready_503_when_litellm_is_too_slow(harness: Harness) -> None:
    harness.fake.routes[("GET", "/health/liveliness")] = never_answer
    pending = defer.ensureDeferred(harness.get("/health/ready"))
    harness.flush()
    harness.clock.advance(harness.settings.ready_timeout + 0.1)
    harness.flush()
    response = await pending
    assert response.code == 503
    assert "did not answer within 2 s" in (await json_body(response))["litellm"]["error"]


@pytest.mark.parametrize("prefix", ["/api", "/v1"])
@pytest_twisted.ensureDeferred
async def test_models_passes_litellm_body(harness: Harness, prefix: str) -> None:
    response = await harness.get(f"{prefix}/models")
    assert response.code == 200
    assert await json_body(response) == {"data": [{"id": "gpt-4o-mini"}], "object": "list"}
    assert harness.fake.seen[0].method == "GET"
    assert harness.fake.seen[0].path == "/models"


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/chat/completions", CHAT),
        ("/completions", {"model": "gpt-4o-mini", "prompt": "Say hi"}),
        ("/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b"]}),
    ],
)
@pytest.mark.parametrize("prefix", ["/api", "/v1"])
@pytest_twisted.ensureDeferred
async def test_post_routes_forward_original_bytes(
    harness: Harness, prefix: str, route: str, body: dict[str, object]
) -> None:
    # Odd spacing and key order must reach LiteLLM exactly as the client sent them.
    raw = json.dumps(body, indent=3, sort_keys=True).encode()
    response = await harness.post(f"{prefix}{route}", raw)
    assert response.code == 200
    seen = harness.fake.seen[0]
    assert (seen.method, seen.path, seen.body) == ("POST", route, raw)
    assert seen.header("content-type") == "application/json"


@pytest_twisted.ensureDeferred
async def test_unknown_fields_and_rich_messages_pass_through(harness: Harness) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "look", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        ],
        "tools": [{"type": "function", "function": {"name": "look", "parameters": {}}}],
        "response_format": {"type": "json_object"},
        "user": "alice",
        "seed": 7,
        "metadata": {"provider_specific": True},
        "top_k": 40,
    }
    response = await harness.post("/api/chat/completions", body)
    assert response.code == 200
    assert json.loads(harness.fake.seen[0].body) == body


@pytest_twisted.ensureDeferred
async def test_base_url_path_prefix_is_kept() -> None:
    harness = make_harness(litellm_base_url="http://litellm.test:4000/litellm")
    harness.fake.routes[("POST", "/litellm/chat/completions")] = answer(200, COMPLETION)
    response = await harness.post("/api/chat/completions", CHAT)
    assert response.code == 200
    assert harness.fake.seen[0].path == "/litellm/chat/completions"


# Credentials and the request id


@pytest_twisted.ensureDeferred
async def test_our_key_replaces_the_clients(harness: Harness) -> None:
    await harness.post(
        "/api/chat/completions", CHAT, headers={"Authorization": "Bearer client-key"}
    )
    assert harness.fake.seen[0].header("authorization") == "Bearer sk-ours"


@pytest_twisted.ensureDeferred
async def test_without_our_key_the_clients_passes_through() -> None:
    harness = make_harness(litellm_api_key="")
    await harness.post(
        "/api/chat/completions", CHAT, headers={"Authorization": "Bearer client-key"}
    )
    assert harness.fake.seen[0].header("authorization") == "Bearer client-key"


@pytest_twisted.ensureDeferred
async def test_without_any_key_no_authorization_is_sent() -> None:
    harness = make_harness(litellm_api_key="")
    await harness.post("/api/chat/completions", CHAT)
    assert harness.fake.seen[0].header("authorization") is None


@pytest_twisted.ensureDeferred
async def test_sane_request_id_is_kept_forwarded_and_returned(harness: Harness) -> None:
    response = await harness.post(
        "/api/chat/completions", CHAT, headers={"x-request-id": "trace-42.a"}
    )
    assert response.headers.getRawHeaders("x-request-id") == ["trace-42.a"]
    assert harness.fake.seen[0].header("x-request-id") == "trace-42.a"


@pytest.mark.parametrize("given", ["has spaces", "x" * 200, "semi;colon", ""])
@pytest_twisted.ensureDeferred
async def test_insane_request_id_is_replaced(harness: Harness, given: str) -> None:
    response = await harness.post("/api/chat/completions", CHAT, headers={"x-request-id": given})
    (returned,) = response.headers.getRawHeaders("x-request-id")
    assert re.fullmatch(r"[0-9a-f]{32}", returned)
    assert harness.fake.seen[0].header("x-request-id") == returned


def test_fresh_request_ids_are_unique_and_sort_by_time() -> None:
    ids = [new_request_id(1_790_000_000 + n / 1000) for n in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", one) for one in ids)


@pytest_twisted.ensureDeferred
async def test_every_error_carries_the_request_id(harness: Harness) -> None:
    response = await harness.get("/nowhere", headers={"x-request-id": "abc"})
    assert response.headers.getRawHeaders("x-request-id") == ["abc"]
    assert (await json_body(response))["request_id"] == "abc"


# Error rows


@pytest_twisted.ensureDeferred
async def test_unknown_route_is_404_in_seed_shape(harness: Harness) -> None:
    response = await harness.get("/api/nothing-here")
    assert response.code == 404
    document = await json_body(response)
    assert document["error"]["code"] == "not_found"
    assert "/api/nothing-here" in document["message"]
    assert document["request_id"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/api/chat/completions", "POST"),
        ("DELETE", "/v1/embeddings", "POST"),
        ("POST", "/api/models", "GET"),
        ("POST", "/health", "GET"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405(harness: Harness, method: str, path: str, allowed: str) -> None:
    response = await harness.client.request(method, f"http://mpcapi.test{path}")
    assert response.code == 405
    assert allowed in response.headers.getRawHeaders("allow")[0]
    document = await json_body(response)
    assert document["error"]["code"] == "method_not_allowed"
    assert method in document["message"]


@pytest.mark.parametrize("status", [400, 404, 409, 413, 422, 429])
@pytest_twisted.ensureDeferred
async def test_client_errors_from_litellm_pass_through(harness: Harness, status: int) -> None:
    error = {"error": {"message": "nope", "type": "invalid_request_error", "code": str(status)}}
    harness.fake.routes[("POST", "/chat/completions")] = answer(
        status,
        error,
        {
            "Retry-After": "7",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "7s",
        },
    )
    response = await harness.post("/api/chat/completions", CHAT)
    assert response.code == status
    assert await json_body(response) == error
    assert response.headers.getRawHeaders("retry-after") == ["7"]
    assert response.headers.getRawHeaders("x-ratelimit-remaining-requests") == ["0"]
    assert response.headers.getRawHeaders("x-ratelimit-reset-requests") == ["7s"]


@pytest.mark.parametrize("status", [500, 502, 503])
@pytest_twisted.ensureDeferred
async def test_litellm_5xx_is_502(harness: Harness, status: int) -> None:
    harness.fake.routes[("POST", "/chat/completions")] = answer(
        status, {"error": {"message": "provider exploded"}}
    )
    response = await harness.post("/api/chat/completions", CHAT)
    assert response.code == 502
    document = await json_body(response)
    assert document["error"]["code"] == "bad_gateway"
    assert f"LiteLLM answered {status}: provider exploded" == document["message"]


@pytest.mark.parametrize("status", [401, 403])
@pytest_twisted.ensureDeferred
async def test_litellm_refusing_our_key_is_502(harness: Harness, status: int) -> None:
    harness.fake.routes[("POST", "/chat/completions")] = answer(
        status, {"error": {"message": "Invalid proxy server token"}}
    )
    response = await harness.post("/api/chat/completions", CHAT)
    assert response.code == 502
    assert "LITELLM_API_KEY" in (await json_body(response))["message"]


@pytest_twisted.ensureDeferred
async def test_litellm_without_database_refusing_our_key_is_502(harness: Harness) -> None:
    # What LiteLLM with no database answers for any key but its master key.
    harness.fake.routes[("POST", "/chat/completions")] = answer(
        400, {"error": {"message": "No connected db.", "type": "no_db_connection", "code": "400"}}
    )
    response = await harness.post("/api/chat/completions", CHAT)
    assert response.code == 502
    message = (await json_body(response))["message"]
    assert "LITELLM_API_KEY" in message and "No connected db." in message


@pytest_twisted.ensureDeferred
async def test_litellm_refusing_the_clients_own_key_is_401() -> None:
    harness = make_harness(litellm_api_key="")
    harness.fake.routes[("POST", "/chat/completions")] = answer(
        401, {"error": {"message": "bad key"}}
    )
    response = await harness.post(
        "/api/chat/completions", CHAT, headers={"Authorization": "Bearer wrong"}
    )
    assert response.code == 401
    assert await json_body(response) == {"error": {"message": "bad key"}}


@pytest_twisted.ensureDeferred
async def test_litellm_too_slow_is_504() -> None:
    harness = make_harness(litellm_timeout=30.0)
    harness.fake.routes[("POST", "/chat/completions")] = never_answer
    pending = defer.ensureDeferred(harness.post("/api/chat/completions", CHAT))
    harness.flush()
    harness.clock.advance(29)
    harness.flush()
    assert not pending.called
    harness.clock.advance(2)
    harness.flush()
    response = await pending
    assert response.code == 504
    document = await json_body(response)
    assert document["error"]["code"] == "gateway_timeout"
    assert "did not answer within 30 s" in document["message"]


@pytest_twisted.ensureDeferred
async def test_bug_is_500_without_traceback(harness: Harness) -> None:
    class Broken:
        def validate(self, name: str, body: bytes) -> dict[str, object]:
            raise ZeroDivisionError("secret internals")

    harness.parts.forwarding.validator = Broken()  # type: ignore[assignment]
    response = await harness.post("/api/chat/completions", CHAT)
    assert response.code == 500
    text = (await response.content()).decode()
    document = json.loads(text)
    assert document["error"]["code"] == "internal_server_error"
    assert "Traceback" not in text
    assert "secret internals" not in text
    assert "ZeroDivisionError" not in text


# What every finished request reports (log event fields, and the observers' input)


@pytest_twisted.ensureDeferred
async def test_finished_requests_report_route_tokens_and_cost() -> None:
    harness, seen = observed_harness()
    harness.fake.routes[("POST", "/chat/completions")] = answer(
        200, COMPLETION, {"x-litellm-response-cost": "0.00042"}
    )
    await harness.post("/v1/chat/completions", CHAT, headers={"x-request-id": "r1"})
    (exchange,) = seen
    assert exchange.request_id == "r1"
    assert exchange.route == "/chat/completions"
    assert exchange.method == "POST"
    assert exchange.status == 200
    assert exchange.model == "gpt-4o-mini"
    assert exchange.upstream_status == 200
    assert exchange.usage == Usage(3, 1, 0.00042, model="gpt-4o-mini")
    assert exchange.outcome == "completed"


@pytest_twisted.ensureDeferred
async def test_upstream_failures_are_reported_by_kind() -> None:
    harness, seen = observed_harness()
    harness.fake.routes[("POST", "/chat/completions")] = answer(503, {"error": "busy"})
    await harness.post("/api/chat/completions", CHAT)
    assert seen[0].status == 502
    assert seen[0].upstream_failure == "status_5xx"


@pytest_twisted.ensureDeferred
async def test_a_failing_observer_does_not_break_requests() -> None:
    def broken(exchange: Exchange) -> None:
        raise RuntimeError("observer bug")

    harness, seen = observed_harness(broken)
    response = await harness.get("/health")
    assert response.code == 200
    assert len(seen) == 1


@pytest_twisted.ensureDeferred
async def test_non_utf8_path_is_a_json_400(harness: Harness) -> None:
    response = await harness.get("/api/%ff%fe")
    assert response.code == 400
    document = await json_body(response)
    assert document["message"] == "request path is not valid UTF-8"


@pytest_twisted.ensureDeferred
async def test_usage_api_without_a_ledger_is_503() -> None:
    harness = make_harness(admin_key="admin-secret")
    response = await harness.get("/api/usage", headers={"Authorization": "Bearer admin-secret"})
    assert response.code == 503
    assert "ledger is not running" in (await json_body(response))["message"]


def test_the_ledger_can_be_switched_off(tmp_path: object) -> None:
    from twisted.internet import reactor

    from mpcapi.config.settings import Settings
    from mpcapi.ledger.ledger import UsageLedger
    from mpcapi.runtime.build import build_service

    def ledgers(settings: Settings) -> list[object]:
        service = build_service(settings, reactor)
        return [child for child in service if isinstance(child, UsageLedger)]

    database = f"sqlite:///{tmp_path}/usage.db"
    assert ledgers(Settings(port=0, database_url=database, usage_ledger=False)) == []
    (ledger,) = ledgers(Settings(port=0, database_url=database))
    ledger.database.close()  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_a_password_in_the_litellm_url_is_never_shown() -> None:
    harness = make_harness(litellm_base_url="http://gw:s3cret@litellm.test:4000")
    harness.fake.routes[("GET", "/health/liveliness")] = answer(500, {"error": "down"})
    harness.fake.routes[("POST", "/chat/completions")] = answer(
        401, {"error": {"message": "bad key", "type": "auth_error"}}
    )
    shown = []
    for response in (
        await harness.get("/health"),
        await harness.get("/health/ready"),
        await harness.post("/api/chat/completions", CHAT),
    ):
        shown.append((response.code, (await response.content()).decode()))
    assert [code for code, _ in shown] == [200, 503, 502]
    assert all("s3cret" not in text for _, text in shown)
    assert "http://gw:***@litellm.test:4000" in shown[2][1]


def test_autobahn_is_loaded_only_for_the_first_websocket() -> None:
    """A worker that never sees a WebSocket client does not carry autobahn in memory."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from twisted.internet import reactor\n"
        "from mpcapi.config.settings import Settings\n"
        "from mpcapi.runtime.build import build_service\n"
        "build_service(Settings(usage_ledger=False), reactor)\n"
        "print(any(name.startswith('autobahn') for name in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"
    gateway = make_harness().gateway
    assert gateway is not None
    assert gateway.websockets is gateway.websockets  # made once, on first use
