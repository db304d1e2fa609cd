"""Token usage and cost of one answer, as LiteLLM reports them.

Non-streamed answers carry ``usage`` in their body and LiteLLM's cost in the
``x-litellm-response-cost`` header; a stream carries ``usage`` in its last chunk (when the
client asked for it with ``stream_options.include_usage``) and no cost header.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import orjson

COST_HEADER = b"x-litellm-response-cost"


@attrs.frozen
class Usage:
    """Tokens of one request, and its cost in USD when LiteLLM said it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    model: str | None = None  # the model the answer says answered

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _tokens(document: Any) -> Usage | None:
    usage = document.get("usage") if isinstance(document, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    model = document.get("model")
    return Usage(
        prompt_tokens=prompt if isinstance(prompt, int) else 0,
        completion_tokens=completion if isinstance(completion, int) else 0,
        model=model if isinstance(model, str) else None,
    )


def usage_of_answer(body: bytes, cost_header: bytes | None) -> Usage | None:
    """The usage of a whole JSON answer, with the cost of LiteLLM's ``COST_HEADER`` when it
    sent one."""
    if b'"usage"' not in body:
        return None
    try:
        usage = _tokens(orjson.loads(body))
    except ValueError:
        return None
    if usage is None:
        return None
    return attrs.evolve(usage, cost_usd=cost_of(cost_header))


def usage_of_chunk(document: Any) -> Usage | None:
    """The usage of one parsed stream chunk, with the cost LiteLLM puts in it (``usage.cost``)
    when there is one."""
    usage = _tokens(document)
    if usage is None:
        return None
    cost = document["usage"].get("cost")
    number = isinstance(cost, int | float) and not isinstance(cost, bool)
    if number and math.isfinite(cost) and cost >= 0:
        return attrs.evolve(usage, cost_usd=float(cost))
    return usage


def usage_of_event(data: str) -> Usage | None:
    """The usage carried by one stream event's data, if any (the final chunk's)."""
    if '"usage"' not in data:
        return None
    try:
        return _tokens(orjson.loads(data))
    except ValueError:
        return None


def cost_of(cost_header: bytes | None) -> float | None:
    """The cost in USD that a ``COST_HEADER`` value says; None when it says none."""
    if not cost_header:
        return None
    try:
        cost = float(cost_header)
    except ValueError:
        return None
    return cost if math.isfinite(cost) and cost >= 0 else None
