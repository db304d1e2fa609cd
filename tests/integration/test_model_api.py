"""The whole model API through MPC-API, for real: ``twistd -n mpcapi`` with client keys, in
front of the real LiteLLM, whose ``standin-*`` models call the stand-in provider
(tests/support/standin.py) and whose mock models answer themselves. Driven by the official
``openai`` and ``anthropic`` SDKs; usage rows read from the daemon's SQLite database."""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from websockets.sync.client import connect

from mpcapi.storage.database import SyncDatabase
from mpcapi.storage.keys import create_key
from tests.support.standin import (
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    PNG_1X1,
    STANDIN_TEXT,
    STANDIN_TRANSCRIPT,
)

from .harness import MOCK_TEXT, Daemon, DaemonLauncher, LiteLLM, daemon_defaults

ROW_TIMEOUT = 10.0
BATCH_LINE = {
    "custom_id": "1",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]},
}


class Gateway:
    """The daemon of this module, its database, and two client keys."""

    def __init__(self, daemon: Daemon, database: Path, alice: str, bob: str) -> None:
        self.daemon = daemon
        self.database = database
        self.alice = alice
        self.bob = bob

    def openai(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.daemon.url + "/v1", api_key=key or self.alice, max_retries=0, timeout=20
        )

    def anthropic(self, key: str | None = None, prefix: str = "/anthropic") -> anthropic.Anthropic:
        return anthropic.Anthropic(
            base_url=self.daemon.url + prefix, api_key=key or self.alice, max_retries=0, timeout=20
        )

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {key or self.alice}"}
        return httpx.Client(base_url=self.daemon.url, headers=headers, timeout=20)

    def row(self, request_id: str) -> dict[str, Any]:
        """The usage row of ``request_id``, once the ledger has written it."""
        deadline = time.monotonic() + ROW_TIMEOUT
        while True:
            with sqlite3.connect(self.database) as connection:
                connection.row_factory = sqlite3.Row
                found = connection.execute(
                    "SELECT * FROM usage WHERE request_id = ?", (request_id,)
                ).fetchone()
            if found is not None:
                return dict(found)
            assert time.monotonic() < deadline, f"no usage row for {request_id}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def gateway(litellm: LiteLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("model-api")
    path = root / "mpcapi.db"
    url = f"sqlite:///{path}"
    database = SyncDatabase(url)
    database.migrate()
    _, alice = database.run(create_key, "alice")
    _, bob = database.run(create_key, "bob")
    database.close()
    launcher = DaemonLauncher(root, daemon_defaults(litellm))
    try:
        daemon = launcher.start(
            MPCAPI_AUTH="keys",
            MPCAPI_DATABASE_URL=url,
            MPCAPI_USAGE_FLUSH_SECONDS="0.2",
            MPCAPI_METRICS_PUBLIC="true",
        )
        yield Gateway(daemon, path, alice, bob)
    finally:
        launcher.stop_all()


def rid(name: str) -> dict[str, dict[str, str]]:
    """A request id of the test's own, to find its usage row."""
    return {"extra_headers": {"x-request-id": f"model-api-{name}"}}


# --- Responses ----------------------------------------------------------------------------------


def test_a_response_with_its_usage_and_litellms_cost(gateway: Gateway) -> None:
    response = gateway.openai().responses.create(
        model="standin-gpt", input="Hi", **rid("responses")
    )
    assert response.output_text == STANDIN_TEXT
    row = gateway.row("model-api-responses")
    assert (row["route"], row["model"], row["status"]) == ("/responses", "standin-gpt", 200)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (INPUT_TOKENS, OUTPUT_TOKENS)
    assert row["cost_usd"] > 0 and row["cost_source"] == "litellm"


def test_a_mock_response(gateway: Gateway) -> None:
    response = gateway.openai().responses.create(model="gpt-4o-mini", input="Hi")
    assert response.output_text == MOCK_TEXT


