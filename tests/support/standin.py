"""A stand-in LLM provider: the few OpenAI, Anthropic and Cohere endpoints that LiteLLM calls for
the route families its ``mock_response`` cannot mock, so that LiteLLM's own routing and
translation run for real in the tests.

It imitates, in the providers' wire shapes (answers are canned, nothing is computed):

- OpenAI (``api_base = <url>/v1``): ``/chat/completions`` (stream too), ``/responses`` (stream
  with named SSE events too) and its get / delete / cancel / input_items / input_tokens,
  ``/audio/speech`` (binary), ``/audio/transcriptions`` and ``/audio/translations`` (multipart),
  ``/images/generations``, ``/images/edits`` and ``/images/variations`` (multipart),
  ``/moderations``, and ``/files`` and ``/batches``, kept in memory. (LiteLLM 1.106.12 has no
  route for translations and variations; the stand-in answers them for a direct caller.)
- Anthropic (``api_base = <url>``): ``/v1/messages`` (stream too) and ``/v1/messages/count_tokens``.
- Cohere (``api_base = <url>``): ``/v1/rerank`` and ``/v2/rerank``.

Every request is recorded (``StandIn.requests``) so that a test can check what reached the
provider: headers, JSON bodies, multipart fields. ``StandIn.hold(after=n)`` stops every stream
(and speech answer) after its first n events (chunks) until released, which shows whether the
layers in between relay it unbuffered. A speech answer has as many bytes as its input text says
when that is a number (``"input": "52428800"`` gives 50 MB, written in chunks, never held in
memory).
Serve it with ``tests.support.httpserver.serving(standin_handler(standin), ...)``, or use
``running_standin()``.
"""

from __future__ import annotations

import base64
import contextlib
import email.parser
import email.policy
import itertools
import json
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from tests.support.httpserver import serving

STANDIN_TEXT = "Hello from the stand-in provider."
# The stream cuts STANDIN_TEXT into these pieces, one content delta each.
STANDIN_DELTAS = ("Hello", " from", " the", " stand-in", " provider.")
STANDIN_TRANSCRIPT = "Transcribed by the stand-in provider."
# Token counts the stand-in reports for every answer (real providers count; it does not).
INPUT_TOKENS = 11
OUTPUT_TOKENS = 7
# The size of a speech answer whose input text is not a number of bytes.
DEFAULT_SPEECH_BYTES = 1000
SPEECH_CHUNK = 64 * 1024
# A 1x1 transparent PNG, the image of every image answer.
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
HOLD_TIMEOUT = 30.0  # a held stream goes on by itself after this, so no test hangs for ever


@dataclass(frozen=True)
class Received:
    """One request as the stand-in received it."""

    method: str
    path: str  # without the query
    query: dict[str, list[str]]
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, bytes]:
        """The fields of a multipart/form-data body, each as bytes (a file field: its content)."""
        return {name: part.content for name, part in self.parts().items()}

    def parts(self) -> dict[str, Part]:
        return parse_multipart(self.headers.get("content-type", ""), self.body)


@dataclass(frozen=True)
class Part:
    content: bytes
    filename: str | None
    content_type: str


def parse_multipart(content_type: str, body: bytes) -> dict[str, Part]:
    """The parts of a multipart/form-data body by field name (the stdlib email parser reads it;
    ``cgi`` is gone from newer Pythons)."""
    if not content_type.startswith("multipart/"):
        return {}
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    parts: dict[str, Part] = {}
    for part in message.iter_parts():  # type: ignore[attr-defined]
        name = part.get_param("name", header="content-disposition")
        if name is not None:
            payload = part.get_payload(decode=True)
            content = payload if isinstance(payload, bytes) else b""
            parts[str(name)] = Part(content, part.get_filename(), part.get_content_type())
    return parts


