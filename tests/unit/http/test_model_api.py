"""The model API families through the one pipeline, in memory: Responses, Anthropic
Messages (its key header, its headers passed on, its error shape), binary answers relayed,
uploads streamed, URL arguments and queries, and ownership of stored objects."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.web._newclient import ResponseFailed
from twisted.web.http import _DataLoss
from twisted.web.server import NOT_DONE_YET, Request

from mpcapi.exchange import Exchange
from mpcapi.policy.ownership import provider_id
from tests.support.databases import sqlite_url
from tests.support.gateway import (
    Harness,
    answer,
    json_body,
    make_harness,
    observed_harness,
    tcp_harness,
)
from tests.support.keys import Answer, client_key, keyed_harness, new_key, settle
from tests.unit.openai.test_model_api_wire import BOUNDARY, form_body

MESSAGE = {"model": "claude-x", "max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}]}
ANTHROPIC_ANSWER = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-x",
    "content": [{"type": "text", "text": "Hello"}],
    "usage": {"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 3},
}
MULTIPART = {"content-type": [b"multipart/form-data; boundary=" + BOUNDARY]}


def anthropic_error(document: Any, kind: str, *words: str) -> None:
    assert document["type"] == "error"
    assert document["error"]["type"] == kind
    for word in words:
        assert word in document["error"]["message"]
    assert document["request_id"]


# --- Responses and Anthropic Messages -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_response_is_forwarded_and_its_usage_read() -> None:
    harness, seen = observed_harness()
    document = {"id": "resp_1", "model": "m", "usage": {"input_tokens": 4, "output_tokens": 6}}
    harness.fake.routes[("POST", "/responses")] = answer(
        200, document, {"x-litellm-response-cost": "0.002"}
    )
    response = await harness.post("/v1/responses", {"model": "m", "input": "Hi"})
    assert response.code == 200
    assert (await json_body(response))["id"] == "resp_1"
    exchange = seen[-1]
    assert exchange.route == "/responses" and exchange.model == "m"
    assert exchange.usage is not None
    assert (exchange.usage.prompt_tokens, exchange.usage.completion_tokens) == (4, 6)
    assert exchange.usage.cost_usd == 0.002


@pytest_twisted.ensureDeferred
async def test_a_bad_responses_body_is_a_400_naming_the_field() -> None:
    harness = make_harness()
    response = await harness.post("/api/responses", {"model": "m"})
    assert response.code == 400
    document = await json_body(response)
    assert document["error"]["type"] == "invalid_request_error"
    assert "input" in document["error"]["message"]
    assert harness.fake.seen == []


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1", "/anthropic/v1"])
@pytest_twisted.ensureDeferred
async def test_anthropic_messages_take_x_api_key_and_pass_anthropic_headers(prefix: str) -> None:
    keys = {"key_a": client_key("key_a", "alice")}
    harness = keyed_harness(keys)
    harness.fake.routes[("POST", "/v1/messages")] = answer(200, ANTHROPIC_ANSWER)
    headers = {"x-api-key": "key_a", "anthropic-version": "2023-06-01", "anthropic-beta": "b1"}
    response = await harness.post(f"{prefix}/messages", MESSAGE, headers=headers)
    assert response.code == 200
    assert (await json_body(response))["content"][0]["text"] == "Hello"
    sent = harness.fake.seen[-1]
    assert sent.path == "/v1/messages"
    assert sent.header("anthropic-version") == "2023-06-01"
    assert sent.header("anthropic-beta") == "b1"
    assert sent.header("authorization") == "Bearer sk-ours"  # ours, never the client's
    assert sent.header("x-api-key") is None


@pytest_twisted.ensureDeferred
async def test_anthropic_usage_counts_cache_tokens_in_the_prompt() -> None:
    harness, seen = observed_harness()
    harness.fake.routes[("POST", "/v1/messages")] = answer(200, ANTHROPIC_ANSWER)
    assert (await harness.post("/v1/messages", MESSAGE)).code == 200
    usage = seen[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cache_read_tokens) == (8, 2, 3)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "claude-x", "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens"),
        ({"model": "claude-x", "max_tokens": 5}, "messages"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}, "model"),
        ({**MESSAGE, "messages": [{"role": "system", "content": "Hi"}]}, "role"),
        ({**MESSAGE, "max_tokens": 0}, "max_tokens"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_anthropic_body_is_an_anthropic_shaped_400(body: Any, field: str) -> None:
    harness = make_harness()
    response = await harness.post("/v1/messages", body)
    assert response.code == 400
    anthropic_error(await json_body(response), "invalid_request_error", field)
    assert harness.fake.seen == []


@pytest_twisted.ensureDeferred
async def test_anthropic_routes_refuse_in_anthropic_shape() -> None:
    harness = keyed_harness({"key_a": client_key("key_a", "alice")})
    refused = await harness.post("/v1/messages", MESSAGE, headers={"x-api-key": "nope"})
    assert refused.code == 401
    anthropic_error(await json_body(refused), "authentication_error")
    missing = await harness.post("/anthropic/v1/complete", MESSAGE, headers={"x-api-key": "key_a"})
    assert missing.code == 404
    anthropic_error(await json_body(missing), "not_found_error", "/anthropic/v1/complete")
    wrong = await harness.get("/v1/messages", headers={"x-api-key": "key_a"})
    assert wrong.code == 405
    anthropic_error(await json_body(wrong), "invalid_request_error", "GET")
    # The OpenAI routes keep OpenAI's shape.
    openai = await harness.post("/v1/responses", {"model": "m", "input": "x"})
    assert (await json_body(openai))["error"]["type"] == "authentication_error"


# --- binary answers, uploads, URL arguments ----------------------------------------------------


def audio(size: int) -> Any:
    def handle(request: Request) -> bytes:
        request.setHeader(b"content-type", b"audio/mpeg")
        request.setHeader(b"x-litellm-response-cost", b"0.015")
        return bytes(range(256)) * (size // 256)

    return handle


@pytest_twisted.ensureDeferred
async def test_speech_is_relayed_byte_for_byte_with_its_type_and_cost() -> None:
    harness, seen = observed_harness()
    harness.fake.routes[("POST", "/audio/speech")] = audio(2 * 1024 * 1024)
    body = {"model": "tts-1", "input": "Hello", "voice": "alloy"}
    response = await harness.post("/v1/audio/speech", body)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"audio/mpeg"]
    content = await response.content()
    assert content == bytes(range(256)) * (2 * 1024 * 1024 // 256)
    usage = seen[-1].usage
    assert usage is not None and usage.cost_usd == 0.015
    assert seen[-1].outcome == "completed"


@pytest_twisted.ensureDeferred
async def test_a_bad_speech_body_is_a_400() -> None:
    harness = make_harness()
    response = await harness.post("/v1/audio/speech", {"model": "tts-1", "input": "Hello"})
    assert response.code == 400
    assert "voice" in (await json_body(response))["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_an_upload_reaches_litellm_unchanged_with_its_boundary() -> None:
    seen: list[Exchange] = []
    with tcp_harness(observers=[seen.append]) as harness:
        harness.fake.routes[("POST", "/audio/transcriptions")] = answer(200, {"text": "hi"})
        body = form_body(("model", b"whisper-1", None), ("file", b"\x00RIFF" * 50_000, "a.wav"))
        url = "http://mpcapi.test/v1/audio/transcriptions"
        response = await settle(harness, harness.client.post(url, data=body, headers=MULTIPART))
        assert response.code == 200
        assert json.loads(await settle(harness, response.content()))["text"] == "hi"
    sent = harness.fake.seen[-1]
    assert sent.body == body
    assert sent.header("content-type") == MULTIPART["content-type"][0].decode()
    assert seen[-1].model == "whisper-1"


@pytest.mark.parametrize(
    ("path", "parts", "field"),
    [
        ("/v1/audio/transcriptions", [("model", b"whisper-1", None)], "file"),
        ("/v1/audio/translations", [("file", b"x", "a.wav")], "model"),
        ("/v1/images/edits", [("image", b"x", "a.png")], "prompt"),
        ("/v1/files", [("file", b"x", "a.jsonl")], "purpose"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_an_upload_without_a_required_field_is_a_400_naming_it(
    path: str, parts: list[tuple[str, bytes, str | None]], field: str
) -> None:
    harness = make_harness()
    response = await harness.post(path, form_body(*parts), headers=MULTIPART)
    assert response.code == 400
    document = await json_body(response)
    assert document["error"]["param"] == field
    assert f"'{field}'" in document["error"]["message"]
    assert harness.fake.seen == []


@pytest_twisted.ensureDeferred
async def test_an_upload_that_is_not_a_form_is_a_400() -> None:
    """(Broken forms are tested on the daemon: StubTreq's own Site parses forms first.)"""
    harness = make_harness()
    headers = {"content-type": [b"application/json"]}
    response = await harness.post("/v1/audio/transcriptions", b"{}", headers=headers)
    assert response.code == 400
    assert "multipart/form-data" in (await json_body(response))["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_url_arguments_and_queries_reach_litellm() -> None:
    harness = make_harness()
    harness.fake.routes[("GET", "/files/file-9/content")] = audio(256)
    harness.fake.routes[("GET", "/models/gpt-4o-mini")] = answer(200, {"id": "gpt-4o-mini"})
    harness.fake.routes[("GET", "/files")] = answer(200, {"object": "list", "data": []})
    content = await harness.get("/v1/files/file-9/content")
    assert content.code == 200 and len(await content.content()) == 256
    model = await harness.get("/api/models/gpt-4o-mini")
    assert (await json_body(model))["id"] == "gpt-4o-mini"
    listed = await harness.get("/v1/files?purpose=batch&limit=2")
    assert listed.code == 200
    assert harness.fake.seen[-1].query == "purpose=batch&limit=2"


@pytest.mark.parametrize(
    "path", ["/api/key/generate", "/v1/user/new", "/team/list", "/config/update"]
)
@pytest_twisted.ensureDeferred
async def test_litellm_admin_routes_are_not_reachable(path: str) -> None:
    harness = make_harness()
    response = await harness.post(path, {"key_alias": "x"})
    assert response.code == 404
    assert harness.fake.seen == []


# --- ownership ---------------------------------------------------------------------------------


@pytest.fixture
def owned(tmp_path: Path) -> Iterator[Harness]:
    """Client keys on, over SQLite; the fake LiteLLM (over TCP: uploads) stores files."""
    with tcp_harness(auth="keys", database_url=sqlite_url(tmp_path)) as harness:
        yield from _storing(harness)


def _storing(harness: Harness) -> Iterator[Harness]:
    files: dict[str, dict[str, Any]] = {}

    def upload(request: Request) -> bytes:
        file_id = f"file-{len(files) + 1}"
        files[file_id] = {"id": file_id, "object": "file", "purpose": "batch"}
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(files[file_id]).encode()

    def listing(request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        items = list(files.values())
        return json.dumps(
            {"object": "list", "data": items, "first_id": "x", "last_id": "y"}
        ).encode()

    harness.fake.routes[("POST", "/files")] = upload
    harness.fake.routes[("GET", "/files")] = listing
    for file_id in ("file-1", "file-2"):
        harness.fake.routes[("GET", f"/files/{file_id}")] = answer(200, {"id": file_id})
        harness.fake.routes[("DELETE", f"/files/{file_id}")] = answer(200, {"id": file_id})
    harness.fake.routes[("POST", "/batches")] = answer(200, {"id": "batch_1", "object": "batch"})
    harness.fake.routes[("POST", "/responses")] = answer(
        200, {"id": "resp_1", "object": "response"}
    )
    harness.fake.routes[("GET", "/responses/resp_1")] = answer(200, {"id": "resp_1"})
    yield harness
    assert harness.keys is not None
    harness.keys.database.close()


async def send(
    harness: Harness, method: str, path: str, secret: str, body: Any = None, **kwargs: Any
) -> Answer:
    headers = {"Authorization": f"Bearer {secret}", **kwargs.pop("headers", {})}
    url = f"http://mpcapi.test{path}"
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    d = harness.client.request(method, url, data=body, headers=headers, **kwargs)
    response = await settle(harness, d)
    return Answer(response.code, response.headers, await settle(harness, response.content()))


@pytest_twisted.ensureDeferred
async def test_stored_objects_are_seen_by_their_owner_only(owned: Harness) -> None:
    harness = owned
    _, alice = await new_key(harness, "alice")
    _, bob = await new_key(harness, "bob")
    upload = form_body(("purpose", b"batch", None), ("file", b'{"a": 1}\n', "in.jsonl"))
    multipart = {"content-type": MULTIPART["content-type"][0].decode()}
    made = await send(harness, "POST", "/v1/files", alice, upload, headers=multipart)
    assert made.code == 200 and made.json()["id"] == "file-1"
    made = await send(harness, "POST", "/v1/files", bob, upload, headers=multipart)
    assert made.json()["id"] == "file-2"

    assert (await send(harness, "GET", "/v1/files/file-1", alice)).code == 200
    for method, path in [("GET", "/v1/files/file-1"), ("DELETE", "/v1/files/file-1")]:
        refused = await send(harness, method, path, bob)
        assert refused.code == 404, (method, path)
        assert "file-1" in refused.json()["error"]["message"]
    listed = await send(harness, "GET", "/v1/files", bob)
    assert [item["id"] for item in listed.json()["data"]] == ["file-2"]
    assert listed.json()["first_id"] == listed.json()["last_id"] == "file-2"

    batch = {
        "input_file_id": "file-1",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    assert (await send(harness, "POST", "/v1/batches", bob, batch)).code == 404
    assert (await send(harness, "POST", "/v1/batches", alice, batch)).code == 200

    first = await send(harness, "POST", "/v1/responses", alice, {"model": "m", "input": "x"})
    assert first.json()["id"] == "resp_1"
    assert (await send(harness, "GET", "/v1/responses/resp_1", bob)).code == 404
    assert (await send(harness, "GET", "/v1/responses/resp_1", alice)).code == 200
    chained = {"model": "m", "input": "y", "previous_response_id": "resp_1"}
    assert (await send(harness, "POST", "/v1/responses", bob, chained)).code == 404
    unknown = await send(harness, "GET", "/v1/batches/batch_404", alice)
    assert unknown.code == 404
    gets = [s for s in harness.fake.seen if s.method == "GET" and s.path != "/files"]
    assert [s.path for s in gets] == ["/files/file-1", "/responses/resp_1"]


def litellm_response_id(raw: str) -> str:
    """A response id as LiteLLM 1.106 makes it (responses/utils.py)."""
    text = f"litellm:custom_llm_provider:openai;model_id:abc123;response_id:{raw}"
    return "resp_" + base64.b64encode(text.encode()).decode()


def litellm_file_id(raw: str, prefix: str = "file-") -> str:
    """A file or batch id as LiteLLM 1.106 makes it (openai_files_endpoints/common_utils.py)."""
    text = f"litellm:{raw};model,standin-gpt"
    return prefix + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def test_owners_are_kept_by_the_provider_id_inside_litellms_ids() -> None:
    assert provider_id(litellm_response_id("resp_abc")) == "resp_abc"
    assert provider_id(litellm_file_id("file-xyz")) == "file-xyz"
    assert provider_id(litellm_file_id("batch_q1", "batch_")) == "batch_q1"
    for plain in ("resp_plain", "file-abc", "batch_!!", "resp_@@@", "msg_1", ""):
        assert provider_id(plain) == plain


@pytest_twisted.ensureDeferred
async def test_a_response_id_encoded_anew_still_belongs_to_its_owner(owned: Harness) -> None:
    """LiteLLM answers a GET with the same response under a new id; and a file list shows
    the provider's ids: both are still the owner's."""
    harness = owned
    _, alice = await new_key(harness, "alice")
    _, bob = await new_key(harness, "bob")
    first = litellm_response_id("resp_raw1")
    again = (
        "resp_"
        + base64.b64encode(
            b"litellm:custom_llm_provider:openai;model_id:other;response_id:resp_raw1"
        ).decode()
    )
    created = {"id": first, "object": "response"}
    harness.fake.routes[("POST", "/responses")] = answer(200, created)
    for response_id in (first, again):
        harness.fake.routes[("GET", f"/responses/{response_id}")] = answer(200, {"id": again})
    assert (
        await send(harness, "POST", "/v1/responses", alice, {"model": "m", "input": "x"})
    ).code == 200
    assert (await send(harness, "GET", f"/v1/responses/{again}", alice)).code == 200
    assert (await send(harness, "GET", f"/v1/responses/{again}", bob)).code == 404
    forged = litellm_file_id("resp_raw1")  # the right provider id, in another wrapping
    assert (await send(harness, "GET", f"/v1/responses/{forged}", bob)).code == 404


@pytest_twisted.ensureDeferred
async def test_speech_that_stalls_midway_drops_the_client_connection() -> None:
    """A binary answer cannot carry an error: past LITELLM_TIMEOUT of silence the client's
    connection is dropped, so it sees a short body, never a whole-looking one."""
    harness, seen = observed_harness()
    held: list[Request] = []

    def first_chunk_then_silence(request: Request) -> int:
        request.setHeader(b"content-type", b"audio/mpeg")
        request.write(b"ID3" + bytes(1000))
        held.append(request)
        return NOT_DONE_YET

    harness.fake.routes[("POST", "/audio/speech")] = first_chunk_then_silence
    body = {"model": "tts-1", "input": "Hello", "voice": "alloy"}
    response = await harness.post("/v1/audio/speech", body)
    assert response.code == 200
    collected = response.content()
    harness.flush()
    harness.clock.advance(harness.settings.litellm_timeout + 1)
    harness.flush()
    with pytest.raises(ResponseFailed) as broken:
        await collected
    assert any(reason.check(_DataLoss) for reason in broken.value.reasons)  # a short body
    assert seen[-1].outcome == "timeout"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/responses", {"model": "m", "input": []}, "input"),
        ("/v1/responses", {"model": "", "input": "x"}, "model"),
        ("/v1/responses", {"model": "m", "input": "x", "temperature": 3}, "temperature"),
        ("/v1/responses/input_tokens", {"input": "x"}, "model"),
        ("/v1/messages/count_tokens", {"model": "m"}, "messages"),
        ("/v1/rerank", {"model": "m", "query": "q"}, "documents"),
        ("/v2/rerank", {"model": "m", "query": "", "documents": ["a"]}, "query"),
        ("/v1/moderations", {"model": "m"}, "input"),
        ("/v1/images/generations", {"model": "m"}, "prompt"),
        ("/v1/images/generations", {"model": "m", "prompt": "x", "n": 0}, "n"),
        ("/v1/audio/speech", {"model": "m", "input": "x", "voice": "v", "speed": 9}, "speed"),
        (
            "/v1/batches",
            {"input_file_id": "f", "endpoint": "/v1/chat/completions"},
            "completion_window",
        ),
        (
            "/v1/batches",
            {"input_file_id": "f", "endpoint": "/v1/nope", "completion_window": "24h"},
            "endpoint",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_every_json_route_refuses_a_bad_body_naming_the_field(
    path: str, body: Any, field: str
) -> None:
    harness = make_harness()
    response = await harness.post(path, body)
    assert response.code == 400
    document = await json_body(response)
    # (Both shapes, OpenAI's and Anthropic's, carry the message in error.message.)
    assert field in document["error"]["message"]
    assert harness.fake.seen == []


@pytest_twisted.ensureDeferred
async def test_model_access_covers_the_model_api_in_each_routes_shape() -> None:
    """A key limited to some models gets 403 for any other, on every family: OpenAI-shaped
    on the OpenAI routes, Anthropic-shaped on Anthropic's, uploads and GET /models/{id} too."""
    key = attrs.evolve(client_key("key_a", "alice"), models=("standin-claude", "openai/*"))
    harness = keyed_harness({"key_a": key})
    harness.fake.routes[("POST", "/v1/messages")] = answer(200, ANTHROPIC_ANSWER)
    allowed = await harness.post(
        "/v1/messages", {**MESSAGE, "model": "standin-claude"}, headers={"x-api-key": "key_a"}
    )
    assert allowed.code == 200
    refused = await harness.post("/v1/messages", MESSAGE, headers={"x-api-key": "key_a"})
    assert refused.code == 403
    anthropic_error(await json_body(refused), "permission_error", "claude-x")
    bearer = {"authorization": "Bearer key_a"}
    openai = await harness.post("/v1/responses", {"model": "gpt-4o", "input": "x"}, headers=bearer)
    assert openai.code == 403
    document = await json_body(openai)
    assert (document["error"]["type"], document["error"]["code"]) == (
        "permission_error",
        "model_not_allowed",
    )
    model = await harness.get("/v1/models/gpt-4o", headers=bearer)
    assert model.code == 403
    upload = form_body(("model", b"whisper-1", None), ("file", b"x", "a.wav"))
    headers = {**MULTIPART, "authorization": [b"Bearer key_a"]}
    transcription = await harness.post("/v1/audio/transcriptions", upload, headers=headers)
    assert transcription.code == 403
    assert [s.path for s in harness.fake.seen] == ["/v1/messages"]