def test_a_streamed_response(gateway: Gateway) -> None:
    client = gateway.openai()
    stream = client.responses.create(
        model="standin-gpt", input="Hi", stream=True, **rid("responses-stream")
    )
    events = list(stream)
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == STANDIN_TEXT
    row = gateway.row("model-api-responses-stream")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (INPUT_TOKENS, OUTPUT_TOKENS)
    assert row["outcome"] == "completed"
    # A streamed response belongs to its creator too, under each id the stream gave it.
    for given in {events[0].response.id, events[-1].response.id}:  # type: ignore[union-attr]
        assert client.responses.retrieve(given).output_text == STANDIN_TEXT
        with pytest.raises(openai.NotFoundError):
            gateway.openai(gateway.bob).responses.retrieve(given)


def test_a_stored_response_is_its_owners_only(gateway: Gateway) -> None:
    alice, bob = gateway.openai(), gateway.openai(gateway.bob)
    created = alice.responses.create(model="standin-gpt", input="Hi")
    retrieved = alice.responses.retrieve(created.id)
    assert retrieved.output_text == STANDIN_TEXT
    # LiteLLM answers under a new id: the owner may use that one, and nobody else.
    assert alice.responses.retrieve(retrieved.id).output_text == STANDIN_TEXT
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(retrieved.id)
    items = alice.responses.input_items.list(created.id)
    assert items.data[0].content[0].text == "Hi"  # type: ignore[union-attr]
    for call in (
        lambda: bob.responses.retrieve(created.id),
        lambda: bob.responses.input_items.list(created.id),
        lambda: bob.responses.cancel(created.id),
        lambda: bob.responses.delete(created.id),
        lambda: bob.responses.create(
            model="standin-gpt", input="Go on", previous_response_id=created.id
        ),
    ):
        with pytest.raises(openai.NotFoundError) as refused:
            call()
        assert created.id in str(refused.value)
    chained = alice.responses.create(
        model="standin-gpt", input="Go on", previous_response_id=created.id
    )
    assert chained.output_text == STANDIN_TEXT
    assert alice.responses.cancel(created.id).status == "cancelled"
    alice.responses.delete(created.id)


def test_input_tokens_of_a_response(gateway: Gateway) -> None:
    with gateway.http() as http:
        answer = http.post(
            "/v1/responses/input_tokens", json={"model": "standin-gpt", "input": "x"}
        )
    assert answer.status_code == 200
    assert answer.json()["input_tokens"] == INPUT_TOKENS


def test_a_bad_responses_request_is_a_400_the_sdk_shows(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.openai().responses.create(model="standin-gpt", input=[], temperature=3)
    assert "temperature" in str(refused.value) or "input" in str(refused.value)
    assert refused.value.body["type"] == "invalid_request_error"  # type: ignore[index]


# --- Anthropic Messages -------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/anthropic", "", "/api"])
def test_a_message_through_each_prefix(gateway: Gateway, prefix: str) -> None:
    message = gateway.anthropic(prefix=prefix).messages.create(
        model="standin-claude", max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
    )
    assert message.content[0].text == STANDIN_TEXT  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        INPUT_TOKENS,
        OUTPUT_TOKENS,
    )


def test_a_mock_message_and_its_usage_row(gateway: Gateway) -> None:
    message = gateway.anthropic().messages.create(
        model="claude-mock",
        max_tokens=50,
        messages=[{"role": "user", "content": "Hi"}],
        extra_headers={"x-request-id": "model-api-messages"},
    )
    assert message.content[0].text == MOCK_TEXT  # type: ignore[union-attr]
    row = gateway.row("model-api-messages")
    assert (row["route"], row["model"], row["status"]) == ("/messages", "claude-mock", 200)
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0