@dataclass
class StandIn:
    """The stand-in's state: what it received, and the files, batches and responses it keeps."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    file_contents: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    _gate: tuple[int, threading.Event] | None = None
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def new_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}{next(self._ids):06d}"

    def received(self, path: str, method: str | None = None) -> list[Received]:
        """The requests to ``path`` (and ``method``), oldest first."""
        return [
            r for r in self.requests if r.path == path and (method is None or r.method == method)
        ]

    def last(self, path: str) -> Received:
        matching = self.received(path)
        assert matching, f"the stand-in received nothing at {path}"
        return matching[-1]

    @contextmanager
    def hold(self, after: int = 1) -> Iterator[threading.Event]:
        """Every stream stops after its first ``after`` events (a speech answer: chunks of
        SPEECH_CHUNK bytes) until the yielded event is set (at the latest after HOLD_TIMEOUT,
        and on exit)."""
        gate = threading.Event()
        self._gate = (after, gate)
        try:
            yield gate
        finally:
            gate.set()
            self._gate = None

    def wait_at_gate(self, sent: int) -> None:
        """Called by a stream once it has sent ``sent`` events."""
        hold = self._gate
        if hold is not None and sent == hold[0]:
            hold[1].wait(HOLD_TIMEOUT)


# --- answers ------------------------------------------------------------------------------------


def _usage_chat() -> dict[str, Any]:
    return {
        "prompt_tokens": INPUT_TOKENS,
        "completion_tokens": OUTPUT_TOKENS,
        "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
    }


def _usage_responses() -> dict[str, Any]:
    return {
        "input_tokens": INPUT_TOKENS,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": OUTPUT_TOKENS,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
    }


def chat_completion(model: str, completion_id: str) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": STANDIN_TEXT},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage_chat(),
    }


def chat_chunks(model: str, completion_id: str, usage: bool) -> Iterator[dict[str, Any]]:
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": 0, "model": model}
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    for delta in STANDIN_DELTAS:
        yield {**base, "choices": [{"index": 0, "delta": {"content": delta}}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    if usage:
        yield {**base, "choices": [], "usage": _usage_chat()}


def response_object(
    model: str, response_id: str, status: str, text: str = STANDIN_TEXT
) -> dict[str, Any]:
    """An OpenAI Responses API response object (``status`` completed or in_progress)."""
    done = status == "completed"
    message = {
        "id": f"msg_{response_id}",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}] if done else [],
    }
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": [message] if done else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": _usage_responses() if done else None,
    }


def responses_events(model: str, response_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The named SSE events of a streamed Responses API answer."""
    item_id = f"msg_{response_id}"
    started = response_object(model, response_id, "in_progress")
    text = "".join(STANDIN_DELTAS)
    part = {"type": "output_text", "text": "", "annotations": []}
    item = {
        "id": item_id,
        "type": "message",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield "response.created", {"type": "response.created", "response": started}
    yield "response.in_progress", {"type": "response.in_progress", "response": started}
    yield (
        "response.output_item.added",
        {"type": "response.output_item.added", "output_index": 0, "item": item},
    )
    yield (
        "response.content_part.added",
        {"type": "response.content_part.added", **where, "part": part},
    )
    for delta in STANDIN_DELTAS:
        yield (
            "response.output_text.delta",
            {"type": "response.output_text.delta", **where, "delta": delta},
        )
    yield "response.output_text.done", {"type": "response.output_text.done", **where, "text": text}
    yield (
        "response.content_part.done",
        {"type": "response.content_part.done", **where, "part": {**part, "text": text}},
    )
    done = response_object(model, response_id, "completed", text)
    yield (
        "response.output_item.done",
        {"type": "response.output_item.done", "output_index": 0, "item": done["output"][0]},
    )
    yield "response.completed", {"type": "response.completed", "response": done}


def anthropic_message(model: str, message_id: str) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": STANDIN_TEXT}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS},
    }


