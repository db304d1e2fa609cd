"""Request validation: JSON parsing and the JSON Schemas of ``mpcapi/schemas``.

The schemas are read and compiled once, when a ``RequestValidator`` is built at start.
Every failure is a 400 whose message names the offending field.

Two compilations of each schema: fastjsonschema (Python code generated from the schema)
answers "valid?" in a few microseconds, on every request; ``jsonschema`` explains a body
that is not, with the messages and field paths our clients see (it is the judge when the
two disagree). The schemas use only keywords both read the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

import fastjsonschema
import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from mpcapi.errors import ApiError, bad_request
from mpcapi.openai.routes import SCHEMA_NAMES

_MAX_MESSAGE = 300
_MAX_DETAILS = 10


def load_schema(name: str) -> dict[str, Any]:
    text = resources.files("mpcapi.openai.schemas").joinpath(f"{name}.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# Built once: json.loads with any option builds a new decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
# Digits enough for an integer outside 64 bits (2**63 has 19); json reads those exactly.
_LONG_NUMBER = re.compile(rb"\d{19}")


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode ``body`` as a UTF-8 JSON object, or raise a 400 ``ApiError``."""
    if _LONG_NUMBER.search(body):  # orjson reads an integer past 64 bits as a rounded float
        document = _parse_with_json(body)
    else:
        try:  # orjson takes every usual body in a microsecond or two ...
            document = orjson.loads(body)
        except orjson.JSONDecodeError:  # ... and json (slower) judges and explains the rest
            document = _parse_with_json(body)
    if not isinstance(document, dict):
        raise bad_request(f"request body must be a JSON object, not {_json_type(document)}")
    return document


def _parse_with_json(body: bytes) -> Any:
    if not body.strip():
        raise bad_request("request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        offset = error.start
        raise bad_request(
            f"request body is not valid UTF-8 (bad byte at offset {offset})"
        ) from None
    try:
        document = _DECODER.decode(text)
    except json.JSONDecodeError as error:
        raise bad_request(
            f"request body is not valid JSON: {error.msg} (line {error.lineno}, "
            f"column {error.colno})"
        ) from None
    except RecursionError:
        raise bad_request("request body is not valid JSON: nested too deeply") from None
    except ValueError as error:
        raise bad_request(f"request body is not valid JSON: {error}") from None
    return document


def field_path(path: Iterable[str | int]) -> str:
    """``["messages", 0, "role"]`` -> ``messages[0].role``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _describe(error: ValidationError) -> dict[str, str]:
    message = error.message
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + "…"
    return {"field": field_path(error.absolute_path) or "(body)", "message": message}


class RequestValidator:
    """Validates request bodies against the compiled schemas, by schema name."""

    def __init__(self, names: Iterable[str] = SCHEMA_NAMES) -> None:
        self._validators: dict[str, Draft202012Validator] = {}
        self._fast: dict[str, Callable[[Any], Any]] = {}
        for name in names:
            schema = load_schema(name)
            Draft202012Validator.check_schema(schema)
            self._validators[name] = Draft202012Validator(schema)
            self._fast[name] = fastjsonschema.compile(schema)

    def validate(self, name: str, body: bytes) -> dict[str, Any]:
        """Parse and validate ``body``; return the document or raise a 400 ``ApiError``."""
        document = parse_json_object(body)
        try:
            self._fast[name](document)
            return document
        except fastjsonschema.JsonSchemaException:
            pass
        errors = list(self._validators[name].iter_errors(document))
        if errors:
            raise self._error(errors)
        return document

    @staticmethod
    def _error(errors: list[ValidationError]) -> ApiError:
        main = _describe(best_match(errors))
        field = main["field"] if main["field"] != "(body)" else None
        prefix = f"{field}: " if field else ""
        details = [_describe(error) for error in errors[:_MAX_DETAILS]]
        return bad_request(f"{prefix}{main['message']}", details=details, param=field)
