"""Client keys in tests: a stand-in authenticator, key rows, and calls that wait for the
database's thread."""

from __future__ import annotations

import json
import time
from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from mpcapi.policy.keys import bearer_token, unauthorized
from mpcapi.storage.database import Database
from mpcapi.storage.keys import ClientKey, create_key
from tests.support.gateway import CHAT, Harness, make_harness

BODIES = {
    "/chat/completions": CHAT,
    "/completions": {"model": "gpt-4o-mini", "prompt": "Hi"},
    "/embeddings": {"model": "text-embedding-3-small", "input": "Hi"},
}


class FakeKeys:
    """Stands in for ``KeyAuthenticator``: the bearer token is the key id; a missing or
    unknown one is refused with the real 401s."""

    def __init__(self, keys: dict[str, ClientKey], database: Database | None = None) -> None:
        self.keys = keys
        self.database = database  # where owners of stored objects go (None: not kept)

    async def authenticate(self, authorization: bytes | str | None) -> ClientKey:
        key = self.keys.get(bearer_token(authorization))
        if key is None:
            raise unauthorized("invalid client key")
        return key


def client_key(key_id: str, user: str, rpm: int | None = None, tpm: int | None = None) -> ClientKey:
    return ClientKey(
        id=key_id,
        key_hash="x",
        user=user,
        rpm=rpm,
        tpm=tpm,
        budget_usd=None,
        created_at="2026-11-27T00:00:00Z",
    )


def keyed_harness(
    keys: dict[str, ClientKey], database: Database | None = None, **overrides: Any
) -> Harness:
    """``make_harness`` with client keys on (the auth part faked); with ``database``, the
    owners of stored objects are kept there."""
    return make_harness(keys=FakeKeys(keys, database), **{"auth": "keys", **overrides})


def bearer(token: str) -> dict[str, Any]:
    return {"headers": {"Authorization": f"Bearer {token}"}}


def database_of(harness: Harness) -> Database:
    assert harness.keys is not None
    return harness.keys.database


async def settle(harness: Harness, d: defer.Deferred[Any], timeout: float = 10.0) -> Any:
    """Wait for ``d`` while the database's thread works: pump StubTreq, let the reactor run."""
    deadline = time.monotonic() + timeout
    done: list[bool] = []

    def mark(result: Any) -> Any:
        done.append(True)
        return result

    d.addBoth(mark)
    while not done:
        harness.flush()
        if done:
            break
        assert time.monotonic() < deadline, "no answer"
        await deferLater(reactor, 0.002, lambda: None)
    return await d


async def call(harness: Harness, method: str, path: str, authorization: str | None = None) -> Any:
    headers = {} if authorization is None else {"Authorization": authorization}
    url = f"http://mpcapi.test{path}"
    if method == "GET":
        d = harness.client.get(url, headers=headers)
    else:
        suffix = path.split("/", 2)[2]
        body = json.dumps(BODIES["/" + suffix]).encode()
        d = harness.client.post(url, data=body, headers=headers)
    response = await settle(harness, d)
    return Answer(response.code, response.headers, await settle(harness, response.content()))


@attrs.frozen
class Answer:
    """A response read whole (its body may arrive after the database's thread answered)."""

    code: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def new_key(harness: Harness, user: str = "alice", **limits: Any) -> tuple[ClientKey, str]:
    key, secret = await database_of(harness).run(create_key, user, **limits)
    return key, secret
