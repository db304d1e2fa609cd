"""The OpenAPI 3.1 document served at ``GET /openapi.json``.

Built once at start from the routes the Klein app really has (its ``url_map``) and from the
same JSON Schemas the validator compiles (``validation.load_schema``), so the document cannot
drift from what the daemon accepts. Each known route (by endpoint name) has a hand-written
description below; a route added later without one still appears, with the generic errors.

Security follows the configuration: with ``MPCAPI_AUTH=keys`` the OpenAI routes need a client
key (``clientKey``); the admin surfaces always need ``MPCAPI_ADMIN_KEY`` (``adminKey``), except
``/metrics`` with ``MPCAPI_METRICS_PUBLIC``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from mpcapi import __version__
from mpcapi.config.settings import Settings
from mpcapi.metrics.dashboard import load_assets
from mpcapi.openai.routes import BY_NAME, ROUTES, Route
from mpcapi.openai.validation import load_schema

OPENAPI_VERSION = "3.1.0"

# Request body schema (a file of mpcapi/schemas) of each validated route, by endpoint name.
BODY_SCHEMAS = {route.name: route.schema for route in ROUTES if route.schema is not None}
# The component names of each validated route's request body and answer.
_BODY_COMPONENTS = {
    "chat_completions": ("ChatCompletionRequest", "ChatCompletionResponse"),
    "completions": ("CompletionRequest", "CompletionResponse"),
    "embeddings": ("EmbeddingRequest", "EmbeddingResponse"),
}

# LiteLLM's own errors for the client's request pass through with their status and body.
PASSTHROUGH_STATUSES = ("400", "404", "409", "413", "422", "429")
# What any request can meet: too slow to arrive (408), a bug (500), too many connections (503).
COMMON_ERRORS = ("408", "500", "503")

_REASONS = {
    "400": "Invalid JSON, not a JSON object, or a schema violation (`details` lists each field)",
    "401": "Missing, malformed or unknown key (`WWW-Authenticate: Bearer`)",
    "403": "The surface is closed (no `MPCAPI_ADMIN_KEY` configured), the key is refused, or "
    "the model is not in the client key's or its team's list (`model_not_allowed`)",
    "404": "Unknown route or file",
    "405": "Wrong method for the route (`Allow` lists the right ones)",
    "408": "The request's headers and body did not arrive within `MPCAPI_READ_TIMEOUT`",
    "409": "Conflict reported by LiteLLM, or a duplicate alias or name (admin API)",
    "413": "Request body over `MPCAPI_MAX_BODY_BYTES`",
    "422": "LiteLLM could not process the request",
    "426": "Plain HTTP request on the WebSocket route",
    "429": "Rate limited (by MPC-API's limits or by LiteLLM); see `Retry-After`",
    "500": "A bug in MPC-API: a generic message, never a traceback",
    "502": "LiteLLM unreachable, answering 5xx, or refusing `LITELLM_API_KEY`",
    "503": "Too many open connections (`MPCAPI_MAX_CONNECTIONS`); see `Retry-After`",
    "504": "LiteLLM sent no response headers (or no data) within `LITELLM_TIMEOUT`",
}

_ERROR_DETAILS: dict[str, Any] = {
    "type": "array",
    "description": "Validation errors, one per offending field",
    "items": {
        "type": "object",
        "required": ["field", "message"],
        "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
    },
}

# MPC-API's own errors, by MPCAPI_ERROR_FORMAT (see mpcapi.errors).
_ERROR_SCHEMAS: dict[str, dict[str, Any]] = {
    "openai": {
        "type": "object",
        "description": "An error MPC-API produces itself, in OpenAI's shape.",
        "required": ["error", "message", "request_id"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string", "description": "What went wrong"},
                    "type": {
                        "type": "string",
                        "description": "OpenAI's error type: invalid_request_error, "
                        "authentication_error, permission_error, rate_limit_error, "
                        "insufficient_quota or server_error",
                    },
                    "param": {
                        "type": ["string", "null"],
                        "description": "The request field at fault (`messages[0].role`)",
                    },
                    "code": {
                        "type": "string",
                        "description": "invalid_api_key, rate_limit_exceeded, "
                        "insufficient_quota, or the status's reason in snake case",
                    },
                },
            },
            "message": {
                "type": "string",
                "description": "`error.message` again, for the seed's readers",
            },
            "request_id": {"type": "string", "description": "The request's `x-request-id`"},
            "details": _ERROR_DETAILS,
        },
    },
    "seed": {
        "type": "object",
        "description": "An error MPC-API produces itself, in the seed's flat shape.",
        "required": ["error", "message", "request_id"],
        "properties": {
            "error": {"type": "string", "description": "The status's reason phrase"},
            "message": {"type": "string", "description": "What went wrong"},
            "request_id": {"type": "string", "description": "The request's `x-request-id`"},
            "details": _ERROR_DETAILS,
        },
    },
}

_UPSTREAM_ERROR_SCHEMA: dict[str, Any] = {
    "description": "An error LiteLLM returned for the client's own request, relayed as it is: "
    "OpenAI's shape, or FastAPI's `{\"detail\": …}` (an unknown route of LiteLLM's, a "
    "field it requires).",
    "anyOf": [
        {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": ["string", "null"]},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "integer", "null"]},
                    },
                }
            },
        },
        {"type": "object", "required": ["detail"]},
    ],
}

# MPC-API's own errors on the Anthropic routes (see mpcapi.errors).
_ANTHROPIC_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An error MPC-API produces itself on an Anthropic route, in Anthropic's shape.",
    "required": ["type", "error", "request_id"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
        "request_id": {"type": "string"},
    },
}

_HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status", "service", "timestamp", "litellm_url", "version"],
    "properties": {
        "status": {"const": "ok"},
        "service": {"const": "mpc-api"},
        "timestamp": {"type": "string", "description": "ISO-8601 UTC with milliseconds and Z"},
        "litellm_url": {"type": "string"},
        "version": {"type": "string"},
    },
}

_READY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status", "service", "litellm"],
    "properties": {
        "status": {"enum": ["ready", "unavailable"]},
        "service": {"const": "mpc-api"},
        "litellm": {
            "type": "object",
            "description": "The whole of LITELLM_BASE_URL: every instance's probe in one.",
            "required": ["url", "latency_ms"],
            "properties": {
                "url": {"type": "string"},
                "status": {"type": "integer"},
                "error": {"type": "string"},
                "latency_ms": {"type": "number"},
            },
        },
        "upstreams": {
            "type": "array",
            "description": "Each LiteLLM instance of LITELLM_BASE_URL, probed just now.",
            "items": {
                "type": "object",
                "required": ["url", "status", "healthy", "in_flight", "latency_ms", "error"],
                "properties": {
                    "url": {"type": "string"},
                    "status": {
                        "type": ["integer", "null"],
                        "description": "HTTP status of its liveness probe; null: no answer",
                    },
                    "healthy": {"type": "boolean"},
                    "in_flight": {"type": "integer", "minimum": 0},
                    "latency_ms": {"type": ["number", "null"]},
                    "error": {"type": ["string", "null"]},
                },
            },
        },
    },
}

_MODELS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "LiteLLM's model list, as LiteLLM sends it.",
    "properties": {
        "object": {"type": "string"},
        "data": {
            "type": "array",
            "items": {"type": "object", "properties": {"id": {"type": "string"}}},
        },
    },
}

_ANSWER_SCHEMAS: dict[str, dict[str, Any]] = {
    "chat_completions": {
        "type": "object",
        "description": "LiteLLM's chat completion, unchanged.",
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object"}},
            "usage": {"type": ["object", "null"]},
        },
    },
    "completions": {
        "type": "object",
        "description": "LiteLLM's text completion, unchanged.",
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object"}},
            "usage": {"type": ["object", "null"]},
        },
    },
    "embeddings": {
        "type": "object",
        "description": "LiteLLM's embeddings, unchanged.",
        "properties": {
            "object": {"type": "string"},
            "data": {"type": "array", "items": {"type": "object"}},
            "model": {"type": ["string", "null"]},
            "usage": {"type": ["object", "null"]},
        },
    },
}

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json_content(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": dict(schema)}}


def _header(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": True, "schema": schema}


def _success(description: str, content: Mapping[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "headers": {"x-request-id": _ref("headers", "RequestId")},
    }
    if content is not None:
        response["content"] = dict(content)
    return response


def body_schema(name: str) -> dict[str, Any]:
    """The validator's schema ``name`` as an OpenAPI 3.1 schema component (the same JSON
    Schema 2020-12, without ``$schema`` and ``$id``, which belong to a standalone file)."""
    schema = load_schema(name)
    return {key: value for key, value in schema.items() if key not in ("$schema", "$id")}


# --- the operations of the known routes, by endpoint name -----------------------------------


def _operation(
    summary: str,
    description: str,
    responses: dict[str, Any],
    errors: Iterable[str],
    *,
    tags: list[str],
    security: list[dict[str, list[str]]] | None = None,
    request_body: dict[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "description": description,
        "tags": tags,
        "parameters": [_ref("parameters", "RequestId"), *(parameters or [])],
        "responses": dict(
            sorted(
                {
                    **{
                        status: _ref("responses", f"Error{status}")
                        for status in (*errors, *COMMON_ERRORS)
                    },
                    **responses,
                }.items()
            )
        ),
    }
    if request_body is not None:
        operation["requestBody"] = request_body
    if security is not None:
        operation["security"] = security
    return operation


class _Describer:
    """Writes the operation of one route (endpoint name, method) for ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self.keys = settings.auth == "keys"
        self.metrics_public = settings.metrics_public

    def _client_security(self) -> list[dict[str, list[str]]] | None:
        return [{"clientKey": []}] if self.keys else None

    def _client_errors(self) -> list[str]:
        # With client keys: 401 (no valid key), 403 (a model outside the key's list).
        return ["401", "403"] if self.keys else []

    def describe(self, endpoint: str, path: str, method: str) -> dict[str, Any]:
        method_of = getattr(self, f"_{endpoint}", None)
        route = BY_NAME.get(endpoint)
        operation: dict[str, Any]
        if endpoint in _TENANCY_OPERATIONS:
            operation = self._tenancy(endpoint, path)
        elif method_of is not None:
            operation = method_of(path)
        elif route is not None:
            operation = self._forwarded(route, path)
        else:
            operation = _operation(
                f"{method} {path}",
                "A route of MPC-API (see README.md).",
                {"200": _success("Success")},
                [],
                tags=["other"],
            )
        operation["operationId"] = _operation_id(method, path)
        return operation

    # Health

    def _health(self, path: str) -> dict[str, Any]:
        return _operation(
            "Liveness",
            "MPC-API is up; never touches LiteLLM.",
            {"200": _success("Alive", _json_content(_ref("schemas", "Health")))},
            [],
            tags=["health"],
        )

    def _ready(self, path: str) -> dict[str, Any]:
        return _operation(
            "Readiness",
            "200 when LiteLLM (at least one instance of `LITELLM_BASE_URL`) answers its "
            "liveness probe within `MPCAPI_READY_TIMEOUT`, else 503 with what failed "
            "(for orchestrators).",
            {
                "200": _success("Ready", _json_content(_ref("schemas", "Ready"))),
                "503": _success(
                    "Not ready (or, as everywhere, too many open connections)",
                    _json_content({"anyOf": [_ref("schemas", "Ready"), _ref("schemas", "Error")]}),
                ),
            },
            [],
            tags=["health"],
        )

    def _openapi_document(self, path: str) -> dict[str, Any]:
        return _operation(
            "This document",
            "The OpenAPI 3.1 description of MPC-API, built at start.",
            {"200": _success("The document", _json_content(_ANY_OBJECT))},
            [],
            tags=["health"],
        )

    # OpenAI routes

    def _openai_errors(self) -> list[str]:
        return sorted({*self._client_errors(), *PASSTHROUGH_STATUSES, "502", "504"})

    def _models(self, path: str) -> dict[str, Any]:
        return _operation(
            "List models",
            "LiteLLM's `GET /models`, body as LiteLLM sends it.",
            {"200": _success("The models", _json_content(_ref("schemas", "ModelList")))},
            self._openai_errors(),
            tags=["openai"],
            security=self._client_security(),
        )

    def _forwarded(self, route: Route, path: str) -> dict[str, Any]:
        """A forwarded route, from its entry in the route table."""
        endpoint = route.name
        components = _BODY_COMPONENTS.get(endpoint)
        answer: dict[str, Any] = (
            _ref("schemas", components[1]) if components is not None else _ANY_OBJECT
        )
        content: dict[str, Any] = (
            {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
            if route.binary
            else _json_content(answer)
        )
        description = "LiteLLM's answer, unchanged"
        if route.binary:
            description += ", relayed as it arrives (audio, file contents)"
        request_body: dict[str, Any] | None = None
        if route.body == "json":
            component = components[0] if components is not None else _request_component(route)
            request_body = {"required": True, "content": _json_content(_ref("schemas", component))}
            description = (
                f"Validated against `mpcapi/openai/schemas/{route.schema}.json` (strict where "
                "the API is strict; unknown fields pass through), then " + description
            )
        elif route.body == "multipart":
            request_body = {"required": True, "content": {"multipart/form-data": _form(route)}}
            required = ", ".join(f"`{field}`" for field in (*route.form, *route.files))
            description = (
                f"A multipart upload (required fields: {required}), streamed to LiteLLM from "
                "disk, never held in memory; then " + description
            )
        description += (
            ". LiteLLM's own errors for the request (400, 404, 409, 413, 422, 429) pass "
            "through with their status, body and `Retry-After` / `x-ratelimit-*` headers."
        )
        if route.events is not None:
            content["text/event-stream"] = {
                "schema": {"type": "string", "description": "Server-sent events"}
            }
            description += (
                ' With `"stream": true` the answer is `text/event-stream`, relayed event by '
                "event; an error after the first event is one error event of the API's own "
                "shape."
            )
        if route.stored is not None:
            description += (
                f" With client keys, a {route.stored.kind} belongs to the key that created it: "
                "any other key gets 404, and lists show only the caller's."
            )
        if route.anthropic:
            description += (
                " Anthropic's API: the key may come as `x-api-key`, `anthropic-version` and "
                "`anthropic-beta` pass through, and MPC-API's own errors have Anthropic's "
                'shape (`{"type": "error", "error": {"type", "message"}}`).'
            )
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"\{(\w+)\}", path)
        ]
        operation = _operation(
            route.summary,
            description,
            {"200": _success("LiteLLM's answer", content)},
            self._openai_errors(),
            tags=["anthropic" if route.anthropic else "openai"],
            security=self._client_security(),
            request_body=request_body,
            parameters=parameters,
        )
        if route.anthropic:
            operation["responses"] = _in_anthropic_shape(operation["responses"])
        return operation

    def _websocket(self, path: str) -> dict[str, Any]:
        return _operation(
            "WebSocket",
            "Upgrades to a WebSocket carrying several streamed requests (docs/websocket.md); "
            "a plain HTTP request is answered 426.",
            {"101": _success("Switching to the WebSocket protocol")},
            sorted({*self._client_errors(), "426", "429"}),
            tags=["openai"],
            security=self._client_security(),
            parameters=[
                _header("Upgrade", {"const": "websocket"}),
                _header("Connection", {"const": "Upgrade"}),
                _header("Sec-WebSocket-Key", {"type": "string", "minLength": 1}),
                _header("Sec-WebSocket-Version", {"const": "13"}),
            ],
        )

    # Admin surfaces

    def _admin(
        self, summary: str, description: str, responses: dict[str, Any], public: bool = False
    ) -> dict[str, Any]:
        return _operation(
            summary,
            description,
            responses,
            [] if public else ["401", "403"],
            tags=["admin"],
            security=None if public else [{"adminKey": []}],
        )

    def _scrape(self, path: str) -> dict[str, Any]:
        text = {"schema": {"type": "string"}}
        return self._admin(
            "Prometheus metrics",
            "The Prometheus exposition (OpenMetrics when asked by `Accept`). Needs the admin "
            "key unless `MPCAPI_METRICS_PUBLIC=true`.",
            {
                "200": _success(
                    "Metrics",
                    {"text/plain": text, "application/openmetrics-text": text},
                )
            },
            public=self.metrics_public,
        )

    def _stats(self, path: str) -> dict[str, Any]:
        return self._admin(
            "Dashboard numbers",
            "Request rates, latencies, errors, tokens and cost, as the dashboard shows them.",
            {"200": _success("Statistics", _json_content(_ANY_OBJECT))},
        )

    def _usage(self, path: str) -> dict[str, Any]:
        return self._admin(
            "Usage",
            "Tokens and cost per key, user and model.",
            {"200": _success("Usage", _json_content(_ANY_OBJECT))},
        )

    def _tenancy(self, endpoint: str, path: str) -> dict[str, Any]:
        """An operation of the admin API (``mpcapi.http.adminapi``)."""
        summary, description, status, body, errors = _TENANCY_OPERATIONS[endpoint]
        answer = _TEAM_SCHEMA if "team" in endpoint else _KEY_SCHEMA
        if endpoint.startswith("admin_list_"):
            answer = {"type": "object", "properties": {"data": {"type": "array", "items": answer}}}
        names = re.findall(r"{(\w+)}", path)
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in names
        ]
        if endpoint == "admin_list_keys":
            parameters += [_query("user"), _query("team_id")]
        if endpoint.startswith("admin_list_"):
            parameters += [_query("limit", "integer"), _query("offset", "integer")]
        request_body = None
        if body is not None:
            request_body = {"required": body is not _ROTATE_SCHEMA, **_json_content(body)}
        return _operation(
            summary,
            description,
            {status: _success(summary, _json_content(answer))},
            ["400", "401", "403", *errors],
            tags=["admin"],
            security=[{"adminKey": []}],
            request_body=request_body,
            parameters=parameters,
        )

    def _dashboard_redirect(self, path: str) -> dict[str, Any]:
        return _operation(
            "Dashboard",
            "Redirects to `/dashboard/`.",
            {"301": _success("To `/dashboard/`")},
            [],
            tags=["admin"],
        )

    def _dashboard(self, path: str) -> dict[str, Any]:
        assets = load_assets()  # name -> (content type, body), as the route serves them
        types = sorted(
            {content_type.split(b";")[0].decode("ascii") for content_type, _ in assets.values()}
        )
        parameters = []
        responses = {"200": _success("A file of the dashboard", {name: {} for name in types})}
        if "{name}" in path:
            parameters.append(
                {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "schema": {"enum": sorted(assets)},
                }
            )
            responses["308"] = _success("`index.html`: to its canonical URL `/dashboard/`")
        return _operation(
            "Dashboard files",
            "The dashboard's page and assets; their numbers come from `/api/stats` (which "
            "needs the admin key).",
            responses,
            ["404"],
            tags=["admin"],
            parameters=parameters,
        )


