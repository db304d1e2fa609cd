"""The event streams of the three API families: how each marks its end, carries text and
usage, and says that it failed.

- **Chat** (chat and text completions): unnamed events of chunks, ``data: [DONE]`` last;
  usage in a final chunk when ``stream_options.include_usage`` asked for it.
- **Responses**: named events (``response.output_text.delta`` …); ``response.completed``
  (or ``response.incomplete``, ``response.failed``) ends it and carries the usage.
- **Anthropic Messages**: named events; ``message_start`` carries the input tokens,
  ``message_delta`` the output tokens so far, ``message_stop`` ends it.

A ``StreamReader`` is made per stream (``EventFormat.reader()``) and reads its events one
by one. Pure wire format, no Twisted: the HTTP relay and the WebSocket share it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
import orjson

from mpcapi.openai.chunks import has_text, is_usage_only
from mpcapi.openai.sse import DONE, SSEEvent
from mpcapi.openai.usage import Usage, usage_of, usage_of_chunk


def _parsed(data: str) -> dict[str, Any] | None:
    try:
        document = orjson.loads(data)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


@attrs.define
class StreamReader:
    """What one stream has said so far: its usage, whether its end marker came."""

    usage: Usage | None = None
    done: bool = False
    # The ids the stream gives what it creates (a stored response): LiteLLM may give it a
    # new one in each event that carries it.
    object_ids: list[str] = attrs.Factory(list)

    def read(self, event: SSEEvent) -> tuple[bool, bool]:
        """Take one event: (it carries text, it is a usage-only chunk)."""
        if event.data == DONE:
            self.done = True
            return False, False
        document = _parsed(event.data)
        return (False, False) if document is None else self.take(event.event, document)

    def take(self, name: str, document: dict[str, Any]) -> tuple[bool, bool]:
        """Take one parsed event (``name`` is its SSE type): as ``read``."""
        raise NotImplementedError


class ChatReader(StreamReader):
    def take(self, name: str, document: dict[str, Any]) -> tuple[bool, bool]:
        choices = document.get("choices")
        text = isinstance(choices, list) and any(has_text(choice) for choice in choices)
        usage = usage_of_chunk(document)
        if usage is None:
            return text, False
        self.usage = usage
        return text, is_usage_only(document)


_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponsesReader(StreamReader):
    def take(self, name: str, document: dict[str, Any]) -> tuple[bool, bool]:
        kind = document.get("type", name)  # the data names its event too
        if kind == "response.output_text.delta":
            return True, False
        response = document.get("response")
        if not isinstance(response, dict):
            return False, False
        response_id = response.get("id")
        if isinstance(response_id, str) and response_id not in self.object_ids:
            self.object_ids.append(response_id)
        if kind in _RESPONSE_ENDS:
            self.done = True
            if isinstance(response.get("usage"), dict):
                self.usage = usage_of(response["usage"], response.get("model"))
        return False, False


class AnthropicReader(StreamReader):
    def take(self, name: str, document: dict[str, Any]) -> tuple[bool, bool]:
        kind = document.get("type", name)
        if kind == "content_block_delta":
            delta = document.get("delta")
            return isinstance(delta, dict) and delta.get("type") == "text_delta", False
        if kind == "message_stop":
            self.done = True
        elif kind == "message_start":
            message = document.get("message")
            if isinstance(message, dict) and isinstance(message.get("usage"), dict):
                self.usage = usage_of(message["usage"], message.get("model"))
        elif kind == "message_delta":
            usage = document.get("usage")
            if isinstance(usage, dict):  # output_tokens so far; the input came at the start
                start = self.usage or Usage()
                output = usage_of(usage).completion_tokens
                self.usage = attrs.evolve(start, completion_tokens=output)
        return False, False


def _chat_error(message: str, kind: str) -> bytes:
    document = {"error": {"message": message, "type": kind}}
    return b"data: " + json.dumps(document).encode("utf-8") + b"\n\n"


def _responses_error(message: str, kind: str) -> bytes:
    # The Responses API's error event; its "error" member makes the OpenAI SDKs raise.
    document = {
        "type": "error",
        "code": kind,
        "message": message,
        "param": None,
        "error": {"message": message, "type": kind},
    }
    return b"event: error\ndata: " + json.dumps(document).encode("utf-8") + b"\n\n"


def _anthropic_error(message: str, kind: str) -> bytes:
    document = {"type": "error", "error": {"type": "api_error", "message": message}}
    return b"event: error\ndata: " + json.dumps(document).encode("utf-8") + b"\n\n"


@attrs.frozen
class EventFormat:
    """One family's stream: its reader, and the event that ends a stream that failed."""

    name: str
    reader: Callable[[], StreamReader]
    error_event: Callable[[str, str], bytes]  # (message, kind) -> one SSE event
    # Chat only: usage comes when stream_options asks for it (the ledger always wants it).
    usage_on_request: bool = False


CHAT_EVENTS = EventFormat("chat", ChatReader, _chat_error, usage_on_request=True)
RESPONSES_EVENTS = EventFormat("responses", ResponsesReader, _responses_error)
ANTHROPIC_EVENTS = EventFormat("anthropic", AnthropicReader, _anthropic_error)

__all__ = [
    "ANTHROPIC_EVENTS",
    "CHAT_EVENTS",
    "RESPONSES_EVENTS",
    "EventFormat",
    "StreamReader",
]