def test_a_streamed_message(gateway: Gateway) -> None:
    with gateway.anthropic().messages.stream(
        model="standin-claude",
        max_tokens=50,
        messages=[{"role": "user", "content": "Hi"}],
        extra_headers={"x-request-id": "model-api-messages-stream"},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == STANDIN_TEXT
    assert final.usage.output_tokens == OUTPUT_TOKENS
    row = gateway.row("model-api-messages-stream")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (INPUT_TOKENS, OUTPUT_TOKENS)
    assert row["outcome"] == "completed"


def test_count_tokens_of_a_message(gateway: Gateway) -> None:
    counted = gateway.anthropic().messages.count_tokens(
        model="standin-claude", messages=[{"role": "user", "content": "Hi"}]
    )
    assert counted.input_tokens == INPUT_TOKENS


def test_anthropic_sdk_errors_carry_our_message(gateway: Gateway) -> None:
    client = gateway.anthropic()
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(
            model="standin-claude",
            max_tokens=0,
            messages=[{"role": "user", "content": "Hi"}],
        )
    assert "max_tokens" in str(refused.value)
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError) as unknown:
        gateway.anthropic("sk-mpc-" + "A" * 43).messages.create(
            model="standin-claude", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
        )
    assert unknown.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    # Without max_tokens the SDK itself refuses; a raw request shows our 400.
    with gateway.http() as http:
        answer = http.post(
            "/v1/messages",
            json={"model": "standin-claude", "messages": [{"role": "user", "content": "Hi"}]},
        )
    assert answer.status_code == 400
    assert answer.json()["type"] == "error"
    assert "max_tokens" in answer.json()["error"]["message"]


# --- rerank, audio, images, moderations ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/rerank", "/api/rerank", "/v2/rerank"])
def test_rerank_with_its_search_units(gateway: Gateway, path: str) -> None:
    name = "rerank" + path.replace("/", "-")
    body = {"model": "standin-rerank", "query": "q", "documents": ["a", "b", "c"], "top_n": 2}
    with gateway.http() as http:
        answer = http.post(path, json=body, headers={"x-request-id": f"model-api-{name}"})
    assert answer.status_code == 200
    assert [result["index"] for result in answer.json()["results"]] == [2, 1]
    row = gateway.row(f"model-api-{name}")
    assert (row["units"], row["unit"]) == (1.0, "search_units")
    assert row["cost_usd"] == pytest.approx(0.002)


def test_speech_and_a_transcription(gateway: Gateway) -> None:
    client = gateway.openai()
    speech = client.audio.speech.create(
        model="standin-tts", input="Hello world", voice="alloy", **rid("speech")
    )
    assert len(speech.read()) == 1000
    assert gateway.row("model-api-speech")["cost_usd"] > 0
    transcript = client.audio.transcriptions.create(
        model="standin-whisper", file=("a.mp3", b"ID3" + bytes(4000)), **rid("transcription")
    )
    assert transcript.text == STANDIN_TRANSCRIPT
    row = gateway.row("model-api-transcription")
    assert (row["model"], row["units"], row["unit"]) == ("standin-whisper", 1.0, "seconds")
    assert row["cost_usd"] > 0


def test_images(gateway: Gateway) -> None:
    client = gateway.openai()
    mock = client.images.generate(model="mock-image", prompt="a cat")
    assert mock.data is not None and mock.data[0].url == "https://images.invalid/mock.png"
    made = client.images.generate(model="standin-image", prompt="a cat", **rid("image"))
    assert made.data is not None and made.data[0].b64_json
    row = gateway.row("model-api-image")
    assert (row["units"], row["unit"]) == (1.0, "images")
    assert row["prompt_tokens"] == INPUT_TOKENS and row["cost_usd"] > 0
    edited = client.images.edit(
        model="standin-image", image=("i.png", PNG_1X1, "image/png"), prompt="a hat"
    )
    assert edited.data is not None and edited.data[0].b64_json


def test_a_moderation(gateway: Gateway) -> None:
    moderation = gateway.openai().moderations.create(model="standin-moderation", input="hello")
    assert moderation.results[0].flagged is False


