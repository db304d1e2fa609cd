"""The route table: every model API operation MPC-API forwards, declared once as data.

Each ``Route`` says what the one forwarding pipeline (``mpcapi.http.forwarding``) needs to
serve it: our path below each of its prefixes (``/api`` and ``/v1`` for the OpenAI API;
``/v1``, ``/api/v1`` and ``/anthropic/v1`` for Anthropic's), LiteLLM's path, the method,
what its body is (JSON checked against a schema, a multipart upload with required fields,
nothing), the family of its event stream when ``"stream": true`` asks for one, whether its
answer is binary (relayed as it arrives), whether answers may be cached, how usage is read,
the stored objects it creates, reads or lists (ownership), and the shape of our own errors
on it. Adding a route is one entry here (plus its usage reader when its answers count usage
differently, and its OpenTelemetry operation name when it calls a model).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Literal
from urllib.parse import quote

import attrs

from mpcapi.openai.events import ANTHROPIC_EVENTS, CHAT_EVENTS, RESPONSES_EVENTS, EventFormat
from mpcapi.openai.usage import Usage, usage_of_answer, usage_of_cost, usage_of_images

# Reads the usage of a whole answer: its body, and LiteLLM's cost header when it sent one.
UsageReader = Callable[[bytes, bytes | None], Usage | None]

BodyKind = Literal["json", "multipart", "none"]
OPENAI_PREFIXES = ("/api", "/v1")
ANTHROPIC_PREFIXES = ("/v1", "/api/v1", "/anthropic/v1")
_ARGUMENT = re.compile(r"<(?:\w+:)?(\w+)>")
_SEGMENT = "!$&'()*+,;=:@"  # what a path segment may hold unquoted (RFC 3986), "/" not


@attrs.frozen
class Stored:
    """What a route does with the objects LiteLLM stores for a client (responses, files,
    batches), which only their owner may see: it ``create``s one (the answer's ``id``),
    ``read``s one (named by the URL argument ``param``; reading covers deleting and
    cancelling), or ``list``s them (the answer's ``data`` is cut to the caller's)."""

    kind: str  # response, file, batch
    access: Literal["create", "read", "list"]
    param: str | None = None
    # Body fields that name other stored objects the caller must own: (field, kind).
    refers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class Route:
    """One model API operation."""

    path: str  # ours below each prefix; werkzeug syntax for URL arguments (<file_id>)
    name: str  # the endpoint's name (the router's, the OpenAPI operation's)
    summary: str  # what it does, in a few words (OpenAPI)
    method: str = "POST"
    schema: str | None = None  # a JSON body's JSON Schema (mpcapi/openai/schemas)
    # json: a JSON object (checked against schema); multipart: an upload; none: no body
    body: BodyKind = "none"
    # The fields a multipart body must have: text (not empty), and files (or their "x[]" form)
    form: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    events: EventFormat | None = None  # a body with "stream": true gets these events
    binary: bool = False  # the answer is relayed as it arrives (audio, file contents)
    cacheable: bool = False  # 200 answers go to the response cache
    usage: UsageReader | None = None  # None: its answers carry no usage
    # OpenTelemetry's gen_ai.operation.name (traces); None: not a model call
    operation: str | None = None
    prefixes: tuple[str, ...] = OPENAI_PREFIXES
    upstream: str | None = None  # LiteLLM's path when it is not ours
    anthropic: bool = False  # our own errors in Anthropic's shape; x-api-key accepted
    headers: tuple[bytes, ...] = ()  # request headers passed on to LiteLLM
    stored: Stored | None = None
    model_argument: str | None = None  # the URL argument that names a model (model access)
    lists_models: bool = False  # its answer lists models: cut to those the key may call
    # The operation as logs, metrics and the ledger name it: the path, ids as {name}.
    label: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "label", _ARGUMENT.sub(r"{\1}", self.path))

    @property
    def streams(self) -> bool:
        return self.events is not None

    @property
    def fixed(self) -> bool:
        """Whether LiteLLM's path is always the same (no URL arguments)."""
        return "<" not in self.path

    def upstream_path(self, arguments: Mapping[str, str] | None = None) -> str:
        """LiteLLM's path for a request with these URL ``arguments``."""
        template = self.upstream or self.path
        if not arguments:
            return template
        return _ARGUMENT.sub(lambda match: quote(arguments[match.group(1)], _SEGMENT), template)


def _json(path: str, name: str, summary: str, schema: str | None = None, **more: object) -> Route:
    return Route(path, name, summary, schema=schema or name, body="json", **more)  # type: ignore[arg-type]


_ANTHROPIC = {"prefixes": ANTHROPIC_PREFIXES, "anthropic": True}
_ANTHROPIC_HEADERS = (b"anthropic-version", b"anthropic-beta")

ROUTES = (
    Route("/models", "models", "List models", method="GET", lists_models=True),
    Route(
        "/models/<path:model_id>",
        "model",
        "Describe a model",
        method="GET",
        model_argument="model_id",
    ),
    _json(
        "/chat/completions",
        "chat_completions",
        "Chat completion",
        events=CHAT_EVENTS,
        cacheable=True,
        usage=usage_of_answer,
        operation="chat",
    ),
    _json(
        "/completions",
        "completions",
        "Text completion",
        events=CHAT_EVENTS,
        cacheable=True,
        usage=usage_of_answer,
        operation="text_completion",
    ),
    _json(
        "/embeddings",
        "embeddings",
        "Embeddings",
        cacheable=True,
        usage=usage_of_answer,
        operation="embeddings",
    ),
    # The Responses API (Codex CLI, the OpenAI Agents SDK)
    _json(
        "/responses",
        "responses",
        "Create a model response",
        events=RESPONSES_EVENTS,
        usage=usage_of_answer,
        operation="chat",
        stored=Stored("response", "create", refers=(("previous_response_id", "response"),)),
    ),
    _json(
        "/responses/input_tokens",
        "responses_input_tokens",
        "Count a response's input tokens",
    ),
    Route(
        "/responses/<response_id:response_id>",
        "get_response",
        "Retrieve a response",
        method="GET",
        stored=Stored("response", "read", "response_id"),
    ),
    Route(
        "/responses/<response_id:response_id>",
        "delete_response",
        "Delete a response",
        method="DELETE",
        stored=Stored("response", "read", "response_id"),
    ),
    Route(
        "/responses/<response_id:response_id>/cancel",
        "cancel_response",
        "Cancel a background response",
        stored=Stored("response", "read", "response_id"),
    ),
    Route(
        "/responses/<response_id:response_id>/input_items",
        "response_input_items",
        "List a response's input items",
        method="GET",
        stored=Stored("response", "read", "response_id"),
    ),
    # Anthropic's Messages API (Claude Code, the Anthropic SDKs)
    _json(
        "/messages",
        "messages",
        "Create a message (Anthropic)",
        "anthropic_messages",
        events=ANTHROPIC_EVENTS,
        usage=usage_of_answer,
        operation="chat",
        upstream="/v1/messages",
        headers=_ANTHROPIC_HEADERS,
        **_ANTHROPIC,
    ),
    _json(
        "/messages/count_tokens",
        "messages_count_tokens",
        "Count a message's tokens (Anthropic)",
        "anthropic_count_tokens",
        upstream="/v1/messages/count_tokens",
        headers=_ANTHROPIC_HEADERS,
        **_ANTHROPIC,
    ),
    _json("/rerank", "rerank", "Rerank documents", usage=usage_of_answer),
    _json(
        "/rerank",
        "rerank_v2",
        "Rerank documents (v2)",
        "rerank",
        usage=usage_of_answer,
        prefixes=("/v2", "/api/v2"),
        upstream="/v2/rerank",
    ),
    _json("/moderations", "moderations", "Classify text for moderation"),
    _json(
        "/audio/speech",
        "audio_speech",
        "Text to speech",
        binary=True,
        usage=usage_of_cost,
    ),
    Route(
        "/audio/transcriptions",
        "audio_transcriptions",
        "Speech to text",
        body="multipart",
        form=("model",),
        files=("file",),
        usage=usage_of_answer,
    ),
    Route(
        "/audio/translations",
        "audio_translations",
        "Speech to English text",
        body="multipart",
        form=("model",),
        files=("file",),
        usage=usage_of_answer,
    ),
    _json(
        "/images/generations",
        "images_generations",
        "Generate images",
        usage=usage_of_images,
    ),
    Route(
        "/images/edits",
        "images_edits",
        "Edit an image",
        body="multipart",
        form=("prompt",),
        files=("image",),
        usage=usage_of_images,
    ),
    Route(
        "/images/variations",
        "images_variations",
        "Vary an image",
        body="multipart",
        files=("image",),
        usage=usage_of_images,
    ),
    Route(
        "/files",
        "upload_file",
        "Upload a file",
        body="multipart",
        form=("purpose",),
        files=("file",),
        stored=Stored("file", "create"),
    ),
    Route("/files", "list_files", "List files", method="GET", stored=Stored("file", "list")),
    Route(
        "/files/<file_id>",
        "get_file",
        "Retrieve a file's metadata",
        method="GET",
        stored=Stored("file", "read", "file_id"),
    ),
    Route(
        "/files/<file_id>",
        "delete_file",
        "Delete a file",
        method="DELETE",
        stored=Stored("file", "read", "file_id"),
    ),
    Route(
        "/files/<file_id>/content",
        "file_content",
        "Download a file's contents",
        method="GET",
        binary=True,
        stored=Stored("file", "read", "file_id"),
    ),
    _json(
        "/batches",
        "create_batch",
        "Create a batch",
        "batches",
        stored=Stored("batch", "create", refers=(("input_file_id", "file"),)),
    ),
    Route("/batches", "list_batches", "List batches", method="GET", stored=Stored("batch", "list")),
    Route(
        "/batches/<batch_id>",
        "get_batch",
        "Retrieve a batch",
        method="GET",
        stored=Stored("batch", "read", "batch_id"),
    ),
    Route(
        "/batches/<batch_id>/cancel",
        "cancel_batch",
        "Cancel a batch",
        stored=Stored("batch", "read", "batch_id"),
    ),
)
BY_NAME = {route.name: route for route in ROUTES}
# By label (the Exchange's route); routes that share a path share what is looked up here.
BY_PATH: dict[str, Route] = {}
for _route in ROUTES:
    BY_PATH.setdefault(_route.label, _route)
CACHEABLE_PATHS = tuple(route.path for route in ROUTES if route.cacheable)
SCHEMA_NAMES = tuple(sorted({route.schema for route in ROUTES if route.schema is not None}))


def anthropic_path(path: str) -> bool:
    """Whether ``path`` is one of the Anthropic routes (or anything below /anthropic/), whose
    errors take Anthropic's shape, even those that come before routing (404, 405, 413)."""
    return path.startswith(_ANTHROPIC_PATHS)


_ANTHROPIC_PATHS = (
    "/anthropic/",
    *(prefix + route.path for route in ROUTES if route.anthropic for prefix in route.prefixes),
)

__all__ = [
    "ANTHROPIC_PREFIXES",
    "BY_NAME",
    "BY_PATH",
    "CACHEABLE_PATHS",
    "OPENAI_PREFIXES",
    "ROUTES",
    "SCHEMA_NAMES",
    "Route",
    "Stored",
    "UsageReader",
    "anthropic_path",
]