# --- the routes of the app ---------------------------------------------------------------------

_VARIABLE = re.compile(r"<(?:(?P<converter>\w+)(?:\((?P<args>[^)]*)\))?:)?(?P<name>\w+)>")


# --- the admin API (keys and teams) -------------------------------------------------------------

_NULLABLE_COUNT = {"type": ["integer", "null"], "minimum": 0}
_NULLABLE_DOLLARS = {"type": ["number", "null"], "minimum": 0}
_PERIOD = {"enum": ["day", "week", "month", None]}
_MODELS = {
    "type": ["array", "null"],
    "items": {"type": "string", "minLength": 1},
    "description": "Exact names, `prefix/*` patterns or `*`; null: every model",
}
_LIMIT_FIELDS: dict[str, Any] = {
    "rpm": _NULLABLE_COUNT,
    "tpm": _NULLABLE_COUNT,
    "budget_usd": _NULLABLE_DOLLARS,
    "budget_period": _PERIOD,
    "models": _MODELS,
    "metadata": {"type": ["object", "null"]},
}
_KEY_FIELDS: dict[str, Any] = {
    "user": {"type": "string", "minLength": 1},
    "alias": {"type": ["string", "null"], "pattern": "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$"},
    "team_id": {"type": ["string", "null"]},
    **_LIMIT_FIELDS,
    "expires_at": {"type": ["string", "null"], "description": "ISO-8601 with an offset"},
    "expires_in": {
        "type": ["string", "number", "null"],
        "description": "`30d`, `12h`, `90m`, `3600s` or seconds",
    },
}
_KEY_BODY: dict[str, Any] = {
    "type": "object",
    "properties": _KEY_FIELDS,
    "additionalProperties": False,
}
_TEAM_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "minLength": 1}, **_LIMIT_FIELDS},
    "additionalProperties": False,
}
_ROTATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"grace_seconds": {"type": "number", "minimum": 0, "maximum": 2592000}},
    "additionalProperties": False,
}
_SPEND: dict[str, Any] = {
    "spend_usd": {"type": "number"},
    "budget_remaining_usd": {"type": ["number", "null"]},
    "budget_period_start": {"type": ["string", "null"]},
    "budget_resets_at": {"type": ["string", "null"]},
}
_KEY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["object", "id", "user", "state", "spend_usd"],
    "properties": {
        "object": {"const": "client_key"},
        "id": {"type": "string"},
        "state": {"enum": ["active", "revoked", "expired"]},
        "secret": {"type": "string", "description": "Only when created or rotated"},
        "created_at": {"type": "string"},
        "revoked_at": {"type": ["string", "null"]},
        "previous_secret_valid_until": {"type": ["string", "null"]},
        **_KEY_FIELDS,
        **_SPEND,
    },
}
_TEAM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["object", "id", "name"],
    "properties": {
        "object": {"const": "team"},
        "id": {"type": "string"},
        "name": {"type": "string"},
        "active_keys": {"type": "integer"},
        **_SPEND,
    },
}
# endpoint -> summary, description, success status, request body, further errors
_TENANCY_OPERATIONS: dict[str, tuple[str, str, str, dict[str, Any] | None, list[str]]] = {
    "admin_create_key": (
        "Create a client key",
        "The answer holds the key's `secret`, shown this once.",
        "201",
        _KEY_BODY,
        ["409"],
    ),
    "admin_list_keys": ("List client keys", "Oldest first; `has_more`, `next_offset`.", "200",
                        None, []),
    "admin_get_key": ("A client key", "With its current period's spend and reset time.", "200",
                      None, ["404"]),
    "admin_update_key": ("Change a client key", "The fields given change; null clears one.",
                         "200", _KEY_BODY, ["404", "409"]),
    "admin_revoke_key": ("Revoke a client key", "Refused by every daemon within 5 seconds.",
                         "200", None, ["404"]),
    "admin_rotate_key": ("Rotate a client key's secret",
                         "A new `secret`; the old one works `grace_seconds` more (default 0).",
                         "200", _ROTATE_SCHEMA, ["404", "409"]),
    "admin_create_team": ("Create a team", "Its limits apply on top of its keys' own.", "201",
                          _TEAM_BODY, ["409"]),
    "admin_list_teams": ("List teams", "Oldest first.", "200", None, []),
    "admin_get_team": ("A team", "With its current period's spend and reset time.", "200", None,
                       ["404"]),
    "admin_update_team": ("Change a team", "The fields given change; null clears one.", "200",
                          _TEAM_BODY, ["404", "409"]),
    "admin_delete_team": ("Delete a team", "Only a team without active keys (409 otherwise).",
                          "200", None, ["404", "409"]),
}  # fmt: skip


