"""MPC-API's own errors as the official clients show them: the openai Python SDK,
langchain-openai, litellm as a client (from .venv-litellm), the npm openai SDK and the Vercel
AI SDK (tests/clients, installed by scripts/test). Each exception's text must carry the field
and the reason, not only ``Error code: 400``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from langchain_openai import ChatOpenAI

from .harness import HELLO, LITELLM_VENV, REPO_ROOT, Daemon

NODE_CLIENTS = REPO_ROOT / "tests" / "clients"
NODE_SDKS = {"openai-node", "vercel-ai"}
TOO_HOT = {"model": "gpt-4o-mini", "messages": HELLO, "temperature": 5}
TOO_HOT_REASON = "temperature: 5 is greater than the maximum of 2"

LITELLM_CLIENT = """
import json, sys
import litellm
base_url, api_key, request = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
request["model"] = "openai/" + request["model"]
try:
    litellm.completion(api_base=base_url, api_key=api_key, num_retries=0, **request)
    print(json.dumps({"raised": False}))
except Exception as error:
    print(json.dumps({"raised": True, "type": type(error).__name__,
                      "status": getattr(error, "status_code", None), "message": str(error)}))
"""


def litellm_client(base_url: str, api_key: str, request: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [
            str(LITELLM_VENV / "bin" / "python"),
            "-c",
            LITELLM_CLIENT,
            base_url,
            api_key,
            json.dumps(request),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        # Offline: the cost map shipped in the package, not the one on GitHub.
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def node_clients(base_url: str, api_key: str, request: dict[str, Any]) -> dict[str, Any]:
    """What the npm openai SDK and the Vercel AI SDK raised, by SDK name."""
    node = shutil.which("node")
    assert node, "node is needed for the npm clients (scripts/test installs them)"
    assert (NODE_CLIENTS / "node_modules" / "openai").is_dir(), "run scripts/test to install them"
    done = subprocess.run(
        [node, str(NODE_CLIENTS / "errors.mjs"), base_url, api_key, json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=NODE_CLIENTS,
    )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {result["sdk"]: result for result in results}


def python_errors(base_url: str, api_key: str, request: dict[str, Any]) -> dict[str, Exception]:
    """What the openai Python SDK and langchain-openai raised."""
    raised: dict[str, Exception] = {}
    with openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**request)
        raised["openai-python"] = caught.value
    settings = {k: v for k, v in request.items() if k not in ("model", "messages")}
    chat = ChatOpenAI(
        model=request["model"], base_url=base_url, api_key=api_key, max_retries=0, **settings
    )
    with pytest.raises(openai.APIStatusError) as caught:
        chat.invoke(request["messages"][0]["content"])
    raised["langchain-openai"] = caught.value
    return raised


def shown_by_every_sdk(
    base_url: str, api_key: str, request: dict[str, Any], status: int
) -> dict[str, str]:
    """Send ``request`` with every client; each must fail with ``status``. Returns the text
    of each one's exception, by client."""
    shown: dict[str, str] = {}
    for name, error in python_errors(base_url, api_key, request).items():
        assert isinstance(error, openai.APIStatusError) and error.status_code == status, name
        shown[name] = str(error)
    result = litellm_client(base_url, api_key, request)
    assert result["raised"] and result["status"] == status, result
    shown["litellm"] = result["message"]
    for name, result in node_clients(base_url, api_key, request).items():
        assert result["raised"] and result["status"] == status, (name, result)
        shown[name] = result["message"]
    assert set(shown) == {"openai-python", "langchain-openai", "litellm"} | NODE_SDKS
    return shown


def every_sdk_shows(
    base_url: str, api_key: str, request: dict[str, Any], status: int, *texts: str
) -> None:
    for name, text in shown_by_every_sdk(base_url, api_key, request, status).items():
        for expected in texts:
            assert expected in text, (name, text)


def test_a_validation_error_shows_its_field_and_reason_in_every_sdk(mpcapi: Daemon) -> None:
    # langchain sends the temperature as 5.0
    every_sdk_shows(
        mpcapi.api_base, "unused", TOO_HOT, 400, "temperature: 5", "greater than the maximum of 2"
    )


def test_the_seed_shape_loses_the_reason_in_sdks(start_mpcapi: Callable[..., Daemon]) -> None:
    """Why the default changed: against the flat shape every SDK but litellm shows only the
    status (``Error code: 400``, ``400 "Bad Request"``)."""
    daemon = start_mpcapi(MPCAPI_ERROR_FORMAT="seed")
    shown = shown_by_every_sdk(daemon.api_base, "unused", TOO_HOT, 400)
    lost = {name for name, text in shown.items() if "greater than the maximum" not in text}
    assert lost == {"openai-python", "langchain-openai"} | NODE_SDKS, shown


def test_the_python_sdk_reads_type_param_and_code(mpcapi: Daemon) -> None:
    error = python_errors(mpcapi.api_base, "unused", TOO_HOT)["openai-python"]
    assert isinstance(error, openai.BadRequestError)
    assert (error.type, error.param, error.code) == (
        "invalid_request_error",
        "temperature",
        "bad_request",
    )
    assert error.message == f"Error code: 400 - {TOO_HOT_REASON}"
    assert isinstance(error.body, dict) and error.body["message"] == TOO_HOT_REASON


def test_the_node_sdk_reads_type_and_param(mpcapi: Daemon) -> None:
    result = node_clients(mpcapi.api_base, "unused", TOO_HOT)["openai-node"]
    assert (result["type"], result["param"], result["code"]) == (
        "invalid_request_error",
        "temperature",
        "bad_request",
    )


def test_a_wrong_client_key_is_an_authentication_error_in_every_sdk(
    start_mpcapi: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start_mpcapi(MPCAPI_AUTH="keys", MPCAPI_DATABASE_URL=f"sqlite:///{tmp_path}/k.db")
    every_sdk_shows(daemon.api_base, "sk-not-a-key", TOO_HOT, 401, "invalid client key")
    with (
        openai.OpenAI(base_url=daemon.api_base, api_key="sk-no", max_retries=0) as client,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        client.models.list()
    assert caught.value.code == "invalid_api_key"
    assert caught.value.type == "authentication_error"


def test_a_rate_limit_of_ours_is_a_rate_limit_error(start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start_mpcapi(MPCAPI_DEFAULT_RPM="1")
    with openai.OpenAI(base_url=daemon.api_base, api_key="unused", max_retries=0) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert caught.value.code == "rate_limit_exceeded"
    assert "rate limit of 1 requests per minute reached" in str(caught.value)
    assert caught.value.response.headers["retry-after"]


def test_the_seed_format_restores_the_flat_shape(start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start_mpcapi(MPCAPI_ERROR_FORMAT="seed")
    request = urllib.request.Request(
        daemon.api_base + "/chat/completions",
        data=json.dumps(TOO_HOT).encode(),
        headers={"content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    document = json.loads(caught.value.read())
    assert document["error"] == "Bad Request"
    assert document["message"] == TOO_HOT_REASON
    assert document["details"] == [{"field": "temperature", "message": TOO_HOT_REASON[13:]}]
