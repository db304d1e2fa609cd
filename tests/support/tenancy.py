"""Tenancy in unit tests: a gateway with client keys, the usage ledger and the admin API over
a real database (SQLite file or PostgreSQL schema) queried synchronously, on a ``task.Clock``
that starts at a real date, so that expiry and budget periods can be driven by the test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock

from mpcapi.ledger.ledger import FLUSH_EVERY, UsageLedger
from mpcapi.ledger.prices import PriceTable
from mpcapi.policy.keys import KeyAuthenticator
from mpcapi.storage.database import SyncDatabase
from tests.support.gateway import Harness, make_harness

ADMIN = "admin-secret"
START = 1796292000.0  # 2026-12-03T10:00:00Z, a Thursday


class SyncDb:
    """A real database, run synchronously in the reactor's thread (deterministic steps)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sync = SyncDatabase(url)
        self.sync.migrate()

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.sync.run(fn, *args, **kwargs)

    def close(self) -> None:
        self.sync.close()


def in_thread(fn: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(fn, *args)


@attrs.define
class Tenancy:
    """A gateway with keys, ledger and admin API; ``admin``/``client`` send JSON."""

    harness: Harness
    ledger: UsageLedger
    db: SyncDb

    @property
    def clock(self) -> Clock:
        return self.harness.clock

    async def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = ADMIN,
        raw: bytes | None = None,
    ) -> tuple[int, Any, Any]:
        """(status, JSON body or None, headers) of one request."""
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        response = await self.harness.client.request(
            method, f"http://mpcapi.test{path}", data=data, headers=headers
        )
        content = await response.content()
        return response.code, (json.loads(content) if content else None), response.headers

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, document, _ = await self.send(method, path, body)
        return status, document

    async def chat(self, secret: str, model: str = "gpt-4o-mini") -> tuple[int, Any, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}]}
        return await self.send("POST", "/api/chat/completions", body, token=secret)

    async def store(self) -> None:
        """Let the ledger's flusher run once."""
        self.clock.advance(FLUSH_EVERY)
        self.harness.flush()

    def close(self) -> None:
        self.db.close()


def tenancy_harness(url: str, tmp_path: Path, **settings: Any) -> Tenancy:
    db = SyncDb(url)
    clock = Clock()
    clock.advance(START)
    ledger = UsageLedger(
        db,  # type: ignore[arg-type]
        clock,
        PriceTable.load(),
        str(tmp_path / "spool.jsonl"),
        in_thread,
    )
    ledger.startService()
    keys = KeyAuthenticator(db, clock)  # type: ignore[arg-type]
    harness = make_harness(
        clock=clock, keys=keys, ledger=ledger, **{"auth": "keys", "admin_key": ADMIN, **settings}
    )
    return Tenancy(harness, ledger, db)