def anthropic_events(model: str, message_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The named SSE events of a streamed Anthropic Messages answer."""
    started = {
        **anthropic_message(model, message_id),
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": 1},
    }
    yield "message_start", {"type": "message_start", "message": started}
    yield (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    for delta in STANDIN_DELTAS:
        yield (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": delta},
            },
        )
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": OUTPUT_TOKENS},
        },
    )
    yield "message_stop", {"type": "message_stop"}


def rerank_answer(body: dict[str, Any], rerank_id: str) -> dict[str, Any]:
    """Cohere's rerank answer: the documents in reverse order, scores falling."""
    documents = body.get("documents") or []
    top_n = body.get("top_n") or len(documents)
    results = [
        {"index": index, "relevance_score": round(0.9 - 0.1 * rank, 3)}
        for rank, index in enumerate(reversed(range(len(documents))))
    ][:top_n]
    return {
        "id": rerank_id,
        "results": results,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
    }


def speech_size(text: str) -> int:
    """A speech answer has as many bytes as its input text says when that is a number (a
    benchmark asks for ``"input": "52428800"``), else DEFAULT_SPEECH_BYTES."""
    return int(text) if text.strip().isdigit() else DEFAULT_SPEECH_BYTES


def image_answer(count: int) -> dict[str, Any]:
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(PNG_1X1).decode()} for _ in range(count)],
        "usage": {
            "input_tokens": INPUT_TOKENS,
            "output_tokens": OUTPUT_TOKENS,
            "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
            "input_tokens_details": {"text_tokens": INPUT_TOKENS, "image_tokens": 0},
        },
    }


def moderation_answer(model: str, moderation_id: str, inputs: Any) -> dict[str, Any]:
    count = len(inputs) if isinstance(inputs, list) else 1
    categories = ("harassment", "hate", "self-harm", "sexual", "violence")
    result = {
        "flagged": False,
        "categories": dict.fromkeys(categories, False),
        "category_scores": dict.fromkeys(categories, 0.001),
    }
    return {"id": moderation_id, "model": model, "results": [result] * count}


# --- the handler --------------------------------------------------------------------------------


