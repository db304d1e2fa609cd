"""The route table: every OpenAI operation MPC-API forwards, declared once as data.

Each ``Route`` says what the one forwarding pipeline (``mpcapi.http.forwarding``) needs to
serve it: LiteLLM's path (ours too, below ``/api`` and ``/v1``), the method, the schema of
its body, whether ``"stream": true`` turns the answer into an event stream, whether answers
may be cached, and how the usage of an answer is read. Adding a route is one entry here
(plus its usage reader when its answers count usage differently, and its OpenTelemetry
operation name when it calls a model).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from mpcapi.openai.usage import Usage, usage_of_answer

# Reads the usage of a whole answer: its body, and LiteLLM's cost header when it sent one.
UsageReader = Callable[[bytes, bytes | None], Usage | None]


@attrs.frozen
class Route:
    """One OpenAI operation."""

    path: str  # LiteLLM's path, and ours below /api and /v1
    name: str  # the endpoint's name (the router's, the OpenAPI operation's)
    summary: str  # what it does, in a few words (OpenAPI)
    method: str = "POST"
    schema: str | None = None  # the body's JSON Schema (mpcapi/openai/schemas); None: no body
    streams: bool = False  # a body with "stream": true is answered with an event stream
    cacheable: bool = False  # 200 answers go to the response cache
    usage: UsageReader | None = None  # None: its answers carry no usage
    # OpenTelemetry's gen_ai.operation.name (traces); None: not a model call
    operation: str | None = None


ROUTES = (
    Route("/models", "models", "List models", method="GET"),
    Route(
        "/chat/completions",
        "chat_completions",
        "Chat completion",
        schema="chat_completions",
        streams=True,
        cacheable=True,
        usage=usage_of_answer,
        operation="chat",
    ),
    Route(
        "/completions",
        "completions",
        "Text completion",
        schema="completions",
        streams=True,
        cacheable=True,
        usage=usage_of_answer,
        operation="text_completion",
    ),
    Route(
        "/embeddings",
        "embeddings",
        "Embeddings",
        schema="embeddings",
        cacheable=True,
        usage=usage_of_answer,
        operation="embeddings",
    ),
)
BY_PATH = {route.path: route for route in ROUTES}
BY_NAME = {route.name: route for route in ROUTES}
CACHEABLE_PATHS = tuple(route.path for route in ROUTES if route.cacheable)
SCHEMA_NAMES = tuple(route.schema for route in ROUTES if route.schema is not None)

__all__ = [
    "BY_NAME",
    "BY_PATH",
    "CACHEABLE_PATHS",
    "ROUTES",
    "SCHEMA_NAMES",
    "Route",
    "UsageReader",
]
