"""What stream chunks and stream requests say: text, usage, and the request for usage.

Pure wire format (no Twisted), shared by the HTTP relay and the WebSocket.
"""

from __future__ import annotations

from typing import Any


def asks_for_usage(document: dict[str, Any]) -> bool:
    """Whether a streamed request asks for the usage chunk itself."""
    options = document.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def with_usage_requested(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with ``stream_options.include_usage`` set (its other options kept)."""
    options = document.get("stream_options")
    options = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return {**document, "stream_options": options}


def has_text(choice: Any) -> bool:
    """Whether a stream chunk's choice carries text (a delta's content, or a completion's)."""
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict) and delta.get("content"):
        return True
    return bool(choice.get("text"))


def is_usage_only(chunk: dict[str, Any]) -> bool:
    """Whether a stream chunk carries usage and nothing else: no choices, or (as LiteLLM
    sends it) choices with an empty delta, no text and no finish reason."""
    if not isinstance(chunk.get("usage"), dict):
        return False
    choices = chunk.get("choices")
    if choices is None:
        return True
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            return False
        for name, value in choice.items():
            if name != "index" and value not in (None, "", {}, []):
                return False
    return True
