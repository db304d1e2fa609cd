"""Errors MPC-API produces itself, and the one function that renders them.

An error body has OpenAI's shape, which every OpenAI SDK reads (``error.message`` is what
the exception shows)::

    {"error": {"message": <detail>, "type": <OpenAI type>, "param": <field>, "code": <code>},
     "message": <detail>, "request_id": <id>}

with the seed's top-level ``message`` and ``request_id`` kept for its readers, plus
``"details"`` for validation errors. ``MPCAPI_ERROR_FORMAT=seed`` gives the seed's flat
shape instead: ``{"error": <reason phrase>, "message": <detail>, "request_id": <id>}``.
On Anthropic's routes errors take Anthropic's shape, which the Anthropic SDKs read:
``{"type": "error", "error": {"type": <Anthropic type>, "message": <detail>},
"request_id": <id>}``. Errors that LiteLLM returns for the client's own request are relayed
as they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal

from twisted.web.iweb import IRequest

if TYPE_CHECKING:
    from mpcapi.exchange import Exchange

JSON_CONTENT_TYPE = b"application/json"

ErrorFormat = Literal["openai", "seed", "anthropic"]
ERROR_FORMATS: tuple[ErrorFormat, ...] = ("openai", "seed")  # MPCAPI_ERROR_FORMAT's choices

# OpenAI's ``error.type`` for a status, when the error does not name its own.
_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}


# Anthropic's ``error.type`` for a status.
_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    if status in _ANTHROPIC_TYPES:
        return _ANTHROPIC_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def openai_type(status: int) -> str:
    """OpenAI's error type for ``status``: client errors are invalid requests unless they
    are about the key or the rate; 5xx are server errors."""
    if status >= 500:
        return "server_error"
    return _OPENAI_TYPES.get(status, "invalid_request_error")


class ApiError(Exception):
    """An HTTP error answer: status, a short type, a human message."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        details: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
        upstream_failure: str | None = None,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error  # the seed's label: the status's reason phrase
        self.message = message
        self.details = details
        self.headers = dict(headers or {})
        # For errors LiteLLM caused: unreachable, timeout, status_5xx, key_refused, broken.
        self.upstream_failure = upstream_failure
        self.param = param  # the request field at fault, when there is one
        # OpenAI's error.code (default: the label in snake case) and error.type.
        self.code = code or "_".join(error.lower().replace("-", " ").split())
        self.kind = kind or openai_type(status)

    def document(self, request_id: str, error_format: ErrorFormat = "openai") -> dict[str, Any]:
        """The error body as a JSON document, in ``error_format`` (see the module doc)."""
        document: dict[str, Any]
        if error_format == "anthropic":
            error = {"type": anthropic_type(self.status), "message": self.message}
            return {"type": "error", "error": error, "request_id": request_id}
        if error_format == "seed":
            document = {"error": self.error}
        else:
            document = {
                "error": {
                    "message": self.message,
                    "type": self.kind,
                    "param": self.param,
                    "code": self.code,
                }
            }
        document["message"] = self.message
        document["request_id"] = request_id
        if self.details:
            document["details"] = list(self.details)
        return document

    def body(self, request_id: str, error_format: ErrorFormat = "openai") -> bytes:
        return json.dumps(self.document(request_id, error_format)).encode("utf-8")


def bad_request(
    message: str,
    details: Sequence[Mapping[str, Any]] | None = None,
    param: str | None = None,
) -> ApiError:
    return ApiError(400, "Bad Request", message, details=details, param=param)


def not_found(message: str) -> ApiError:
    return ApiError(404, "Not Found", message)


def method_not_allowed(message: str, allowed: Sequence[str]) -> ApiError:
    return ApiError(405, "Method Not Allowed", message, headers={"Allow": ", ".join(allowed)})


def payload_too_large(limit: int) -> ApiError:
    return ApiError(413, "Payload Too Large", f"request body exceeds the limit of {limit} bytes")


def request_timeout(seconds: float) -> ApiError:
    return ApiError(408, "Request Timeout", f"the request did not arrive within {seconds:g} s")


def bad_gateway(message: str, upstream_failure: str) -> ApiError:
    return ApiError(502, "Bad Gateway", message, upstream_failure=upstream_failure)


def gateway_timeout(message: str) -> ApiError:
    return ApiError(504, "Gateway Timeout", message, upstream_failure="timeout")


def internal_error() -> ApiError:
    return ApiError(500, "Internal Server Error", "an unexpected error occurred; see the logs")


def phrase(status: int) -> str:
    """The standard reason phrase of ``status`` ("Error" for a status without one)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def set_status(request: IRequest, status: int) -> None:
    """Set the status with its standard reason phrase (Twisted lacks some, such as 429's)."""
    try:
        phrase = HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        phrase = b"Unknown Status"
    request.setResponseCode(status, phrase)


def render_error(request: IRequest, error: ApiError, exchange: Exchange) -> bytes:
    """Set the status and headers of ``request`` for ``error`` and return the body, in
    the format of the request's ``exchange``."""
    set_status(request, error.status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("latin-1"))
    return with_length(request, error.body(exchange.request_id, exchange.error_format))


def with_length(request: IRequest, body: bytes) -> bytes:
    """Declare the body's length: no chunked framing for a body we hold whole."""
    request.setHeader(b"content-length", b"%d" % len(body))
    return body
