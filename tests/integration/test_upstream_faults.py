"""What a client sees when LiteLLM is down, too slow, or refuses MPC-API's key."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import openai
import pytest

from .harness import HELLO, MOCK_TEXT, Daemon, FakeUpstream


def chat(daemon: Daemon, model: str = "gpt-4o-mini") -> None:
    with openai.OpenAI(
        base_url=daemon.api_base, api_key="unused", max_retries=0, timeout=30
    ) as client:
        client.chat.completions.create(model=model, messages=HELLO)


def assert_mpcapi_error(error: openai.APIStatusError, status: int) -> None:
    assert error.status_code == status
    body = error.response.json()
    assert body["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert body["message"] and body["message"] == body["error"]["message"]
    assert error.message.endswith(body["message"])  # what the SDK shows
    assert body["request_id"] == error.response.headers["x-request-id"]
    assert "Traceback" not in error.response.text


def test_litellm_unreachable_is_502(
    start_mpcapi: Callable[..., Daemon], dead_upstream_url: str
) -> None:
    daemon = start_mpcapi(LITELLM_BASE_URL=dead_upstream_url)
    with pytest.raises(openai.InternalServerError) as caught:
        chat(daemon)
    assert_mpcapi_error(caught.value, 502)


def test_litellm_too_slow_is_504(
    start_mpcapi: Callable[..., Daemon], stalled_upstream_url: str
) -> None:
    daemon = start_mpcapi(LITELLM_BASE_URL=stalled_upstream_url, LITELLM_TIMEOUT="1")
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        chat(daemon)
    elapsed = time.monotonic() - started
    assert_mpcapi_error(caught.value, 504)
    assert elapsed < 10, f"504 after {elapsed:.1f} s with LITELLM_TIMEOUT=1"


def test_a_stalled_stream_is_504(
    start_mpcapi: Callable[..., Daemon], stalled_upstream_url: str
) -> None:
    daemon = start_mpcapi(LITELLM_BASE_URL=stalled_upstream_url, LITELLM_TIMEOUT="1")
    with (
        openai.OpenAI(base_url=daemon.api_base, api_key="unused", max_retries=0) as client,
        pytest.raises(openai.APIStatusError) as caught,
    ):
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
    assert caught.value.status_code == 504


def test_wrong_litellm_key_is_502(start_mpcapi: Callable[..., Daemon]) -> None:
    """LiteLLM without a database answers a key other than its master key with 400
    ``no_db_connection``; that, too, is LiteLLM refusing MPC-API's key, not the client's fault."""
    daemon = start_mpcapi(LITELLM_API_KEY="sk-not-the-master-key")
    with pytest.raises(openai.InternalServerError) as caught:
        chat(daemon)
    assert_mpcapi_error(caught.value, 502)


@pytest.mark.parametrize("status", [401, 403])
def test_litellm_rejecting_the_key_is_502(
    start_mpcapi: Callable[..., Daemon], fake_upstream: FakeUpstream, status: int
) -> None:
    """A LiteLLM with a database answers an unknown key with 401 (a key without the rights, 403)."""
    fake_upstream.answer(
        status,
        {"error": {"message": "Authentication Error", "type": "auth_error", "code": str(status)}},
    )
    daemon = start_mpcapi(LITELLM_BASE_URL=fake_upstream.url, LITELLM_API_KEY="sk-wrong")
    with pytest.raises(openai.InternalServerError) as caught:
        chat(daemon)
    assert_mpcapi_error(caught.value, 502)
    assert "sk-wrong" not in caught.value.response.text
    assert "sk-wrong" not in daemon.log_text()


def test_litellm_5xx_is_502(start_mpcapi: Callable[..., Daemon]) -> None:
    """``gpt-4o`` without OPENAI_API_KEY in LiteLLM's environment: LiteLLM answers 500."""
    daemon = start_mpcapi()
    with pytest.raises(openai.InternalServerError) as caught:
        chat(daemon, model="gpt-4o")
    assert_mpcapi_error(caught.value, 502)


def test_rate_limit_headers_pass_through(
    start_mpcapi: Callable[..., Daemon], fake_upstream: FakeUpstream
) -> None:
    headers = {
        "retry-after": "7",
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "7s",
    }
    body = {"error": {"message": "slow down", "type": "throttling_error", "code": "429"}}
    fake_upstream.answer(429, body, headers)
    daemon = start_mpcapi(LITELLM_BASE_URL=fake_upstream.url)
    with pytest.raises(openai.RateLimitError) as caught:
        chat(daemon)
    response = caught.value.response
    assert response.json() == body
    for name, value in headers.items():
        assert response.headers.get(name) == value, name


def test_mpcapi_sends_its_key_and_the_request_id(
    start_mpcapi: Callable[..., Daemon], fake_upstream: FakeUpstream
) -> None:
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": MOCK_TEXT},
                "finish_reason": "stop",
            }
        ],
    }
    fake_upstream.answer(200, completion)
    daemon = start_mpcapi(LITELLM_BASE_URL=fake_upstream.url, LITELLM_API_KEY="sk-daemon-key")
    with openai.OpenAI(base_url=daemon.api_base, api_key="sk-client-key", max_retries=0) as client:
        answer = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HELLO,
            extra_headers={"x-request-id": "it-forwarded-0001"},
            extra_body={"provider_specific": {"kept": True}},
        )
    assert answer.choices[0].message.content == MOCK_TEXT
    (received,) = fake_upstream.requests
    assert received.method == "POST"
    assert received.path == "/chat/completions"
    assert received.headers["authorization"] == "Bearer sk-daemon-key"
    assert received.headers["x-request-id"] == "it-forwarded-0001"
    assert json.loads(received.body)["provider_specific"] == {"kept": True}
    assert "sk-daemon-key" not in daemon.log_text()


def test_without_a_key_the_client_s_authorization_passes_through(
    start_mpcapi: Callable[..., Daemon], fake_upstream: FakeUpstream
) -> None:
    fake_upstream.answer(200, {"object": "list", "data": []})
    daemon = start_mpcapi(LITELLM_BASE_URL=fake_upstream.url, LITELLM_API_KEY=None)
    with openai.OpenAI(base_url=daemon.api_base, api_key="sk-client-key", max_retries=0) as client:
        client.models.list()
    (received,) = fake_upstream.requests
    assert received.path == "/models"
    assert received.headers["authorization"] == "Bearer sk-client-key"
