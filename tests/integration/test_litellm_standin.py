"""LiteLLM itself, called directly, through each ``standin-*`` model of
litellm_standin_models.yaml: the contract of the stand-in provider (tests/support/standin.py)
and a record of what LiteLLM 1.106.12 does on each route (ids, headers, usage, streaming).

A route LiteLLM does not have (``/v1/audio/translations``, ``/v1/images/variations``) is checked
to answer 404, so that an upgrade that adds it shows up here.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.support.standin import (
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    PNG_1X1,
    STANDIN_DELTAS,
    STANDIN_TEXT,
    STANDIN_TRANSCRIPT,
    StandIn,
)

from .harness import LiteLLM

COST = "x-litellm-response-cost"
MODEL_ID = "x-litellm-model-id"
# A read that waits this long for the next event means LiteLLM held the stream back.
UNBUFFERED_TIMEOUT = 5.0
# How long a test holds a stream at the stand-in to show that LiteLLM waits for it.
HELD = 1.0

BATCH_LINE = {
    "custom_id": "r1",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": "standin-gpt", "messages": [{"role": "user", "content": "Hi"}]},
}


@pytest.fixture
def api(litellm: LiteLLM) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {litellm.key}"}
    with httpx.Client(base_url=litellm.url, headers=headers, timeout=30) as client:
        yield client


@pytest.fixture
def sdk(litellm: LiteLLM) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=litellm.url + "/v1", api_key=litellm.key, max_retries=0) as client:
        yield client


@pytest.fixture
def claude(litellm: LiteLLM) -> Iterator[anthropic.Anthropic]:
    # auth_token: the master key as a Bearer token, like every other route here.
    with anthropic.Anthropic(
        base_url=litellm.url, auth_token=litellm.key, api_key=None, max_retries=0
    ) as client:
        yield client


def sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str]]:
    """(event name or None, data) of each server-sent event."""
    name: str | None = None
    for line in lines:
        if line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            yield name, line.removeprefix("data:").strip()
            name = None


def first_and_rest(
    response: httpx.Response, release: Any
) -> tuple[tuple[str | None, str], list[tuple[str | None, str]]]:
    """The first event (read while the stand-in holds the rest back), then the others."""
    events = sse(response.iter_lines())
    first = next(events)
    release.set()
    return first, list(events)


# --- chat completions ---------------------------------------------------------------------------


def test_chat_completions_stream(sdk: openai.OpenAI, standin_provider: StandIn) -> None:
    stream = sdk.chat.completions.create(
        model="standin-gpt",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == STANDIN_TEXT
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (INPUT_TOKENS, OUTPUT_TOKENS)
    assert standin_provider.last("/v1/chat/completions").json()["stream_options"] == {
        "include_usage": True
    }


# --- Responses API ------------------------------------------------------------------------------


def test_responses(sdk: openai.OpenAI, standin_provider: StandIn) -> None:
    raw = sdk.responses.with_raw_response.create(model="standin-gpt", input="Hi")
    response = raw.parse()
    assert response.output_text == STANDIN_TEXT
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (11, 7)
    assert float(raw.headers[COST]) > 0
    assert raw.headers[MODEL_ID]
    # The id is LiteLLM's own (it encodes the deployment), not the provider's.
    assert not response.id.startswith("resp_standin")
    sent = standin_provider.last("/v1/responses")
    assert sent.json() == {"model": "gpt-4o-mini", "input": "Hi"}
    assert sent.headers["authorization"] == "Bearer sk-standin"


def test_responses_stream(api: httpx.Client) -> None:
    body = {"model": "standin-gpt", "input": "Hi", "stream": True}
    with api.stream("POST", "/v1/responses", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        # Headers go out before the stream ends, so there is no cost among them.
        assert COST not in response.headers
        assert response.headers[MODEL_ID]
        events = list(sse(response.iter_lines()))
    # LiteLLM drops the provider's `event:` lines: only `data:` lines, and a final [DONE].
    assert {name for name, _ in events} == {None}
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    types = [chunk["type"] for chunk in chunks]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    deltas = [chunk["delta"] for chunk in chunks if chunk["type"] == "response.output_text.delta"]
    assert "".join(deltas) == STANDIN_TEXT
    usage = chunks[-1]["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (INPUT_TOKENS, OUTPUT_TOKENS)
    assert usage["cost"] > 0  # the cost is in the last event instead
    assert all(chunk["model"] == "standin-gpt" for chunk in chunks)  # added by LiteLLM


def test_responses_stream_sdk(sdk: openai.OpenAI) -> None:
    stream = sdk.responses.create(model="standin-gpt", input="Hi", stream=True)
    events = list(stream)
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == STANDIN_TEXT


def test_responses_stream_is_unbuffered(litellm: LiteLLM, standin_provider: StandIn) -> None:
    """LiteLLM answers (headers and first event) only once the provider has sent two events;
    from then on it relays each event as it comes: here the first text delta (the provider's
    fifth event) arrives while the provider holds back the rest."""
    body = {"model": "standin-gpt", "input": "Hi", "stream": True}
    headers = {"authorization": f"Bearer {litellm.key}"}
    with (
        standin_provider.hold(after=5) as release,
        httpx.Client(base_url=litellm.url, headers=headers, timeout=UNBUFFERED_TIMEOUT) as client,
        client.stream("POST", "/v1/responses", json=body) as response,
    ):
        events = sse(response.iter_lines())
        for _, data in events:
            if json.loads(data)["type"] == "response.output_text.delta":
                break
        release.set()
        rest = list(events)
    assert rest[-1][1] == "[DONE]"


def test_responses_stream_waits_for_two_events(litellm: LiteLLM, standin_provider: StandIn) -> None:
    body = {"model": "standin-gpt", "input": "Hi", "stream": True}
    headers = {"authorization": f"Bearer {litellm.key}"}
    with standin_provider.hold(after=1) as release:
        threading.Timer(HELD, release.set).start()
        started = time.monotonic()
        with httpx.stream("POST", litellm.url + "/v1/responses", json=body, headers=headers):
            assert time.monotonic() - started >= HELD * 0.9


def test_response_get_cancel_input_items_delete(
    api: httpx.Client, standin_provider: StandIn
) -> None:
    created = api.post("/v1/responses", json={"model": "standin-gpt", "input": "Hi"}).json()
    response_id = created["id"]

    got = api.get(f"/v1/responses/{response_id}")
    assert got.status_code == 200
    assert got.json()["output"][0]["content"][0]["text"] == STANDIN_TEXT
    assert got.json()["id"] != response_id  # LiteLLM encodes it anew on every answer
    assert got.headers[MODEL_ID]
    # LiteLLM decoded its id to the provider's.
    raw_id = standin_provider.requests[-1].path.removeprefix("/v1/responses/")
    assert raw_id in standin_provider.responses

    items = api.get(f"/v1/responses/{response_id}/input_items").json()
    assert items["data"][0]["content"][0]["text"] == "Hi"
    assert standin_provider.requests[-1].query == {"limit": ["20"], "order": ["desc"]}

    cancelled = api.post(f"/v1/responses/{response_id}/cancel")
    assert cancelled.json()["status"] == "cancelled"

    deleted = api.delete(f"/v1/responses/{response_id}").json()
    # The delete answer carries the provider's id, not LiteLLM's.
    assert deleted == {"id": raw_id, "object": "response", "deleted": True}
    assert api.get(f"/v1/responses/{response_id}").status_code == 404


def test_response_get_needs_litellm_id(api: httpx.Client) -> None:
    """A provider id cannot be looked up: the model is only known from LiteLLM's own id (a
    `model` query parameter does not help)."""
    answer = api.get("/v1/responses/resp_standin000001", params={"model": "standin-gpt"})
    assert answer.status_code == 400
    assert "You passed in model=None" in answer.json()["error"]["message"]


def test_responses_input_tokens(api: httpx.Client, standin_provider: StandIn) -> None:
    answer = api.post("/v1/responses/input_tokens", json={"model": "standin-gpt", "input": "Hi"})
    assert answer.json() == {
        "object": "response.input_tokens",
        "input_tokens": INPUT_TOKENS,
        "litellm_count_source": "provider",
    }
    assert not any(name.startswith("x-litellm") for name in answer.headers)
    assert standin_provider.last("/v1/responses/input_tokens").json()["model"] == "gpt-4o-mini"


# --- Anthropic Messages -------------------------------------------------------------------------


def test_messages(claude: anthropic.Anthropic, standin_provider: StandIn) -> None:
    raw = claude.messages.with_raw_response.create(
        model="standin-claude", max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
    )
    message = raw.parse()
    assert message.content[0].type == "text"
    assert message.content[0].text == STANDIN_TEXT
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 7)
    assert message.model == "standin-claude"
    assert float(raw.headers[COST]) > 0
    sent = standin_provider.last("/v1/messages")
    assert sent.headers["x-api-key"] == "sk-ant-standin"
    assert sent.json()["model"] == "claude-haiku-4-5-20251001"


def test_messages_stream(api: httpx.Client) -> None:
    body = {
        "model": "standin-claude",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    with api.stream("POST", "/v1/messages", json=body) as response:
        assert COST not in response.headers
        events = list(sse(response.iter_lines()))
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * len(STANDIN_DELTAS),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    data = [json.loads(d) for _, d in events]
    assert data[0]["message"]["model"] == "standin-claude"  # LiteLLM puts its model name in
    assert "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta") == (
        STANDIN_TEXT
    )
    assert data[-2]["usage"] == {"output_tokens": OUTPUT_TOKENS}


def test_messages_stream_sdk(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="standin-claude", max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == STANDIN_TEXT
    assert final.usage.output_tokens == OUTPUT_TOKENS


def test_messages_stream_is_unbuffered(litellm: LiteLLM, standin_provider: StandIn) -> None:
    body = {"model": "standin-claude", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
    headers = {"authorization": f"Bearer {litellm.key}"}
    with (
        standin_provider.hold() as release,
        httpx.Client(base_url=litellm.url, headers=headers, timeout=UNBUFFERED_TIMEOUT) as client,
        client.stream("POST", "/v1/messages", json=body) as response,
    ):
        first, rest = first_and_rest(response, release)
    assert first[0] == "message_start"
    assert rest[-1][0] == "message_stop"


def test_messages_through_an_openai_model(
    claude: anthropic.Anthropic, standin_provider: StandIn
) -> None:
    """For an OpenAI model LiteLLM turns /v1/messages into a Responses API call."""
    message = claude.messages.create(
        model="standin-gpt", max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == STANDIN_TEXT
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 7)
    sent = standin_provider.last("/v1/responses").json()
    assert sent["max_output_tokens"] == 50
    with claude.messages.stream(
        model="standin-gpt", max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        assert "".join(stream.text_stream) == STANDIN_TEXT
        # message_start says 0 input tokens; the real counts come in message_delta.
        assert stream.get_final_message().usage.output_tokens == OUTPUT_TOKENS


@pytest.mark.parametrize(
    ("model", "provider_path"),
    [
        ("standin-claude", "/v1/messages/count_tokens"),
        ("standin-gpt", "/v1/responses/input_tokens"),
    ],
)
def test_messages_count_tokens(
    api: httpx.Client, standin_provider: StandIn, model: str, provider_path: str
) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
    answer = api.post("/v1/messages/count_tokens", json=body)
    assert answer.json() == {"input_tokens": INPUT_TOKENS, "litellm_count_source": "provider"}
    assert standin_provider.requests[-1].path == provider_path


# --- rerank -------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/rerank", "/v2/rerank"])
def test_rerank(api: httpx.Client, standin_provider: StandIn, route: str) -> None:
    body = {"model": "standin-rerank", "query": "q", "documents": ["a", "b", "c"], "top_n": 2}
    answer = api.post(route, json=body)
    assert answer.status_code == 200
    result = answer.json()
    assert [r["index"] for r in result["results"]] == [2, 1]
    assert result["meta"]["billed_units"] == {"search_units": 1}
    assert float(answer.headers[COST]) == pytest.approx(0.002)  # one query of rerank-v3.5
    # Whichever route: LiteLLM calls Cohere's v2 API.
    sent = standin_provider.last("/v2/rerank")
    assert sent.json()["model"] == "rerank-v3.5"
    assert sent.headers["authorization"] == "Bearer standin-cohere-key"


# --- audio --------------------------------------------------------------------------------------


def test_speech(api: httpx.Client, standin_provider: StandIn) -> None:
    body = {"model": "standin-tts", "input": "Hello world", "voice": "alloy"}
    answer = api.post("/v1/audio/speech", json=body)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "audio/mpeg"
    assert len(answer.content) == 1000
    assert float(answer.headers[COST]) > 0  # per input character
    assert standin_provider.last("/v1/audio/speech").json()["model"] == "tts-1"


def test_speech_is_buffered(litellm: LiteLLM, standin_provider: StandIn) -> None:
    """The input text sets the size. LiteLLM reads the provider's whole answer before it sends
    anything (so a 50 MB answer sits in LiteLLM's memory): here no header comes before the
    provider, held after its first 64 KiB, sends the rest."""
    size = 5 * 2**20
    body = {"model": "standin-tts", "input": str(size), "voice": "alloy"}
    headers = {"authorization": f"Bearer {litellm.key}"}
    with standin_provider.hold(after=1) as release:
        threading.Timer(HELD, release.set).start()
        started = time.monotonic()
        with httpx.stream(
            "POST", litellm.url + "/v1/audio/speech", json=body, headers=headers, timeout=30
        ) as response:
            assert time.monotonic() - started >= HELD * 0.9
            assert sum(len(chunk) for chunk in response.iter_bytes()) == size


def test_transcription(api: httpx.Client, standin_provider: StandIn) -> None:
    audio = b"ID3" + bytes(2000)
    answer = api.post(
        "/v1/audio/transcriptions",
        data={"model": "standin-whisper"},
        files={"file": ("a.mp3", audio, "audio/mpeg")},
    )
    assert answer.status_code == 200
    assert answer.json()["text"] == STANDIN_TRANSCRIPT
    assert answer.json()["usage"] == {"type": "duration", "seconds": 1.0}
    assert float(answer.headers[COST]) > 0  # per second of the usage's duration
    parts = standin_provider.last("/v1/audio/transcriptions").parts()
    assert parts["file"].content == audio
    assert parts["file"].filename == "a.mp3"
    assert parts["model"].content == b"whisper-1"


def test_transcription_as_text_comes_back_as_json(api: httpx.Client) -> None:
    answer = api.post(
        "/v1/audio/transcriptions",
        data={"model": "standin-whisper", "response_format": "text"},
        files={"file": ("a.mp3", b"ID3", "audio/mpeg")},
    )
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {"text": STANDIN_TRANSCRIPT, "usage": None}
    assert COST not in answer.headers


@pytest.mark.parametrize("route", ["/v1/audio/translations", "/v1/images/variations"])
def test_routes_litellm_does_not_have(api: httpx.Client, route: str) -> None:
    answer = api.post(route, data={"model": "standin-whisper"}, files={"file": ("a", b"x")})
    assert answer.status_code == 404
    assert answer.json() == {"detail": "Not Found"}


# --- images -------------------------------------------------------------------------------------


def test_image_generation(api: httpx.Client, standin_provider: StandIn) -> None:
    answer = api.post("/v1/images/generations", json={"model": "standin-image", "prompt": "a cat"})
    image = answer.json()
    assert base64.b64decode(image["data"][0]["b64_json"]) == PNG_1X1
    assert image["usage"]["input_tokens"] == INPUT_TOKENS
    assert float(answer.headers[COST]) > 0
    assert standin_provider.last("/v1/images/generations").json()["model"] == "gpt-image-1"


def test_image_generation_mock(api: httpx.Client) -> None:
    answer = api.post("/v1/images/generations", json={"model": "mock-image", "prompt": "a cat"})
    assert answer.json()["data"][0]["url"] == "https://images.invalid/mock.png"
    assert COST not in answer.headers


def test_image_edit(api: httpx.Client, standin_provider: StandIn) -> None:
    answer = api.post(
        "/v1/images/edits",
        data={"model": "standin-image", "prompt": "a hat"},
        files={"image": ("i.png", PNG_1X1, "image/png")},
    )
    assert answer.status_code == 200
    assert base64.b64decode(answer.json()["data"][0]["b64_json"]) == PNG_1X1
    assert float(answer.headers[COST]) > 0
    parts = standin_provider.last("/v1/images/edits").parts()
    # gpt-image-1 takes a list of images: LiteLLM names the field image[].
    assert parts["image[]"].content == PNG_1X1
    assert parts["prompt"].content == b"a hat"


# --- moderations --------------------------------------------------------------------------------


def test_moderation(sdk: openai.OpenAI, standin_provider: StandIn) -> None:
    raw = sdk.moderations.with_raw_response.create(model="standin-moderation", input="hello")
    moderation = raw.parse()
    assert moderation.results[0].flagged is False
    assert COST not in raw.headers  # omni-moderation costs nothing, and no header says so
    assert standin_provider.last("/v1/moderations").json()["model"] == "omni-moderation-latest"


# --- files and batches --------------------------------------------------------------------------


def test_files_and_batches(api: httpx.Client, standin_provider: StandIn) -> None:
    """With a `model` form field LiteLLM uses that model's api_base and key, and encodes the
    model into the ids it answers; every later call finds the model in the id. A list needs
    ``?model=``."""
    line = (json.dumps(BATCH_LINE) + "\n").encode()
    uploaded = api.post(
        "/v1/files",
        data={"purpose": "batch", "model": "standin-gpt"},
        files={"file": ("batch.jsonl", line, "application/jsonl")},
    )
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]
    raw_file_id = list(standin_provider.files)[-1]
    assert file_id != raw_file_id and file_id.startswith("file-")
    assert standin_provider.file_contents[raw_file_id] == line

    assert api.get(f"/v1/files/{file_id}").json()["id"] == file_id
    assert api.get(f"/v1/files/{file_id}/content").content == line
    listed = api.get("/v1/files", params={"model": "standin-gpt"}).json()
    assert raw_file_id in [f["id"] for f in listed["data"]]  # the list has provider ids

    batch = api.post(
        "/v1/batches",
        json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
              "completion_window": "24h"},
    ).json()  # fmt: skip
    assert batch["input_file_id"] == file_id
    assert batch["status"] == "validating"
    assert standin_provider.last("/v1/batches").json()["input_file_id"] == raw_file_id
    batch_id = batch["id"]
    assert api.get(f"/v1/batches/{batch_id}").json()["id"] == batch_id
    batches = api.get("/v1/batches", params={"model": "standin-gpt"}).json()
    assert batch_id in [b["id"] for b in batches["data"]]  # this list has LiteLLM's ids
    assert api.post(f"/v1/batches/{batch_id}/cancel").json()["status"] == "cancelling"

    deleted = api.delete(f"/v1/files/{file_id}").json()
    assert deleted == {"id": raw_file_id, "deleted": True, "object": "file"}
    assert api.get(f"/v1/files/{file_id}").status_code == 404


def test_file_upload_without_a_model_fails(api: httpx.Client) -> None:
    line = (json.dumps(BATCH_LINE) + "\n").encode()
    answer = api.post("/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", line)})
    assert answer.status_code == 500
    assert "files_settings is not set" in answer.json()["error"]["message"]


def test_files_and_batches_sdk(sdk: openai.OpenAI) -> None:
    """The same with the OpenAI SDK: the model goes in extra_body (upload) and extra_query
    (list); LiteLLM also takes it from an ``x-litellm-model`` header."""
    line = (json.dumps(BATCH_LINE) + "\n").encode()
    uploaded = sdk.files.create(
        file=("batch.jsonl", line), purpose="batch", extra_body={"model": "standin-gpt"}
    )
    assert sdk.files.content(uploaded.id).read() == line
    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert sdk.batches.retrieve(batch.id).status == "validating"
    listed = sdk.batches.list(extra_headers={"x-litellm-model": "standin-gpt"})
    assert batch.id in [b.id for b in listed]
    assert sdk.files.delete(uploaded.id).deleted