def standin_handler(standin: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _handle(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            url = urlsplit(self.path)
            request = Received(
                self.command,
                url.path,
                parse_qs(url.query),
                {name.lower(): value for name, value in self.headers.items()},
                body,
            )
            standin.requests.append(request)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                route(standin, request, self)  # suppressed: the caller went away mid-answer

        do_GET = do_POST = do_DELETE = _handle

        # Answer writers, called by route().
        def send_json(self, payload: Any, status: int = 200) -> None:
            self.send_bytes(json.dumps(payload).encode(), "application/json", status)

        def send_bytes(self, data: bytes, content_type: str, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def send_sized(self, size: int, content_type: str) -> None:
            """``size`` bytes, written a chunk at a time (a 50 MB answer is never in memory)."""
            self.send_response(200)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(size))
            self.end_headers()
            chunk = b"\xff\xf3" * (SPEECH_CHUNK // 2)  # looks like MP3 frame headers
            for number, start in enumerate(range(0, size, SPEECH_CHUNK)):
                standin.wait_at_gate(number)
                self.wfile.write(chunk[: min(SPEECH_CHUNK, size - start)])

        def send_events(self, events: Iterable[tuple[str | None, Any]]) -> None:
            """Server-sent events, chunked, each sent as it comes. A name of None writes a
            ``data:`` line only; a str data (``"[DONE]"``) is written as it is, others as JSON."""
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for number, (name, data) in enumerate(events):
                standin.wait_at_gate(number)
                text = data if isinstance(data, str) else json.dumps(data)
                frame = (f"event: {name}\n" if name else "") + f"data: {text}\n\n"
                self._chunk(frame.encode())
            self._chunk(b"")

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def send_error_json(self, status: int, message: str) -> None:
            error = {"message": message, "type": "invalid_request_error", "code": None}
            self.send_json({"error": error}, status)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class Writer(Protocol):
    """How route() answers: the writers of standin_handler's Handler."""

    def send_json(self, payload: Any, status: int = 200) -> None: ...
    def send_bytes(self, data: bytes, content_type: str, status: int = 200) -> None: ...
    def send_sized(self, size: int, content_type: str) -> None: ...
    def send_events(self, events: Iterable[tuple[str | None, Any]]) -> None: ...
    def send_error_json(self, status: int, message: str) -> None: ...


def route(standin: StandIn, request: Received, out: Writer) -> None:
    """Answer ``request`` as the provider whose path it is."""
    method, path = request.method, request.path.rstrip("/")
    parts = path.strip("/").split("/")
    if method == "GET" and path == "/v1/models":  # LiteLLM asks at start
        models = [{"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "standin"}]
        out.send_json({"object": "list", "data": models})
    elif method == "POST" and path == "/v1/chat/completions":
        body = request.json()
        model, completion_id = body.get("model", ""), standin.new_id("chatcmpl-standin")
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = chat_chunks(model, completion_id, usage)
            out.send_events([*((None, chunk) for chunk in chunks), (None, "[DONE]")])
        else:
            out.send_json(chat_completion(model, completion_id))
    elif parts[:2] == ["v1", "responses"]:
        responses_route(standin, request, parts[2:], out)
    elif method == "POST" and path == "/v1/messages":
        body = request.json()
        model, message_id = body.get("model", ""), standin.new_id("msg_standin")
        if body.get("stream"):
            out.send_events(anthropic_events(model, message_id))
        else:
            out.send_json(anthropic_message(model, message_id))
    elif method == "POST" and path == "/v1/messages/count_tokens":
        out.send_json({"input_tokens": INPUT_TOKENS})
    elif method == "POST" and path in ("/v1/rerank", "/v2/rerank"):
        out.send_json(rerank_answer(request.json(), standin.new_id("rerank-standin")))
    elif method == "POST" and path == "/v1/audio/speech":
        body = request.json()
        out.send_sized(speech_size(str(body.get("input", ""))), "audio/mpeg")
    elif method == "POST" and path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        form = request.form()
        if "file" not in form:
            out.send_error_json(400, "no file in the upload")
        elif form.get("response_format", b"json") == b"text":
            out.send_bytes(STANDIN_TRANSCRIPT.encode(), "text/plain")
        else:
            duration = {"type": "duration", "seconds": 1}
            out.send_json({"text": STANDIN_TRANSCRIPT, "usage": duration})
    elif method == "POST" and path == "/v1/images/generations":
        out.send_json(image_answer(int(request.json().get("n") or 1)))
    elif method == "POST" and path in ("/v1/images/edits", "/v1/images/variations"):
        form = request.form()
        if "image" not in form and "image[]" not in form:
            out.send_error_json(400, "no image in the upload")
        else:
            out.send_json(image_answer(int(form.get("n", b"1"))))
    elif method == "POST" and path == "/v1/moderations":
        body = request.json()
        moderation = moderation_answer(
            body.get("model", ""), standin.new_id("modr-standin"), body.get("input")
        )
        out.send_json(moderation)
    elif parts[:2] == ["v1", "files"]:
        files_route(standin, request, parts[2:], out)
    elif parts[:2] == ["v1", "batches"]:
        batches_route(standin, request, parts[2:], out)
    else:
        out.send_error_json(404, f"the stand-in has no {method} {path}")


def responses_route(standin: StandIn, request: Received, rest: list[str], out: Writer) -> None:
    method = request.method
    if method == "POST" and rest == []:
        body = request.json()
        model, response_id = body.get("model", ""), standin.new_id("resp_standin")
        standin.responses[response_id] = {
            **response_object(model, response_id, "completed"),
            "input": body.get("input"),
        }
        if body.get("stream"):
            out.send_events(responses_events(model, response_id))
        else:
            out.send_json(response_object(model, response_id, "completed"))
    elif method == "POST" and rest == ["input_tokens"]:
        out.send_json({"object": "response.input_tokens", "input_tokens": INPUT_TOKENS})
    elif not rest or rest[0] not in standin.responses:
        out.send_error_json(404, f"No response found with id '{'/'.join(rest)}'.")
    else:
        response_id = rest[0]
        stored = {k: v for k, v in standin.responses[response_id].items() if k != "input"}
        if method == "GET" and rest[1:] == []:
            out.send_json(stored)
        elif method == "DELETE" and rest[1:] == []:
            del standin.responses[response_id]
            out.send_json({"id": response_id, "object": "response", "deleted": True})
        elif method == "POST" and rest[1:] == ["cancel"]:
            out.send_json({**stored, "status": "cancelled"})
        elif method == "GET" and rest[1:] == ["input_items"]:
            given = standin.responses[response_id]["input"]
            text = given if isinstance(given, str) else json.dumps(given)
            item = {
                "id": f"msg_in_{response_id}",
                "type": "message",
                "role": "user",
                "status": "completed",
                "content": [{"type": "input_text", "text": text}],
            }
            out.send_json(
                {
                    "object": "list",
                    "data": [item],
                    "first_id": item["id"],
                    "last_id": item["id"],
                    "has_more": False,
                }
            )
        else:
            out.send_error_json(404, f"the stand-in has no {method} {request.path}")


def files_route(standin: StandIn, request: Received, rest: list[str], out: Writer) -> None:
    method = request.method
    if method == "POST" and rest == []:
        parts = request.parts()
        upload = parts.get("file")
        if upload is None:
            out.send_error_json(400, "no file in the upload")
            return
        file_id = standin.new_id("file-standin")
        standin.file_contents[file_id] = upload.content
        standin.files[file_id] = {
            "id": file_id,
            "object": "file",
            "bytes": len(upload.content),
            "created_at": int(time.time()),
            "filename": upload.filename or "upload",
            "purpose": parts["purpose"].content.decode() if "purpose" in parts else "batch",
            "status": "processed",
        }
        out.send_json(standin.files[file_id])
    elif method == "GET" and rest == []:
        out.send_json({"object": "list", "data": list(standin.files.values()), "has_more": False})
    elif not rest or rest[0] not in standin.files:
        out.send_error_json(404, f"No such File object: {'/'.join(rest)}")
    elif method == "GET" and rest[1:] == []:
        out.send_json(standin.files[rest[0]])
    elif method == "DELETE" and rest[1:] == []:
        del standin.files[rest[0]]
        out.send_json({"id": rest[0], "object": "file", "deleted": True})
    elif method == "GET" and rest[1:] == ["content"]:
        out.send_bytes(standin.file_contents[rest[0]], "application/octet-stream")
    else:
        out.send_error_json(404, f"the stand-in has no {method} {request.path}")


def batches_route(standin: StandIn, request: Received, rest: list[str], out: Writer) -> None:
    method = request.method
    if method == "POST" and rest == []:
        body = request.json()
        if body.get("input_file_id") not in standin.files:
            out.send_error_json(400, f"No such File object: {body.get('input_file_id')}")
            return
        batch_id = standin.new_id("batch_standin")
        standin.batches[batch_id] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body.get("endpoint"),
            "input_file_id": body["input_file_id"],
            "completion_window": body.get("completion_window", "24h"),
            "status": "validating",
            "created_at": int(time.time()),
            "metadata": body.get("metadata"),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        out.send_json(standin.batches[batch_id])
    elif method == "GET" and rest == []:
        batches = list(standin.batches.values())
        out.send_json({"object": "list", "data": batches, "has_more": False})
    elif not rest or rest[0] not in standin.batches:
        out.send_error_json(404, f"No batch found with id '{'/'.join(rest)}'.")
    elif method == "GET" and rest[1:] == []:
        out.send_json(standin.batches[rest[0]])
    elif method == "POST" and rest[1:] == ["cancel"]:
        standin.batches[rest[0]]["status"] = "cancelling"
        out.send_json(standin.batches[rest[0]])
    else:
        out.send_error_json(404, f"the stand-in has no {method} {request.path}")


@contextmanager
def running_standin() -> Iterator[StandIn]:
    """The stand-in on a free port of 127.0.0.1 (``StandIn.url``), stopped on exit."""
    standin = StandIn()
    with serving(standin_handler(standin), "standin-provider") as url:
        standin.url = url
        yield standin
