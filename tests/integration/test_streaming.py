"""Streaming (server-sent events) through MPC-API, driven by the OpenAI SDK."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from .harness import HELLO, MOCK_TEXT, Daemon


@pytest.fixture
def client(mpcapi: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=mpcapi.api_base, api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


def test_chat_stream(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True))
    assert len(chunks) > 1
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == MOCK_TEXT
    assert all(chunk.usage is None for chunk in chunks)


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == MOCK_TEXT
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.total_tokens > 0


def test_text_completion_stream(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="gpt-4o-mini", prompt="Say hi", stream=True))
    assert "".join(chunk.choices[0].text or "" for chunk in chunks if chunk.choices) == MOCK_TEXT


def test_stream_error_before_the_first_chunk_is_an_http_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="mock-rate-limited", messages=HELLO, stream=True)
