"""Every bad input the contract names gets a 400 whose message names the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from hypothesis import assume, given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from mpcapi.openai.validation import (
    SCHEMA_NAMES,
    RequestValidator,
    field_path,
    load_schema,
    parse_json_object,
)
from tests.support.documents import bodies, near_valid_documents
from tests.support.gateway import CHAT, Harness, json_body

USER = [{"role": "user", "content": "Hi"}]


def chat(**fields: Any) -> bytes:
    return json.dumps({**CHAT, **fields}).encode()


def without(field: str) -> bytes:
    return json.dumps({k: v for k, v in CHAT.items() if k != field}).encode()


BAD_CHAT_BODIES = [
    # (body, text the message must contain)
    (b"{not json", "not valid JSON"),
    (b"", "empty"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b'{"model": "a", "messages": [], "temperature": NaN}', "NaN"),
    (b"[1, 2]", "must be a JSON object, not an array"),
    (b'"text"', "must be a JSON object, not a string"),
    (b"42", "must be a JSON object, not a number"),
    (b"null", "must be a JSON object, not null"),
    (without("model"), "'model' is a required property"),
    (chat(model=""), "model: '' should be non-empty"),
    (chat(model=5), "model: 5 is not of type 'string'"),
    (chat(model=None), "model: None is not of type 'string'"),
    (without("messages"), "'messages' is a required property"),
    (chat(messages=[]), "messages: [] should be non-empty"),
    (chat(messages="Hi"), "messages: 'Hi' is not of type 'array'"),
    (chat(messages=[{"content": "Hi"}]), "messages[0]: 'role' is a required property"),
    (chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role: 'robot' is not one of"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content: 5 is not of type"),
    (chat(messages=[{"role": "user", "content": {"a": 1}}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": [{"text": "x"}]}]), "messages[0].content[0]"),
    (chat(messages=["Hi"]), "messages[0]: 'Hi' is not of type 'object'"),
    (chat(temperature=2.5), "temperature: 2.5 is greater than the maximum of 2"),
    (chat(temperature=-0.1), "temperature: -0.1 is less than the minimum of 0"),
    (chat(temperature="hot"), "temperature: 'hot' is not of type 'number'"),
    (chat(temperature=True), "temperature: True is not of type 'number'"),
    (chat(top_p=1.5), "top_p: 1.5 is greater than the maximum of 1"),
    (chat(top_p=-1), "top_p: -1 is less than the minimum of 0"),
    (chat(max_tokens=0), "max_tokens: 0 is less than the minimum of 1"),
    (chat(max_tokens=1.5), "max_tokens: 1.5 is not of type 'integer'"),
    (chat(n=0), "n: 0 is less than the minimum of 1"),
    (chat(stream="yes"), "stream: 'yes' is not of type 'boolean'"),
    (chat(stream=1), "stream: 1 is not of type 'boolean'"),
]


@pytest.mark.parametrize(("body", "expected"), BAD_CHAT_BODIES)
@pytest_twisted.ensureDeferred
async def test_bad_chat_body_is_400(harness: Harness, body: bytes, expected: str) -> None:
    response = await harness.post("/api/chat/completions", body)
    assert response.code == 400
    document = await json_body(response)
    assert document["error"]["code"] == "bad_request"
    assert expected in document["message"]
    assert document["request_id"]
    assert harness.fake.seen == [], "nothing invalid reaches LiteLLM"


@pytest.mark.parametrize(
    ("route", "body", "expected"),
    [
        ("/api/completions", {"model": "m"}, "'prompt' is a required property"),
        ("/api/completions", {"model": "m", "prompt": 5}, "prompt: 5 is not valid"),
        ("/api/completions", {"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
        ("/api/completions", {"prompt": "x"}, "'model' is a required property"),
        ("/api/embeddings", {"model": "m"}, "'input' is a required property"),
        ("/api/embeddings", {"model": "m", "input": ""}, "input: '' should be non-empty"),
        ("/api/embeddings", {"model": "m", "input": []}, "input: []"),
        ("/api/embeddings", {"model": "", "input": "x"}, "model: '' should be non-empty"),
        ("/v1/embeddings", {"input": "x"}, "'model' is a required property"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_completion_and_embedding_bodies_are_400(
    harness: Harness, route: str, body: dict[str, Any], expected: str
) -> None:
    response = await harness.post(route, body)
    assert response.code == 400
    assert expected in (await json_body(response))["message"]


@pytest_twisted.ensureDeferred
async def test_validation_lists_every_problem_in_details(harness: Harness) -> None:
    response = await harness.post("/api/chat/completions", chat(temperature=9, top_p=9, n=0))
    details = (await json_body(response))["details"]
    assert {item["field"] for item in details} == {"temperature", "top_p", "n"}


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "prompt": ["a", "b"]},
        {"model": "m", "prompt": [1, 2, 3]},
        {"model": "m", "prompt": [[1, 2], [3]]},
    ],
)
def test_valid_prompt_shapes(body: dict[str, Any]) -> None:
    assert RequestValidator().validate("completions", json.dumps(body).encode()) == body


def test_huge_values_are_messages_not_crashes() -> None:
    validator = RequestValidator()
    body = json.dumps({**CHAT, "messages": "x" * 100_000}).encode()
    with pytest.raises(Exception) as raised:
        validator.validate("chat_completions", body)
    assert len(str(raised.value)) < 1000


def test_deep_nesting_is_a_400() -> None:
    body = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(Exception, match="nested too deeply|not valid JSON"):
        RequestValidator().validate("chat_completions", body)


def test_field_path() -> None:
    assert field_path(["messages", 0, "content", 1, "type"]) == "messages[0].content[1].type"
    assert field_path([]) == ""


# The fast checks (orjson, jsonschema-rs) must agree with the explaining ones (json, jsonschema).

_SLOW = {name: Draft202012Validator(load_schema(name)) for name in SCHEMA_NAMES}
_VALIDATOR = RequestValidator()


@given(near_valid_documents(), st.sampled_from(SCHEMA_NAMES))
def test_the_fast_schema_check_agrees_with_jsonschema(document: dict[str, Any], name: str) -> None:
    try:  # NaN and Infinity are refused by the parser, before any schema (a test above)
        body = json.dumps(document, allow_nan=False).encode()
    except ValueError:
        assume(False)
    try:
        _VALIDATOR.validate(name, body)
        accepted = True
    except Exception:
        accepted = False
    assert accepted == _SLOW[name].is_valid(json.loads(body))


@given(bodies)
def test_the_fast_json_parser_agrees_with_json(body: bytes) -> None:
    try:
        expected: Any = json.loads(body.decode("utf-8"), parse_constant=float)
        if any(token in body for token in (b"NaN", b"Infinity")):
            return  # json takes these; the contract refuses them (a test above)
    except (ValueError, RecursionError):
        expected = ValueError
    try:
        parsed: Any = parse_json_object(body)
    except Exception:
        parsed = ValueError
    if expected is not ValueError and not isinstance(expected, dict):
        expected = ValueError  # valid JSON, but not an object: refused as well
    assert parsed == expected


def test_integers_past_64_bits_are_read_exactly() -> None:
    """orjson would read them as rounded floats: two requests that differ only there would
    then share a cache key."""
    for number in (-9223372036854775809, 2**64, 10**30):
        body = b'{"model": "m", "seed": %d}' % number
        assert parse_json_object(body) == {"model": "m", "seed": number}
    assert parse_json_object(b'{"n": 1234567890123456789012}')["n"] == 1234567890123456789012
