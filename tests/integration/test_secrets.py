"""No secret in anything MPC-API writes. Daemons in production mode (JSON log lines; one with
two workers) with client keys made by ``mpcapi-admin``, an admin key, LiteLLM's master key, a
Redis and a PostgreSQL URL with passwords; traffic with good and bad keys, errors of every
kind and a WebSocket; a daemon with a wrong LiteLLM key and a wrong Redis password; a start
that fails on its database. Then every secret used is looked for in everything the daemons
and ``mpcapi-admin`` wrote: stdout, stderr and every file of their working directories."""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from mpcapi.storage.keys import hash_key
from tests.support.databases import postgres_schema
from tests.support.ports import closed_port, free_port
from tests.support.redisserver import REDIS_SERVER, RedisServer

from .harness import HELLO, MOCK_TEXT, Daemon, DaemonLauncher, LiteLLM
from .test_keys import admin

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")


def secret(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def with_password(url: str, password: str) -> str:
    """``postgresql://postgres@…`` with a password (the test server trusts local users, so it
    never asks for it: the connection works and the password is one more secret to hide)."""
    assert url.startswith("postgresql://postgres@")
    return url.replace("postgres@", f"postgres:{password}@", 1)


def call(
    url: str, authorization: str | None = None, body: bytes | None = None
) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if authorization is not None:
        headers["Authorization"] = authorization
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def sdk(daemon: Daemon, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.api_base, api_key=key, max_retries=0, timeout=30)


def status_of_chat(daemon: Daemon, key: str, model: str = "gpt-4o-mini", **extra: Any) -> int:
    try:
        sdk(daemon, key).chat.completions.create(model=model, messages=HELLO, **extra)
    except openai.APIStatusError as error:
        return error.status_code
    return 200


def websocket_chat(daemon: Daemon, key: str) -> str:
    url = daemon.url.replace("http://", "ws://", 1) + "/api/ws"
    headers = {"Authorization": f"Bearer {key}"}
    with connect(url, open_timeout=30, additional_headers=headers) as socket:
        body = {"model": "gpt-4o-mini", "messages": HELLO}
        socket.send(json.dumps({"id": "1", "type": "chat.completions", "body": body}))
        text = ""
        while True:
            message = json.loads(socket.recv(timeout=30))
            if message["type"] != "chunk":
                assert message["type"] == "done", message
                return text
            for choice in message["data"]["choices"]:
                text += choice["delta"].get("content") or ""


def written_by(launcher: DaemonLauncher) -> dict[str, str]:
    """Every file in the daemons' working directories (their stdout and stderr included)."""
    return {
        str(path.relative_to(launcher.root)): path.read_bytes().decode("utf-8", "replace")
        for path in sorted(launcher.root.rglob("*"))
        if path.is_file()
    }


def test_no_secret_is_ever_written(
    litellm: LiteLLM, mpcapi_launcher: DaemonLauncher, tmp_path: Path
) -> None:
    admin_key = secret("admin-")
    redis_password = secret("redispw")
    database_password = secret("pgpw")
    wrong_litellm_key = secret("sk-wrong-litellm-")
    wrong_redis_password = secret("wrongredispw")
    bad_client_keys = ["sk-mpc-" + secrets.token_urlsafe(32), secret("sk-not-ours-")]
    in_a_query = secret("sk-in-query-")
    admin_output: list[str] = []  # everything mpcapi-admin wrote, but the key it creates

    redis = RedisServer(free_port(), password=redis_password)
    redis.start()
    try:
        with postgres_schema() as schema_url:
            database_url = with_password(schema_url, database_password)

            # Client keys from the command line: the key is printed once, on stdout.
            created: dict[str, str] = {}
            for user, limits in (("alice", ("--rpm", "1000")), ("bob", ("--budget", "0"))):
                done = admin(database_url, "keys", "create", "--user", user, *limits)
                assert done.returncode == 0, done.stderr
                summary, created[user] = done.stdout.splitlines()
                assert summary.startswith("created key_")
                admin_output += [summary, done.stderr]
            for args in (("keys", "list"), ("usage", "--json"), ("usage", "--group-by", "key")):
                done = admin(database_url, *args)
                assert done.returncode == 0, done.stderr
                admin_output += [done.stdout, done.stderr]
            with closed_port() as port:  # a database that is not there: one error line
                unreachable = database_url.replace(":5432/", f":{port}/", 1)
                done = admin(unreachable, "keys", "list")
            assert done.returncode == 1 and "database error" in done.stderr
            admin_output += [done.stdout, done.stderr]
            alice, bob = created["alice"], created["bob"]

            daemon = mpcapi_launcher.start(
                MPCAPI_ENV="production",
                MPCAPI_WORKERS="2",
                MPCAPI_AUTH="keys",
                MPCAPI_ADMIN_KEY=admin_key,
                MPCAPI_DATABASE_URL=database_url,
                MPCAPI_REDIS_URL=redis.url,
                MPCAPI_DEFAULT_RPM="1000",
                MPCAPI_CACHE_TTL="60",
            )
            api = daemon.api_base

            # What works: chat twice (the second from the cache), a stream, models with a
            # key in the query string too, embeddings, the WebSocket, the admin surfaces.
            assert status_of_chat(daemon, alice) == status_of_chat(daemon, alice) == 200
            streamed = sdk(daemon, alice).chat.completions.create(
                model="gpt-4o-mini", messages=HELLO, stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            assert call(f"{api}/models?api_key={in_a_query}", f"Bearer {alice}")[0] == 200
            assert sdk(daemon, alice).embeddings.create(model="text-embedding-3-small", input="x")
            assert websocket_chat(daemon, alice) == MOCK_TEXT
            for path in ("/api/usage", "/metrics", "/api/stats"):
                assert call(daemon.url + path, f"Bearer {admin_key}")[0] == 200, path

            # What fails: bad keys (as Bearer, bare, on the WebSocket, as the admin key), a
            # client key on an admin route, the budget, bad bodies, LiteLLM's own errors.
            for bad in bad_client_keys:
                assert status_of_chat(daemon, bad) == 401
                assert call(f"{api}/models", bad)[0] == 401
                assert call(daemon.url + "/api/usage", f"Bearer {bad}")[0] == 401
                with pytest.raises(InvalidStatus) as refused:
                    websocket_chat(daemon, bad)
                assert refused.value.response.status_code == 401
            assert call(daemon.url + "/metrics", f"Bearer {alice}")[0] == 401
            assert status_of_chat(daemon, bob) == 429
            chat_url = f"{api}/chat/completions"
            assert call(chat_url, f"Bearer {alice}", b'{"model": "gpt-4o-mini", "mess')[0] == 400
            assert status_of_chat(daemon, alice, temperature=5) == 400
            assert status_of_chat(daemon, alice, model="no-such-model") == 400
            assert status_of_chat(daemon, alice, model="mock-rate-limited") == 429
            assert status_of_chat(daemon, alice, model="gpt-4o") == 502  # LiteLLM's 500

            # A daemon with a LiteLLM key LiteLLM refuses and a wrong Redis password.
            misconfigured = mpcapi_launcher.start(
                MPCAPI_ENV="production",
                LITELLM_API_KEY=wrong_litellm_key,
                MPCAPI_REDIS_URL=f"redis://:{wrong_redis_password}@127.0.0.1:{redis.port}/0",
                MPCAPI_DEFAULT_RPM="1000",
                MPCAPI_CACHE_TTL="60",
                MPCAPI_DATABASE_URL=database_url,
            )
            assert status_of_chat(misconfigured, "unused") == 502
            misconfigured.wait_for_log("is unavailable", timeout=10)

            # A daemon that cannot reach its database stops with one line.
            with closed_port() as port:
                unreachable = database_url.replace(":5432/", f":{port}/", 1)
                failed = mpcapi_launcher.run(
                    MPCAPI_ENV="production", MPCAPI_AUTH="keys", MPCAPI_DATABASE_URL=unreachable
                )
            assert failed.returncode == 2, failed.stderr
            failed_output = failed.stdout + failed.stderr
    finally:
        mpcapi_launcher.stop_all()  # their last words are written too
        redis.stop()

    written = written_by(mpcapi_launcher)
    written["failed start"] = failed_output
    written["mpcapi-admin"] = "\n".join(admin_output)

    # The checks are not vacuous: the logs are JSON lines with the events we caused.
    log = daemon.log_text()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    statuses = {event.get("status") for event in events if event.get("path")}
    assert {200, 400, 401, 429, 502} <= statuses
    assert any(event.get("user") == "alice" for event in events)
    (config,) = {json.dumps(e["settings"]) for e in events if "settings" in e}  # both workers
    assert json.loads(config)["litellm_api_key"] == json.loads(config)["admin_key"] == "***"
    assert "is unavailable" in misconfigured.log_text()
    assert "database error" in failed_output

    for name, value in {
        "LiteLLM master key": litellm.key,
        "wrong LiteLLM key": wrong_litellm_key,
        "admin key": admin_key,
        "Redis password": redis_password,
        "wrong Redis password": wrong_redis_password,
        "database password": database_password,
        "key in a query string": in_a_query,
        **{f"client key of {user}": key for user, key in created.items()},
        **{f"client key of {user}, without its prefix": k[7:] for user, k in created.items()},
        **{f"hash of the key of {user}": hash_key(key) for user, key in created.items()},
        **{f"bad client key {n}": key for n, key in enumerate(bad_client_keys)},
    }.items():
        leaks = [where for where, text in written.items() if value in text]
        assert not leaks, f"the {name} is in {leaks}"
