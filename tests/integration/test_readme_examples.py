"""The three curl examples of the README ("Testing"), with urllib."""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

from .harness import MOCK_TEXT, Daemon, LiteLLM


def fetch(url: str, body: dict[str, Any] | None = None) -> tuple[int, str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.headers.get("content-type", ""), json.load(response)


def test_health(mpcapi: Daemon, litellm: LiteLLM) -> None:
    status, content_type, body = fetch(mpcapi.url + "/health")
    assert status == 200
    assert content_type.startswith("application/json")
    assert body["status"] == "ok"
    assert body["service"] == "mpc-api"
    assert body["litellm_url"] == litellm.url
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["timestamp"])


def test_models(mpcapi: Daemon) -> None:
    status, _, body = fetch(mpcapi.api_base + "/models")
    assert status == 200
    assert body["object"] == "list"
    assert "gpt-4o-mini" in [model["id"] for model in body["data"]]


def test_chat_completions(mpcapi: Daemon) -> None:
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}
    status, content_type, body = fetch(mpcapi.api_base + "/chat/completions", request)
    assert status == 200
    assert content_type.startswith("application/json")
    assert body["choices"][0]["message"]["content"] == MOCK_TEXT