def _query(name: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": kind}}


def expand_rule(rule: str) -> list[str]:
    """Werkzeug rule -> OpenAPI paths: ``any(…)`` variables become one path per choice,
    other variables ``{name}``."""
    paths = [""]
    position = 0
    for match in _VARIABLE.finditer(rule):
        literal = rule[position : match.start()]
        position = match.end()
        if match.group("converter") == "any":
            choices = [choice.strip() for choice in (match.group("args") or "").split(",")]
            paths = [path + literal + choice for path in paths for choice in choices if choice]
        else:
            paths = [path + literal + "{" + match.group("name") + "}" for path in paths]
    return [path + rule[position:] for path in paths]


def _operation_id(method: str, path: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_") or "root"
    if path.endswith("/") and path != "/":
        words += "_index"  # /dashboard/ next to /dashboard
    return f"{method.lower()}_{words}"


def routes_of(url_map: Any) -> list[tuple[str, str, str]]:
    """(path, method, endpoint) of every route of a Klein/werkzeug ``url_map``; HEAD, which
    werkzeug adds to every GET, is left out."""
    found = []
    for rule in url_map.iter_rules():
        for path in expand_rule(rule.rule):
            for method in sorted(rule.methods or ()):
                if method not in ("HEAD", "OPTIONS"):
                    found.append((path, method, str(rule.endpoint)))
    return found


def _error_responses() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, reason in _REASONS.items():
        schema: dict[str, Any] = _ref("schemas", "Error")
        if status in PASSTHROUGH_STATUSES or status == "401":
            # Ours, or LiteLLM's own error for the client's request, relayed as it is.
            schema = {"anyOf": [_ref("schemas", "Error"), _ref("schemas", "UpstreamError")]}
        headers: dict[str, Any] = {"x-request-id": _ref("headers", "RequestId")}
        if status == "405":
            headers["Allow"] = {"description": "The allowed methods", "schema": {"type": "string"}}
        if status in ("429", "503"):
            headers["Retry-After"] = {
                "description": "Seconds to wait before trying again",
                "schema": {"type": "string"},
            }
        if status == "401":
            headers["WWW-Authenticate"] = {"schema": {"type": "string"}}
        responses[f"Error{status}"] = {
            "description": reason,
            "headers": headers,
            "content": _json_content(schema),
        }
    return responses


# LiteLLM answers a comma-separated ``model`` ("a,b") with one answer per model, as a list.
_MULTI_MODEL_ANSWER: dict[str, Any] = {
    "type": "array",
    "description": "LiteLLM's answer to a comma-separated `model`: one item per model.",
    "items": {"type": "object"},
}


def _answer_schema(endpoint: str) -> dict[str, Any]:
    schema = _ANSWER_SCHEMAS[endpoint]
    if endpoint == "embeddings":
        return schema
    return {"anyOf": [schema, _MULTI_MODEL_ANSWER]}


def _in_anthropic_shape(responses: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic route's responses: the shared error responses, with our own errors in
    Anthropic's shape (LiteLLM's pass through as they are)."""
    shaped: dict[str, Any] = {}
    for status, response in responses.items():
        if "$ref" not in response:
            shaped[status] = response
            continue
        schema = {"anyOf": [_ref("schemas", "AnthropicError"), _ref("schemas", "UpstreamError")]}
        shaped[status] = {
            "description": _REASONS[status],
            "headers": {"x-request-id": _ref("headers", "RequestId")},
            "content": _json_content(schema),
        }
    return shaped


def _request_component(route: Route) -> str:
    """The component name of a route's JSON body: ``anthropic_messages`` ->
    ``AnthropicMessagesRequest``."""
    return "".join(word.capitalize() for word in (route.schema or route.name).split("_")) + (
        "Request"
    )


def _form(route: Route) -> dict[str, Any]:
    """A multipart body's schema: its required text fields and files."""
    properties: dict[str, Any] = {field: {"type": "string", "minLength": 1} for field in route.form}
    properties.update({field: {"type": "string", "format": "binary"} for field in route.files})
    required = [*route.form, *route.files]
    return {"schema": {"type": "object", "required": required, "properties": properties}}


def _components(settings: Settings) -> dict[str, Any]:
    schemas: dict[str, Any] = {
        "Error": _ERROR_SCHEMAS[settings.error_format],
        "UpstreamError": _UPSTREAM_ERROR_SCHEMA,
        "AnthropicError": _ANTHROPIC_ERROR_SCHEMA,
        "Health": _HEALTH_SCHEMA,
        "Ready": _READY_SCHEMA,
        "ModelList": _MODELS_SCHEMA,
    }
    for endpoint, (request_component, answer_component) in _BODY_COMPONENTS.items():
        schemas[request_component] = body_schema(BODY_SCHEMAS[endpoint])
        schemas[answer_component] = _answer_schema(endpoint)
    for route in ROUTES:
        if route.schema is not None and route.name not in _BODY_COMPONENTS:
            schemas[_request_component(route)] = body_schema(route.schema)
    return {
        "schemas": schemas,
        "responses": _error_responses(),
        "parameters": {
            "RequestId": {
                "name": "x-request-id",
                "in": "header",
                "required": False,
                "description": "Kept when 1-128 characters of `A-Z a-z 0-9 . _ : @ / + = -`, "
                "otherwise replaced by a fresh id; forwarded to LiteLLM and logged.",
                "schema": {"type": "string"},
            }
        },
        "headers": {
            "RequestId": {
                "description": "The request's id (the client's when sane, else a fresh one)",
                "required": True,
                "schema": {"type": "string", "minLength": 1},
            }
        },
        "securitySchemes": {
            "clientKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "A client key (`MPCAPI_AUTH=keys`, made with `mpcapi-admin`).",
            },
            "adminKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "`MPCAPI_ADMIN_KEY`; without one configured the admin surfaces "
                "answer 403.",
            },
        },
    }


