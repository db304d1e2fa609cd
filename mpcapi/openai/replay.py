"""Chunk replay: a whole OpenAI answer as the stream of chunks it would have come as, and back.

``replay_of`` turns a stored (non-streamed) chat or text completion into the chunks of a
``"stream": true`` answer, with the usage chunk when the request asked for it;
``answer_of_chunks`` assembles a complete stream back into the answer it stands for (what
the WebSocket keeps in the response cache). Pure wire format: no Twisted.
"""

from __future__ import annotations

import json
from typing import Any


def replay_of(cached: bytes, document: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The stream chunks of a cached answer for the request ``document`` (with the usage
    chunk when it asks for it); None for an answer that cannot be streamed."""
    try:
        answer = json.loads(cached)
        options = document.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        return replay_events(answer, usage)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def replay_events(answer: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """The chunks a stream of ``answer`` (a chat completion or a text completion) has."""
    kind = answer["object"]
    if kind == "chat.completion":
        return _chat_chunks(answer, include_usage)
    if kind == "text_completion":
        return _text_chunks(answer, include_usage)
    raise ValueError(f"cannot stream a {kind!r}")


def _chunk(answer: dict[str, Any], kind: str, choices: list[Any], usage: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": answer.get("id", ""),
        "object": kind,
        "created": answer.get("created", 0),
        "model": answer.get("model", ""),
        "choices": choices,
    }
    if answer.get("system_fingerprint") is not None:
        chunk["system_fingerprint"] = answer["system_fingerprint"]
    if usage:
        chunk["usage"] = None
    return chunk


def _usage_chunk(answer: dict[str, Any], kind: str) -> dict[str, Any]:
    chunk = _chunk(answer, kind, [], False)
    chunk["usage"] = answer.get("usage")
    return chunk


def _chat_chunks(answer: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    kind = "chat.completion.chunk"
    events: list[dict[str, Any]] = []
    for choice in answer["choices"]:
        index = choice.get("index", 0)
        message = choice.get("message") or {}

        def delta(values: dict[str, Any], finish: Any = None, index: int = index) -> None:
            entry = {"index": index, "delta": values, "logprobs": None, "finish_reason": finish}
            events.append(_chunk(answer, kind, [entry], include_usage))

        delta({"role": message.get("role", "assistant"), "content": ""})
        if message.get("content"):
            delta({"content": message["content"]})
        if message.get("refusal"):
            delta({"refusal": message["refusal"]})
        for position, call in enumerate(message.get("tool_calls") or []):
            delta({"tool_calls": [{"index": position, **call}]})
        delta({}, choice.get("finish_reason") or "stop")
    if include_usage and answer.get("usage") is not None:
        events.append(_usage_chunk(answer, kind))
    return events


def _text_chunks(answer: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    kind = "text_completion"
    events: list[dict[str, Any]] = []
    for choice in answer["choices"]:
        index = choice.get("index", 0)
        for text, finish in ((choice.get("text") or "", None), ("", choice.get("finish_reason"))):
            entry = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
            events.append(_chunk(answer, kind, [entry], include_usage))
    if include_usage and answer.get("usage") is not None:
        events.append(_usage_chunk(answer, kind))
    return events


# What a streamed answer is, once whole: the inverse of replay_events, for the WebSocket,
# whose requests are all streamed. Only what a replay gives back is kept (text, refusals,
# tool calls, usage); a stream with anything else (logprobs, audio…) is not stored.
_CHAT_DELTA = ("role", "content", "refusal", "tool_calls")
_CHOICE = ("index", "delta", "text", "finish_reason", "logprobs")


def answer_of_chunks(chunks: list[Any]) -> dict[str, Any] | None:
    """The answer (``chat.completion`` or ``text_completion``) that a complete stream of
    ``chunks`` says, for the cache; None when it says more than a replay would give back."""
    try:
        return _assemble(chunks)
    except (TypeError, KeyError, AttributeError, ValueError):
        return None


def _assemble(chunks: list[Any]) -> dict[str, Any] | None:
    if not chunks:
        return None
    first = chunks[0]
    kind = first["object"]
    if kind not in ("chat.completion.chunk", "text_completion"):
        return None
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        if chunk["object"] != kind:
            return None
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            if any(choice.get(name) is not None for name in choice if name not in _CHOICE):
                return None
            if choice.get("logprobs") is not None:
                return None
            index = int(choice.get("index", 0))
            whole = choices.setdefault(index, {"index": index, "finish_reason": None})
            if choice.get("finish_reason") is not None:
                whole["finish_reason"] = choice["finish_reason"]
            if kind == "text_completion":
                whole["text"] = whole.get("text", "") + (choice.get("text") or "")
            elif not _add_delta(whole, choice.get("delta") or {}):
                return None
    answer: dict[str, Any] = {
        "id": first.get("id", ""),
        "object": "chat.completion" if kind == "chat.completion.chunk" else kind,
        "created": first.get("created", 0),
        "model": first.get("model", ""),
        "choices": [_finished(choices[index], kind) for index in sorted(choices)],
    }
    if first.get("system_fingerprint") is not None:
        answer["system_fingerprint"] = first["system_fingerprint"]
    if usage is not None:
        answer["usage"] = usage
    return answer


def _add_delta(whole: dict[str, Any], delta: dict[str, Any]) -> bool:
    """Fold one chat delta into its choice's message; False for a field we cannot replay."""
    if any(value is not None for name, value in delta.items() if name not in _CHAT_DELTA):
        return False
    message = whole.setdefault("message", {"role": "assistant", "content": None})
    if delta.get("role"):
        message["role"] = delta["role"]
    for name in ("content", "refusal"):
        if delta.get(name):
            message[name] = (message.get(name) or "") + delta[name]
    for call in delta.get("tool_calls") or []:
        calls = message.setdefault("tool_calls", [])
        position = int(call["index"])
        if position == len(calls):
            calls.append(
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
        elif position > len(calls):
            return False
        merged, function = calls[position], call.get("function") or {}
        merged["id"] = call.get("id") or merged["id"]
        merged["type"] = call.get("type") or merged["type"]
        for name in ("name", "arguments"):
            merged["function"][name] += function.get(name) or ""
    return True


def _finished(whole: dict[str, Any], kind: str) -> dict[str, Any]:
    if kind == "text_completion":
        text = whole.get("text", "")
        return {
            "text": text,
            "index": whole["index"],
            "logprobs": None,
            "finish_reason": whole["finish_reason"],
        }
    message = whole.get("message") or {"role": "assistant", "content": None}
    return {
        "index": whole["index"],
        "message": message,
        "logprobs": None,
        "finish_reason": whole["finish_reason"],
    }