def test_routes_litellm_lacks_answer_litellms_404(gateway: Gateway) -> None:
    """LiteLLM 1.106.12 has no translations or image variations: its 404 passes through."""
    with gateway.http() as http:
        for path, file_field in (
            ("/v1/audio/translations", "file"),
            ("/v1/images/variations", "image"),
        ):
            answer = http.post(
                path, data={"model": "standin-whisper"}, files={file_field: ("a.mp3", b"ID3")}
            )
            assert answer.status_code == 404, path
            assert answer.json() == {"detail": "Not Found"}


def test_bad_uploads_are_400s_naming_what_is_wrong(gateway: Gateway) -> None:
    with gateway.http() as http:
        no_model = http.post("/v1/audio/transcriptions", files={"file": ("a.mp3", b"ID3")})
        assert no_model.status_code == 400
        assert no_model.json()["error"]["param"] == "model"
        not_form = http.post(
            "/v1/audio/transcriptions",
            content=b"just bytes",
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
        assert not_form.status_code == 400
        assert "no part" in not_form.json()["error"]["message"]
        no_boundary = http.post(
            "/v1/files", content=b"x", headers={"content-type": "multipart/form-data"}
        )
        assert no_boundary.status_code == 400
        assert "boundary" in no_boundary.json()["error"]["message"]
        no_end = http.post(
            "/v1/files",
            content=b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch',
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
        assert no_end.status_code == 400
        assert "closing boundary" in no_end.json()["error"]["message"]


# --- files and batches --------------------------------------------------------------------------


def test_files_and_batches_are_their_owners_only(gateway: Gateway) -> None:
    alice, bob = gateway.openai(), gateway.openai(gateway.bob)
    line = (json.dumps(BATCH_LINE) + "\n").encode()
    model = {"extra_body": {"model": "standin-gpt"}}
    mine = alice.files.create(file=("batch.jsonl", line), purpose="batch", **model)
    theirs = bob.files.create(file=("other.jsonl", line), purpose="batch", **model)
    assert alice.files.retrieve(mine.id).id == mine.id
    assert alice.files.content(mine.id).read() == line
    listed = [f.id for f in alice.files.list(extra_query={"model": "standin-gpt"})]
    assert len(listed) == 1  # the provider's id of alice's file, not bob's
    for call in (
        lambda: bob.files.retrieve(mine.id),
        lambda: bob.files.content(mine.id),
        lambda: bob.files.delete(mine.id),
        lambda: bob.batches.create(
            input_file_id=mine.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    batch = alice.batches.create(
        input_file_id=mine.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert alice.batches.retrieve(batch.id).status == "validating"
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.cancel(batch.id)
    assert [b.id for b in bob.batches.list(extra_query={"model": "standin-gpt"})] == []
    assert [b.id for b in alice.batches.list(extra_query={"model": "standin-gpt"})] == [batch.id]
    assert alice.batches.cancel(batch.id).status == "cancelling"
    assert alice.files.delete(mine.id).deleted
    assert bob.files.delete(theirs.id).deleted


# --- models and what is not forwarded -----------------------------------------------------------


def test_a_model_by_id(gateway: Gateway) -> None:
    model = gateway.openai().models.retrieve("gpt-4o-mini")
    assert model.id == "gpt-4o-mini"


@pytest.mark.parametrize(
    "path", ["/key/generate", "/api/key/generate", "/v1/user/new", "/team/new", "/config/update"]
)
def test_litellm_admin_routes_are_never_reachable(
    gateway: Gateway, litellm: LiteLLM, path: str
) -> None:
    """Even with LiteLLM's master key in hand, its admin routes are not behind MPC-API."""
    request = urllib.request.Request(
        gateway.daemon.url + path,
        data=b'{"key_alias": "x"}',
        headers={"authorization": f"Bearer {litellm.key}", "content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 404
    assert path in json.loads(refused.value.read())["error"]["message"]


def test_openapi_lists_the_whole_model_api(gateway: Gateway) -> None:
    with urllib.request.urlopen(gateway.daemon.url + "/openapi.json", timeout=10) as answer:
        paths = json.loads(answer.read())["paths"]
    for path in (
        "/v1/responses",
        "/v1/responses/{response_id}",
        "/anthropic/v1/messages",
        "/v2/rerank",
        "/v1/audio/speech",
        "/v1/images/edits",
        "/v1/files/{file_id}/content",
        "/v1/batches/{batch_id}/cancel",
        "/v1/models/{model_id}",
    ):
        assert path in paths, path
    assert (
        "multipart/form-data" in paths["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]
    )


def test_every_family_is_logged_and_counted_in_metrics(gateway: Gateway) -> None:
    """After the tests above on this module's daemon: each family they called has its log
    line and its series in /metrics, by operation (ids as {name}, never raw paths)."""
    with urllib.request.urlopen(gateway.daemon.url + "/metrics", timeout=10) as answer:
        metrics = answer.read().decode()
    for route in (
        "/responses",
        "/responses/{response_id}",
        "/messages",
        "/rerank",
        "/audio/speech",
        "/audio/transcriptions",
        "/images/generations",
        "/moderations",
        "/files",
        "/files/{file_id}/content",
        "/batches",
    ):
        counted = [
            line
            for line in metrics.splitlines()
            if line.startswith("mpcapi_requests_total{") and f'route="{route}"' in line
        ]
        assert counted and all(float(line.rsplit(" ", 1)[1]) >= 1 for line in counted), route
    assert "resp_" not in metrics and "file-" not in metrics  # no raw ids in labels
    log = gateway.daemon.log_text()
    for line in ("POST /anthropic/v1/messages 200", "POST /v1/audio/transcriptions 200"):
        assert line in log, line
    assert "Traceback" not in log


def test_an_upload_over_the_body_limit_is_a_413_in_the_routes_shape(
    start_mpcapi: Callable[..., Daemon],
) -> None:
    """MPCAPI_MAX_BODY_BYTES holds for uploads too, refused before the body is read; on an
    Anthropic route the 413 has Anthropic's shape (it comes before any routing)."""
    daemon = start_mpcapi(MPCAPI_MAX_BODY_BYTES="2000")
    with httpx.Client(base_url=daemon.url, timeout=20) as http:
        upload = http.post(
            "/v1/audio/transcriptions",
            data={"model": "standin-whisper"},
            files={"file": ("a.mp3", b"ID3" + bytes(10_000))},
        )
        assert upload.status_code == 413
        assert upload.json()["error"]["code"] == "payload_too_large"
        message = http.post(
            "/anthropic/v1/messages",
            json={
                **{"model": "claude-mock", "max_tokens": 5},
                "messages": [{"role": "user", "content": "x" * 10_000}],
            },
        )
        assert message.status_code == 413
        assert message.json()["type"] == "error"
        assert message.json()["error"]["type"] == "request_too_large"


def test_a_responses_request_over_the_websocket_is_streamed_and_owned(gateway: Gateway) -> None:
    url = gateway.daemon.url.replace("http://", "ws://") + "/v1/ws"
    headers = {"Authorization": f"Bearer {gateway.alice}"}
    with connect(url, additional_headers=headers, open_timeout=10) as socket:
        body = {"model": "standin-gpt", "input": "Hi"}
        socket.send(json.dumps({"id": "r1", "type": "responses", "body": body}))
        events = []
        while (message := json.loads(socket.recv(timeout=20)))["type"] == "chunk":
            events.append(message["data"])
    assert message == {"id": "r1", "type": "done"}
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == STANDIN_TEXT
    assert events[-1]["type"] == "response.completed"
    # Its owner was recorded before "done": the id works at once, for its owner only.
    response_id = events[-1]["response"]["id"]
    assert gateway.openai().responses.retrieve(response_id).output_text == STANDIN_TEXT
    with pytest.raises(openai.NotFoundError):
        gateway.openai(gateway.bob).responses.retrieve(response_id)
