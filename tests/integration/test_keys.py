"""Client keys for real: keys made with the installed ``mpcapi-admin`` (SQLite file and a
PostgreSQL schema of the test's own), used by the openai SDK and a WebSocket client against
``twistd -n mpcapi`` with ``MPCAPI_AUTH=keys`` in front of the real LiteLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from mpcapi.storage.keys import hash_key
from tests.support.databases import database_url

from .harness import HELLO, MOCK_TEXT, Daemon, DaemonLauncher, FakeUpstream

ADMIN = Path(sys.executable).parent / "mpcapi-admin"
REVOCATION_LIMIT = 5.0


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as url:
        yield url


def admin(url: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPCAPI_", "LITELLM_"))}
    env["MPCAPI_DATABASE_URL"] = url
    return subprocess.run(
        [str(ADMIN), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def create(url: str, *args: str) -> tuple[str, str]:
    """``keys create``: the new key's id and secret."""
    done = admin(url, "keys", "create", *args)
    assert done.returncode == 0, done.stderr
    first, secret = done.stdout.splitlines()
    return first.split()[1], secret


def client(daemon: Daemon, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.api_base, api_key=key, max_retries=0, timeout=20)


def chat(daemon: Daemon, key: str) -> str | None:
    answer = client(daemon, key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    return answer.choices[0].message.content


def status_of(url: str, key: str | None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_keys_from_the_cli_work_over_http_until_revoked(
    db_url: str, start_mpcapi: Callable[..., Daemon], tmp_path: Path
) -> None:
    key_id, secret = create(db_url, "--user", "alice", "--rpm", "600")
    # JSON log lines: every field of the request event is there.
    daemon = start_mpcapi(MPCAPI_AUTH="keys", MPCAPI_DATABASE_URL=db_url, MPCAPI_ENV="production")

    # The SDK with the key: chat, streaming, models, embeddings.
    sdk = client(daemon, secret)
    assert chat(daemon, secret) == MOCK_TEXT
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in sdk.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
        if chunk.choices
    )
    assert streamed == MOCK_TEXT
    assert "gpt-4o-mini" in [model.id for model in sdk.models.list()]
    assert sdk.embeddings.create(model="text-embedding-3-small", input="hi").data

    # Without a key, or with a wrong one: 401 in our error shape.
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(daemon, "sk-mpc-" + "x" * 43)
    assert refused.value.status_code == 401
    document = refused.value.response.json()
    assert document["error"]["code"] == "invalid_api_key"
    assert document["message"] == "invalid client key"
    code, headers, raw = status_of(daemon.api_base + "/models", None)
    assert code == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert set(json.loads(raw)) == {"error", "message", "request_id"}
    assert status_of(daemon.url + "/health", None)[0] == 200

    # A key made while the daemon runs works at once.
    second_id, second = create(db_url, "--user", "bob", "--tpm", "5000", "--budget", "2.5")
    assert chat(daemon, second) == MOCK_TEXT

    # keys list: one line per key, the id first, never the secret or its hash.
    listed = admin(db_url, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [key_id, second_id]
    assert "user=alice" in lines[0] and "rpm=600" in lines[0] and " active " in lines[0]
    assert "budget_usd=2.5" in lines[1] and "tpm=5000" in lines[1] and " active " in lines[1]
    for text in (secret, second, hash_key(secret), hash_key(second)):
        assert text not in listed.stdout + listed.stderr

    # Revoked: refused within 5 seconds, without a restart.
    revoked = admin(db_url, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    revoked_at = time.monotonic()
    while True:
        code, _, raw = status_of(daemon.api_base + "/models", secret)
        if code == 401:
            break
        assert code == 200
        assert time.monotonic() - revoked_at < REVOCATION_LIMIT, "revoked key still accepted"
        time.sleep(0.1)
    assert "revoked" in json.loads(raw)["message"]
    assert chat(daemon, second) == MOCK_TEXT  # the other key is untouched
    assert " revoked " in admin(db_url, "keys", "list").stdout.splitlines()[0]

    unknown = admin(db_url, "keys", "revoke", "key_nothere")
    assert unknown.returncode == 1
    assert "no key with id 'key_nothere'" in unknown.stderr

    # The log names the keys by id, never by secret or hash.
    log = daemon.wait_for_log(f'"key_id": "{second_id}"')
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    by_key = {(e.get("key_id"), e.get("user")) for e in events if e.get("path")}
    assert {(key_id, "alice"), (second_id, "bob"), (None, None)} <= by_key
    for text in (secret, second, hash_key(secret), hash_key(second), secret[7:]):
        assert text not in log


def test_client_keys_never_reach_litellm(
    tmp_path: Path, start_mpcapi: Callable[..., Daemon], fake_upstream: FakeUpstream
) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    _, secret = create(url, "--user", "carol")
    fake_upstream.answer(200, {"object": "list", "data": []})
    for litellm_key in (None, "sk-litellm-ours"):
        fake_upstream.requests.clear()
        daemon = start_mpcapi(
            MPCAPI_AUTH="keys",
            MPCAPI_DATABASE_URL=url,
            LITELLM_BASE_URL=fake_upstream.url,
            LITELLM_API_KEY=litellm_key,
        )
        assert status_of(daemon.api_base + "/models", secret)[0] == 200
        (seen,) = fake_upstream.requests
        expected = None if litellm_key is None else f"Bearer {litellm_key}"
        assert seen.headers.get("authorization") == expected
        assert secret not in json.dumps(seen.headers)


def test_websocket_needs_a_key(tmp_path: Path, start_mpcapi: Callable[..., Daemon]) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    _, secret = create(url, "--user", "dora")
    daemon = start_mpcapi(MPCAPI_AUTH="keys", MPCAPI_DATABASE_URL=url)
    ws_url = daemon.url.replace("http://", "ws://") + "/api/ws"
    with pytest.raises(InvalidStatus) as refused, connect(ws_url, open_timeout=10):
        pass
    assert refused.value.response.status_code == 401
    headers = {"Authorization": f"Bearer {secret}"}
    with connect(ws_url, open_timeout=10, additional_headers=headers) as socket:
        body = {"model": "gpt-4o-mini", "messages": HELLO}
        socket.send(json.dumps({"id": "1", "type": "chat.completions", "body": body}))
        text = ""
        while True:
            message = json.loads(socket.recv(timeout=20))
            assert message["type"] in ("chunk", "done"), message
            if message["type"] == "done":
                break
            for choice in message["data"]["choices"]:
                text += choice["delta"].get("content") or ""
    assert text == MOCK_TEXT


def test_unusable_database_stops_start_up_with_one_line(
    tmp_path: Path, mpcapi_launcher: DaemonLauncher
) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "keys.db"
    done = mpcapi_launcher.run(MPCAPI_AUTH="keys", MPCAPI_DATABASE_URL=f"sqlite:///{missing}")
    assert done.returncode == 2
    assert done.stderr.startswith("mpcapi: database error: MPCAPI_DATABASE_URL: ")
    assert done.stderr.count("\n") == 1


def test_admin_bad_configuration_is_exit_2(tmp_path: Path) -> None:
    done = admin("mysql://nope", "keys", "list", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == (
        "mpcapi-admin: configuration error: MPCAPI_DATABASE_URL: 'mysql://nope' must start "
        "with sqlite:/// or postgresql://\n"
    )
