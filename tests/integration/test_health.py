"""GET /health never touches LiteLLM; GET /health/ready asks LiteLLM's liveness probe."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from .harness import Daemon


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_ready_when_litellm_answers(mpcapi: Daemon) -> None:
    status, body = get(mpcapi.url + "/health/ready")
    assert status == 200, body
    assert body["status"] == "ready"


def test_not_ready_when_litellm_is_down(
    start_mpcapi: Callable[..., Daemon], dead_upstream_url: str
) -> None:
    daemon = start_mpcapi(LITELLM_BASE_URL=dead_upstream_url)
    status, body = get(daemon.url + "/health/ready")
    assert status == 503, body
    assert body["litellm"]["error"]
    assert get(daemon.url + "/health")[0] == 200


def test_not_ready_when_litellm_is_too_slow(
    start_mpcapi: Callable[..., Daemon], stalled_upstream_url: str
) -> None:
    daemon = start_mpcapi(LITELLM_BASE_URL=stalled_upstream_url, MPCAPI_READY_TIMEOUT="1")
    started = time.monotonic()
    status, body = get(daemon.url + "/health/ready")
    assert status == 503, body
    assert time.monotonic() - started < 10