_DESCRIPTION = """\
MPC-API speaks the OpenAI HTTP API and forwards every call to a LiteLLM Gateway. Every OpenAI
route exists under `/api` (use `http://host:3000/api` as the OpenAI base URL) and `/v1`.

Errors MPC-API produces itself have OpenAI's shape, `{"error": {"message", "type", "param",
"code"}, "message", "request_id"}` (plus `details` for validation errors; with
`MPCAPI_ERROR_FORMAT=seed`, the seed's flat `{"error", "message", "request_id"}`): 400
invalid body, 404 unknown route, 405 wrong method (with `Allow`), 413 body too large, 502
LiteLLM failed, 504 LiteLLM too slow, 500 a bug. Errors LiteLLM returns for the client's own
request pass through unchanged. Every response carries `x-request-id`.
"""


def build_document(url_map: Any, settings: Settings) -> dict[str, Any]:
    """The OpenAPI document of the routes of ``url_map`` as ``settings`` configure them."""
    describer = _Describer(settings)
    paths: dict[str, dict[str, Any]] = {}
    for path, method, endpoint in routes_of(url_map):
        paths.setdefault(path, {})[method.lower()] = describer.describe(endpoint, path, method)
    if describer.keys:
        security_note = "The OpenAI routes need a client key (`Authorization: Bearer <key>`)."
    else:
        security_note = (
            "The OpenAI routes are open (`MPCAPI_AUTH=off`); without `LITELLM_API_KEY` the "
            "client's `Authorization` passes through to LiteLLM."
        )
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "MPC-API",
            "version": __version__,
            "description": _DESCRIPTION + "\n" + security_note,
        },
        "tags": [
            {"name": "openai", "description": "The OpenAI API, forwarded to LiteLLM"},
            {"name": "health", "description": "Probes for people and orchestrators"},
            {
                "name": "admin",
                "description": "Metrics, statistics, the dashboard, and the admin API for "
                "client keys and teams",
            },
            {"name": "other", "description": "Further routes"},
        ],
        "paths": dict(sorted(paths.items())),
        "components": _components(settings),
    }


def document_bytes(url_map: Any, settings: Settings) -> bytes:
    """``build_document`` as the bytes that ``GET /openapi.json`` serves."""
    return json.dumps(build_document(url_map, settings), indent=1).encode("utf-8")
