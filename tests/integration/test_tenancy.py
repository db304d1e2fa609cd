"""Tenancy for real (#16): the admin HTTP API of ``twistd -n mpcapi`` over a SQLite file and a
PostgreSQL schema of the test's own, in front of the real LiteLLM, driven with the openai SDK
and urllib; two daemons on one database; ``mpcapi-admin`` and the API on the same keys."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from mpcapi.policy.keys import USABLE_FOR
from tests.support.databases import database_url

from .harness import HELLO, MOCK_TEXT, Daemon
from .test_keys import admin as run_admin

ADMIN_KEY = "admin-integration-secret"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as url:
        yield url


def send(
    daemon: Daemon, method: str, path: str, body: Any = None, token: str | None = ADMIN_KEY
) -> tuple[int, dict[str, str], Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(daemon.url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read() or b"null")


def sdk(daemon: Daemon, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.api_base, api_key=secret, max_retries=0, timeout=20)


def chat(daemon: Daemon, secret: str, model: str = "gpt-4o-mini") -> str | None:
    answer = sdk(daemon, secret).chat.completions.create(model=model, messages=HELLO)
    return answer.choices[0].message.content


def start(start_mpcapi: Callable[..., Daemon], url: str) -> Daemon:
    return start_mpcapi(MPCAPI_AUTH="keys", MPCAPI_DATABASE_URL=url, MPCAPI_ADMIN_KEY=ADMIN_KEY)


def test_keys_and_teams_over_http_with_the_sdk(
    db_url: str, start_mpcapi: Callable[..., Daemon]
) -> None:
    daemon = start(start_mpcapi, db_url)
    status, _, team = send(
        daemon, "POST", "/admin/teams", {"name": "research", "models": ["gpt-4o-mini", "gpt-4o"]}
    )
    assert status == 201, team
    status, _, key = send(
        daemon,
        "POST",
        "/admin/keys",
        {"user": "alice", "team_id": team["id"], "models": ["gpt-4o-mini", "claude-sonnet"]},
    )
    assert status == 201, key
    secret = key["secret"]
    assert chat(daemon, secret) == MOCK_TEXT

    # GET /models lists only what both lists allow.
    assert [model.id for model in sdk(daemon, secret).models.list()] == ["gpt-4o-mini"]

    # A model outside the key's list, or the team's: 403 the SDK reads.
    for model, whose in (("gpt-4o", key["id"]), ("claude-sonnet", team["id"])):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            chat(daemon, secret, model)
        document = refused.value.response.json()
        assert document["error"]["code"] == "model_not_allowed"
        assert whose in document["message"]

    # Streams are checked too.
    with pytest.raises(openai.PermissionDeniedError):
        sdk(daemon, secret).chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)

    # Duplicate alias: 409; unknown id: 404; bad field: 400 naming it.
    assert send(daemon, "PATCH", f"/admin/keys/{key['id']}", {"alias": "a1"})[0] == 200
    status, _, document = send(daemon, "POST", "/admin/keys", {"user": "bob", "alias": "a1"})
    assert status == 409 and document["error"]["param"] == "alias"
    assert send(daemon, "GET", "/admin/keys/key_nothere")[0] == 404
    status, _, document = send(daemon, "POST", "/admin/keys", {"user": "bob", "rpm": "lots"})
    assert status == 400 and document["error"]["param"] == "rpm"
    assert send(daemon, "GET", "/admin/keys", token=None)[0] == 401

    # Revoked through the API: refused at once by this daemon.
    status, _, revoked = send(daemon, "DELETE", f"/admin/keys/{key['id']}")
    assert status == 200 and revoked["state"] == "revoked"
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(daemon, secret)
    assert "revoked" in refused.value.response.json()["message"]


def test_expiry_and_rotation_for_real(db_url: str, start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start(start_mpcapi, db_url)
    status, _, key = send(daemon, "POST", "/admin/keys", {"user": "eve", "expires_in": 2})
    assert status == 201
    assert chat(daemon, key["secret"]) == MOCK_TEXT
    time.sleep(2.2)
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(daemon, key["secret"])
    document = refused.value.response.json()
    assert document["error"]["code"] == "key_expired" and "expired at" in document["message"]

    status, _, other = send(daemon, "POST", "/admin/keys", {"user": "fred"})
    status, _, rotated = send(
        daemon, "POST", f"/admin/keys/{other['id']}/rotate", {"grace_seconds": 3}
    )
    assert status == 200
    assert chat(daemon, other["secret"]) == MOCK_TEXT  # the old one, within its grace
    assert chat(daemon, rotated["secret"]) == MOCK_TEXT
    time.sleep(3.2)
    with pytest.raises(openai.AuthenticationError):
        chat(daemon, other["secret"])
    assert chat(daemon, rotated["secret"]) == MOCK_TEXT


def test_two_daemons_on_one_database_see_a_revocation_within_the_delay(
    db_url: str, start_mpcapi: Callable[..., Daemon]
) -> None:
    first = start(start_mpcapi, db_url)
    second = start(start_mpcapi, db_url)
    status, _, key = send(first, "POST", "/admin/keys", {"user": "gus"})
    assert status == 201
    secret = key["secret"]
    # Made on the first, used at once on the second (unknown keys are asked for again).
    assert chat(second, secret) == MOCK_TEXT
    assert chat(first, secret) == MOCK_TEXT
    status, _, _ = send(first, "DELETE", f"/admin/keys/{key['id']}")
    assert status == 200
    revoked_at = time.monotonic()
    with pytest.raises(openai.AuthenticationError):
        chat(first, secret)  # the daemon that revoked it: at once
    while True:
        try:
            chat(second, secret)
        except openai.AuthenticationError as error:
            assert "revoked" in error.response.json()["message"]
            break
        # Documented: within USABLE_FOR seconds (plus one query).
        assert time.monotonic() - revoked_at < USABLE_FOR + 1.0, "still accepted"
        time.sleep(0.1)
    # And a team change made on the second reaches the first within the same delay.
    status, _, team = send(second, "POST", "/admin/teams", {"name": "t"})
    status, _, other = send(second, "POST", "/admin/keys", {"user": "h", "team_id": team["id"]})
    assert chat(first, other["secret"]) == MOCK_TEXT
    send(second, "PATCH", f"/admin/teams/{team['id']}", {"models": ["gpt-4o"]})
    changed_at = time.monotonic()
    while True:
        try:
            chat(first, other["secret"])
        except openai.PermissionDeniedError:
            break
        assert time.monotonic() - changed_at < USABLE_FOR + 1.0, "team change not seen"
        time.sleep(0.1)


def test_the_cli_and_the_daemon_agree(db_url: str, start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start(start_mpcapi, db_url)
    made = run_admin(db_url, "teams", "create", "--name", "cli", "--budget", "0.000001",
                     "--budget-period", "month", "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    team = json.loads(made.stdout)
    made = run_admin(db_url, "keys", "create", "--user", "ida", "--team", team["id"],
                     "--expires-in", "30d", "--models", "gpt-4o-mini")  # fmt: skip
    assert made.returncode == 0, made.stderr
    first, secret = made.stdout.splitlines()
    key_id = first.split()[1]
    # The CLI's `show` and the API's GET are the same document.
    shown = run_admin(db_url, "keys", "show", key_id)
    assert shown.returncode == 0, shown.stderr
    status, _, by_api = send(daemon, "GET", f"/admin/keys/{key_id}")
    assert status == 200 and json.loads(shown.stdout) == by_api
    assert by_api["team_id"] == team["id"] and by_api["expires_at"] > by_api["created_at"]
    # The team's tiny monthly budget: spent after one answer with a cost.
    assert chat(daemon, secret) == MOCK_TEXT
    deadline = time.monotonic() + 10
    while True:
        try:
            chat(daemon, secret)
        except openai.RateLimitError as error:
            document = error.response.json()
            assert document["error"]["code"] == "insufficient_quota"
            assert f"team {team['id']} (cli)" in document["message"]
            assert "resets at" in document["message"] and "monthly" in document["message"]
            assert int(error.response.headers["retry-after"]) > 0
            break
        assert time.monotonic() < deadline, "the team's budget never ran out"
        time.sleep(0.5)
    status, _, by_api = send(daemon, "GET", f"/admin/teams/{team['id']}")
    assert by_api["spend_usd"] > 0 and by_api["budget_resets_at"].endswith("-01T00:00:00.000Z")
    # Revoked by the CLI: refused within the documented delay.
    assert run_admin(db_url, "keys", "revoke", key_id).returncode == 0
    revoked_at = time.monotonic()
    while True:
        try:
            chat(daemon, secret)
        except openai.AuthenticationError:
            break
        except openai.RateLimitError:
            pass
        assert time.monotonic() - revoked_at < USABLE_FOR + 1.0
        time.sleep(0.1)
