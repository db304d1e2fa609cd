"""The official OpenAI SDK against MPC-API in front of the mock models of LiteLLM."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from .harness import HELLO, MOCK_EMBEDDING, MOCK_TEXT, Daemon


@pytest.fixture(params=["/api", "/v1"])
def client(request: pytest.FixtureRequest, mpcapi: Daemon) -> Iterator[openai.OpenAI]:
    """An SDK client on each of the two base URLs (``/v1`` aliases ``/api``). The key is unused:
    MPC-API sends its own LITELLM_API_KEY."""
    base_url = mpcapi.url + request.param
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30) as client:
        yield client


def test_list_models(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert "gpt-4o-mini" in ids
    assert "text-embedding-3-small" in ids


def test_chat_completion(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == MOCK_TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens > 0


def test_chat_completion_with_the_seed_parameters(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, temperature=0.7, max_tokens=150
    )
    assert completion.choices[0].message.content == MOCK_TEXT


def test_text_completion(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="gpt-4o-mini", prompt="Say hello")
    assert completion.choices[0].text == MOCK_TEXT
    assert completion.usage is not None


def test_embeddings(client: openai.OpenAI) -> None:
    response = client.embeddings.create(model="text-embedding-3-small", input="Hello!")
    assert response.data[0].embedding == pytest.approx(MOCK_EMBEDDING)
    assert response.model == "text-embedding-3-small"


def test_unknown_model_is_the_client_s_error(client: openai.OpenAI) -> None:
    # LiteLLM answers 400 invalid_request_error; MPC-API relays status and body.
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as caught:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert "no-such-model" in caught.value.response.text


def test_rate_limit_passes_through(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="mock-rate-limited", messages=HELLO)
    assert caught.value.status_code == 429
    assert caught.value.response.json()["error"]["type"] == "throttling_error"


def test_retry_after_passes_through(mpcapi: Daemon) -> None:
    """LiteLLM answers ``mock-cooldown`` with 429 and, once the deployment is in cooldown (from
    the second call on), with a Retry-After header that the client must see to back off."""
    with openai.OpenAI(base_url=mpcapi.api_base, api_key="unused", max_retries=0) as client:
        seen: list[openai.RateLimitError] = []
        for _ in range(3):
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(model="mock-cooldown", messages=HELLO)
            seen.append(caught.value)
    assert any(error.response.headers.get("retry-after") == "60" for error in seen[1:]), [
        dict(error.response.headers) for error in seen
    ]


def test_schema_violation_is_rejected_by_mpcapi(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, temperature=5)
    body = caught.value.response.json()
    assert body["error"]["param"] == "temperature"
    assert "temperature" in body["message"] and body["message"] == body["error"]["message"]
    assert body["request_id"]


def test_request_id_is_echoed(mpcapi: Daemon) -> None:
    with openai.OpenAI(base_url=mpcapi.api_base, api_key="unused", max_retries=0) as client:
        response = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=HELLO,
            extra_headers={"x-request-id": "it-request-id-0001"},
        )
    assert response.headers["x-request-id"] == "it-request-id-0001"
    assert response.parse().choices[0].message.content == MOCK_TEXT
    assert "it-request-id-0001" in mpcapi.wait_for_log("it-request-id-0001")


def test_a_request_id_is_generated_when_the_client_sends_none(mpcapi: Daemon) -> None:
    with openai.OpenAI(base_url=mpcapi.api_base, api_key="unused", max_retries=0) as client:
        response = client.models.with_raw_response.list()
    assert response.headers.get("x-request-id")
