"""The wire formats of the model API families: multipart uploads read without holding
them, the Responses and Anthropic event streams, and every family's usage."""

from __future__ import annotations

import io
import json

import pytest

from mpcapi.openai import multipart
from mpcapi.openai.events import ANTHROPIC_EVENTS, CHAT_EVENTS, RESPONSES_EVENTS
from mpcapi.openai.multipart import FormError, boundary_of, scan_form
from mpcapi.openai.sse import SSEEvent, SSEParser
from mpcapi.openai.usage import usage_of_answer, usage_of_cost, usage_of_images

BOUNDARY = b"----mpcapi-test-boundary"


def form_body(*parts: tuple[str, bytes, str | None], boundary: bytes = BOUNDARY) -> bytes:
    """A multipart body of (name, value, filename) parts."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += b"--" + boundary + b"\r\n"
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


# --- multipart ---------------------------------------------------------------------------------


def test_a_form_yields_its_fields_and_the_names_of_its_files() -> None:
    body = form_body(("model", b"whisper-1", None), ("file", b"RIFF....", "a.wav"))
    form = scan_form(io.BytesIO(body), BOUNDARY)
    assert form.fields == {"model": "whisper-1"}
    assert form.files == frozenset({"file"})
    assert "file" in form and "model" in form and "purpose" not in form


@pytest.mark.parametrize("offset", range(-3, 4))
def test_a_file_much_larger_than_a_chunk_is_read_through_wherever_the_boundary_falls(
    offset: int,
) -> None:
    """The delimiter may be split across two reads: every split point still finds it."""
    size = 3 * multipart.CHUNK + offset - len(b"\r\n--") - 40
    body = form_body(("file", b"\xff" * size, "big.bin"), ("purpose", b"batch", None))
    form = scan_form(io.BytesIO(body), BOUNDARY)
    assert form.fields == {"purpose": "batch"} and form.files == frozenset({"file"})


def test_a_field_value_is_kept_to_its_first_kilobyte() -> None:
    body = form_body(("model", b"m" * 5000, None))
    assert scan_form(io.BytesIO(body), BOUNDARY).fields["model"] == "m" * multipart.FIELD_LIMIT


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "no part"),
        (b"hello world", "no part"),
        (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=a\r\n\r\nx", "closing"),
        (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=a", "headers"),
    ],
)
def test_a_broken_form_is_a_form_error(body: bytes, reason: str) -> None:
    with pytest.raises(FormError, match=reason):
        scan_form(io.BytesIO(body), BOUNDARY)


def test_the_boundary_comes_from_a_multipart_content_type_only() -> None:
    assert boundary_of(b'multipart/form-data; boundary="abc"') == b"abc"
    assert boundary_of(b"multipart/form-data; boundary=abc") == b"abc"
    for bad in (None, b"application/json", b"multipart/form-data", b"text/plain; boundary=x"):
        with pytest.raises(FormError):
            boundary_of(bad)


# --- event streams -----------------------------------------------------------------------------


def named(event: str, document: dict[str, object]) -> SSEEvent:
    return SSEEvent(json.dumps(document), event)


def test_a_responses_stream_says_its_id_text_usage_and_end() -> None:
    reader = RESPONSES_EVENTS.reader()
    created = {"type": "response.created", "response": {"id": "resp_1", "model": "m"}}
    assert reader.read(named("response.created", created)) == (False, False)
    assert reader.object_ids == ["resp_1"] and not reader.done
    delta = {"type": "response.output_text.delta", "delta": "Hi"}
    assert reader.read(named("response.output_text.delta", delta)) == (True, False)
    usage = {"input_tokens": 7, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 2}}
    completed = {"type": "response.completed", "response": {"model": "m-1", "usage": usage}}
    reader.read(named("response.completed", completed))
    assert reader.done
    assert reader.usage is not None
    assert (reader.usage.prompt_tokens, reader.usage.completion_tokens) == (7, 3)
    assert (reader.usage.cache_read_tokens, reader.usage.model) == (2, "m-1")


def test_an_anthropic_stream_adds_its_output_tokens_to_the_input_of_its_start() -> None:
    reader = ANTHROPIC_EVENTS.reader()
    usage = {"input_tokens": 10, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 1}
    start = {"type": "message_start", "message": {"model": "claude", "usage": usage}}
    reader.read(named("message_start", start))
    text = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}
    assert reader.read(named("content_block_delta", text)) == (True, False)
    tool = {"type": "content_block_delta", "delta": {"type": "input_json_delta"}}
    assert reader.read(named("content_block_delta", tool)) == (False, False)
    reader.read(named("message_delta", {"type": "message_delta", "usage": {"output_tokens": 9}}))
    assert not reader.done
    reader.read(named("message_stop", {"type": "message_stop"}))
    assert reader.done and reader.usage is not None
    assert reader.usage.prompt_tokens == 16  # Anthropic's input_tokens leaves the cache out
    assert (reader.usage.completion_tokens, reader.usage.cache_read_tokens) == (9, 5)
    assert (reader.usage.cache_write_tokens, reader.usage.model) == (1, "claude")


@pytest.mark.parametrize("events", [CHAT_EVENTS, RESPONSES_EVENTS, ANTHROPIC_EVENTS])
def test_every_family_ends_a_failed_stream_with_an_event_carrying_the_message(events) -> None:  # type: ignore[no-untyped-def]
    frames = SSEParser().feed(events.error_event("LiteLLM sent nothing for 5 s", "timeout"))
    assert len(frames) == 1
    document = json.loads(frames[0].data)
    assert document["error"]["message"] == "LiteLLM sent nothing for 5 s"
    if events is not CHAT_EVENTS:  # the named families name it "error", as their APIs do
        assert frames[0].event == "error" and document["type"] == "error"


# --- usage -------------------------------------------------------------------------------------


def test_usage_of_each_family_of_answer() -> None:
    responses = {"model": "m", "usage": {"input_tokens": 4, "output_tokens": 2}}
    usage = usage_of_answer(json.dumps(responses).encode(), b"0.25")
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cost_usd) == (4, 2, 0.25)
    rerank = {"results": [], "meta": {"billed_units": {"search_units": 1}}}
    usage = usage_of_answer(json.dumps(rerank).encode(), None)
    assert usage is not None and (usage.units, usage.unit) == (1.0, "search_units")
    transcription = {"text": "hi", "usage": {"type": "duration", "seconds": 12}}
    usage = usage_of_answer(json.dumps(transcription).encode(), b"0.001")
    assert usage is not None and (usage.units, usage.unit, usage.cost_usd) == (
        12.0,
        "seconds",
        0.001,
    )
    images = {"data": [{"url": "u"}, {"url": "v"}]}
    usage = usage_of_images(json.dumps(images).encode(), b"0.08")
    assert usage is not None and (usage.units, usage.unit, usage.cost_usd) == (2.0, "images", 0.08)
    assert usage_of_cost(b"", b"0.5") is not None
    assert usage_of_cost(b"", None) is None
    assert usage_of_answer(b'{"usage": "none"}', None) is None
