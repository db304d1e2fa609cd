"""Token usage and cost of one answer, as LiteLLM reports them.

Non-streamed answers carry ``usage`` in their body and LiteLLM's cost in the
``x-litellm-response-cost`` header; a stream carries ``usage`` in its last chunk (when the
client asked for it with ``stream_options.include_usage``) and no cost header.

One reader takes every family's usage: OpenAI's ``prompt_tokens``/``completion_tokens``,
the Responses API's and Anthropic's ``input_tokens``/``output_tokens`` (Anthropic's cache
tokens are counted apart from its ``input_tokens``, so they are added to the prompt), and
what is billed in other units: a rerank's search units, a transcription's seconds, the
images of an image answer.
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

    prompt_tokens: int = 0  # every input token, cached ones included
    completion_tokens: int = 0
    cost_usd: float | None = None
    model: str | None = None  # the model the answer says answered
    cache_read_tokens: int = 0  # of the prompt, read from the provider's prompt cache
    cache_write_tokens: int = 0  # of the prompt, written to it
    units: float | None = None  # what was billed other than tokens, in ``unit``
    unit: str | None = None  # search_units, seconds, images

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _number(value: Any) -> float | None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if number and math.isfinite(value) and value >= 0 else None


def usage_of(usage: dict[str, Any], model: Any = None) -> Usage:
    """A usage object of any family (see the module doc) as a ``Usage``."""
    if "prompt_tokens" in usage or "completion_tokens" in usage:  # OpenAI's chat, embeddings
        prompt, completion = (
            _count(usage.get("prompt_tokens")),
            _count(usage.get("completion_tokens")),
        )
        details = usage.get("prompt_tokens_details")
    else:  # the Responses API's, Anthropic's, an image or transcription answer's
        prompt, completion = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
        details = usage.get("input_tokens_details")
    cache_read = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    cache_write = 0
    if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
        cache_read = _count(usage.get("cache_read_input_tokens"))
        cache_write = _count(usage.get("cache_creation_input_tokens"))
        if "prompt_tokens" not in usage:  # Anthropic's input_tokens leaves the cache out
            prompt += cache_read + cache_write
    seconds = _number(usage.get("seconds")) if usage.get("type") == "duration" else None
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        model=model if isinstance(model, str) else None,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        units=seconds,
        unit="seconds" if seconds is not None else None,
    )


def _billed_units(document: dict[str, Any]) -> Usage | None:
    """A rerank answer's usage: Cohere's ``meta.billed_units`` (search units, tokens)."""
    meta = document.get("meta")
    billed = meta.get("billed_units") if isinstance(meta, dict) else None
    if not isinstance(billed, dict):
        return None
    units = _number(billed.get("search_units"))
    return Usage(
        prompt_tokens=_count(billed.get("input_tokens")),
        completion_tokens=_count(billed.get("output_tokens")),
        model=document.get("model") if isinstance(document.get("model"), str) else None,
        units=units,
        unit="search_units" if units is not None else None,
    )


def _tokens(document: Any) -> Usage | None:
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if isinstance(usage, dict):
        return usage_of(usage, document.get("model"))
    return _billed_units(document)


def usage_of_answer(body: bytes, cost_header: bytes | None) -> Usage | None:
    """The usage of a whole JSON answer, with the cost of LiteLLM's ``COST_HEADER`` when it
    sent one."""
    if b'"usage"' not in body and b'"billed_units"' not in body:
        return None
    try:
        usage = _tokens(orjson.loads(body))
    except ValueError:
        return None
    if usage is None:
        return None
    return attrs.evolve(usage, cost_usd=cost_of(cost_header))


def usage_of_images(body: bytes, cost_header: bytes | None) -> Usage | None:
    """An image answer's usage: its tokens when the model reports them, and its images."""
    try:
        document = orjson.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    usage = _tokens(document) or Usage()
    images = document.get("data")
    count = float(len(images)) if isinstance(images, list) else None
    return attrs.evolve(usage, cost_usd=cost_of(cost_header), units=count, unit="images")


def usage_of_cost(body: bytes, cost_header: bytes | None) -> Usage | None:
    """For answers that are not JSON (speech): only the cost LiteLLM says, when it does."""
    cost = cost_of(cost_header)
    return None if cost is None else Usage(cost_usd=cost)


def usage_of_chunk(document: Any) -> Usage | None:
    """The usage of one parsed stream chunk, with the cost LiteLLM puts in it (``usage.cost``)
    when there is one."""
    usage = _tokens(document)
    if usage is None:
        return None
    cost = (
        _number(document["usage"].get("cost")) if isinstance(document.get("usage"), dict) else None
    )
    return usage if cost is None else attrs.evolve(usage, cost_usd=cost)


def cost_of(cost_header: bytes | None) -> float | None:
    """The cost in USD that a ``COST_HEADER`` value says; None when it says none."""
    if not cost_header:
        return None
    try:
        cost = float(cost_header)
    except ValueError:
        return None
    return cost if math.isfinite(cost) and cost >= 0 else None
