"""Errors MPC-API produces itself, and the one function that renders them.

Every error body has the seed's shape: ``{"error": <type>, "message": <detail>,
"request_id": <id>}``, plus ``"details"`` for validation errors. Errors that LiteLLM
returns for the client's own request are relayed as they are (see ``app``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from twisted.web.iweb import IRequest

JSON_CONTENT_TYPE = b"application/json"


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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.details = details
        self.headers = dict(headers or {})
        # For errors LiteLLM caused: unreachable, timeout, status_5xx, key_refused, broken.
        self.upstream_failure = upstream_failure

    def body(self, request_id: str) -> bytes:
        document: dict[str, Any] = {
            "error": self.error,
            "message": self.message,
            "request_id": request_id,
        }
        if self.details:
            document["details"] = list(self.details)
        return json.dumps(document).encode("utf-8")


def bad_request(message: str, details: Sequence[Mapping[str, Any]] | None = None) -> ApiError:
    return ApiError(400, "Bad Request", message, details=details)


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


def render_error(request: IRequest, error: ApiError, request_id: str) -> bytes:
    """Set the status and headers of ``request`` for ``error`` and return the body."""
    set_status(request, error.status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("latin-1"))
    return with_length(request, error.body(request_id))


def with_length(request: IRequest, body: bytes) -> bytes:
    """Declare the body's length: no chunked framing for a body we hold whole."""
    request.setHeader(b"content-length", b"%d" % len(body))
    return body
