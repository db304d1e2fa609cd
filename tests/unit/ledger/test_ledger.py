"""The usage ledger (mpcapi.ledger): costs, the hidden usage chunk, budgets, GET /api/usage,
batching and the spool file. The gateway runs through StubTreq on a task.Clock; the ledger's
database is a real SQLite file or PostgreSQL schema, queried synchronously (``SyncDb``) so
that every step is deterministic; ``SyncDb.down`` makes it fail like an unreachable one."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mpcapi.admin import main as admin_main
from mpcapi.exchange import Exchange
from mpcapi.ledger.bodies import REDACTED
from mpcapi.ledger.ledger import FLUSH_EVERY, UsageLedger
from mpcapi.ledger.prices import PriceTable, cost_of
from mpcapi.ledger.spool import append_lines, read_lines
from mpcapi.policy.keys import KeyAuthenticator
from mpcapi.storage.database import SyncDatabase
from mpcapi.storage.keys import ClientKey, create_key
from mpcapi.storage.usagerows import STATEMENT_SIZES, insert_rows
from tests.support.databases import database_url
from tests.support.exchanges import exchange
from tests.support.gateway import CHAT, COMPLETION, Harness, answer, json_body, make_harness
from tests.support.reactor import sleep

REPO = Path(__file__).resolve().parents[3]
ADMIN = "admin-secret"
PRICES = PriceTable.load()
MOCK_USAGE = {"prompt_tokens": 8, "completion_tokens": 9, "total_tokens": 17, "cost": 6.6e-06}


class SyncDb:
    """A real database run synchronously; ``down`` makes every call fail."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sync = SyncDatabase(url)
        self.sync.migrate()
        self.down = False
        self.calls = 0

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.down:
            raise OSError("connection refused (the test's outage)")
        return self.sync.run(fn, *args, **kwargs)

    def rows(self, where: str = "", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        def select(cursor: Any) -> list[tuple[Any, ...]]:
            return cursor.execute(
                'SELECT request_id, key_id, "user", route, model, status, prompt_tokens, '
                "completion_tokens, cost_usd, cost_source, outcome, cache, request_body, "
                f"response_body, ttfb_ms, client FROM usage {where} ORDER BY created_at",
                params,
            ).fetchall()

        names = [
            "request_id",
            "key_id",
            "user",
            "route",
            "model",
            "status",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
            "cost_source",
            "outcome",
            "cache",
            "request_body",
            "response_body",
            "ttfb_ms",
            "client",
        ]
        return [dict(zip(names, row, strict=True)) for row in self.sync.run(select)]

    def close(self) -> None:
        self.sync.close()


def in_thread(fn: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(fn, *args)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SyncDb]:
    with database_url(request.param, tmp_path) as url:
        database = SyncDb(url)
        yield database
        database.close()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[SyncDb]:
    with database_url("sqlite", tmp_path) as url:
        database = SyncDb(url)
        yield database
        database.close()


def texts(events: list[LogEvent], namespace: str = "mpcapi.ledger") -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == namespace]


class Recording(Resource):
    """Passes requests to the gateway and keeps them (to play a client that leaves)."""

    isLeaf = True

    def __init__(self, wrapped: Any) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.requests: list[Request] = []

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        return self.wrapped.render(request)


@attrs.define
class Ledgered:
    harness: Harness
    ledger: UsageLedger
    db: SyncDb
    recording: Recording

    async def store(self) -> None:
        """Let the flusher run once."""
        self.harness.clock.advance(FLUSH_EVERY)
        self.harness.flush()


def ledgered(db: SyncDb, tmp_path: Path, keys: bool = False, **settings: Any) -> Ledgered:
    ledger, clock = bare_ledger(db, tmp_path)
    authenticator = KeyAuthenticator(db, clock) if keys else None  # type: ignore[arg-type]
    harness = make_harness(
        clock=clock, keys=authenticator, ledger=ledger, **{"admin_key": ADMIN, **settings}
    )
    recording = Recording(harness.gateway.resource())
    harness.client = StubTreq(recording)
    harness.clock.advance(1000)  # not at 0: times are measured from here
    return Ledgered(harness, ledger, db, recording)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


# --- cost ---------------------------------------------------------------------------------------


def test_cost_from_litellm_price_table_or_unknown() -> None:
    used = {"prompt_tokens": 1000, "completion_tokens": 2000}
    assert cost_of(exchange(**{**used, "model": "gpt-4o-mini", "cost_usd": 0.0042}), PRICES) == (
        0.0042,
        "litellm",
        1000,
        2000,
    )
    cost, source, _, _ = cost_of(
        exchange(**{**used, "model": "gpt-4o-mini", "cost_usd": None}), PRICES
    )
    assert (source, cost) == ("price_table", pytest.approx(1000 * 0.15e-6 + 2000 * 0.6e-6))
    cost, source, _, _ = cost_of(exchange(**{**used, "model": "claude-sonnet-4-20250514"}), PRICES)
    assert (source, cost) == ("price_table", pytest.approx(1000 * 3e-6 + 2000 * 15e-6))
    assert cost_of(exchange(**{**used, "model": "my-own-llama"}), PRICES) == (
        0.0,
        "unknown_model",
        1000,
        2000,
    )
    assert cost_of(exchange(**{**used, "model": "gpt-4o", "cache": "hit"}), PRICES)[:2] == (
        0.0,
        "cache",
    )
    assert cost_of(exchange(**{"model": "gpt-4o", "status": 400}), PRICES) == (0.0, "none", 0, 0)
    # A stream that ended before its usage chunk: completion tokens = text chunks received.
    cost, source, prompt, completion = cost_of(
        exchange(**{"model": "gpt-4o", "content_deltas": 4}), PRICES
    )
    assert (source, prompt, completion, cost) == ("deltas_price_table", 0, 4, pytest.approx(4e-5))
    assert (
        cost_of(exchange(**{"model": "x", "content_deltas": 4}), PRICES)[1]
        == "deltas_unknown_model"
    )


def test_price_table_names_and_files(tmp_path: Path) -> None:
    assert PRICES.lookup("openai/gpt-4o-mini") == PRICES.prices["gpt-4o-mini"]
    assert PRICES.lookup("gpt-4o-2024-08-06") == PRICES.prices["gpt-4o"]
    assert PRICES.lookup("gpt-4o-mini-2024-07-18") == PRICES.prices["gpt-4o-mini"]
    assert PRICES.lookup("gpt-4.1-mini") == PRICES.prices["gpt-4.1-mini"]
    assert PRICES.lookup("gpt-4") is None and PRICES.lookup(None) is None
    for model in ("gpt-4.1", "o3-mini", "text-embedding-3-large", "claude-3-5-haiku"):
        assert PRICES.lookup(model) is not None, model
    assert PRICES.lookup("claude-opus-4-20250514") == PRICES.prices["claude-opus-4"]
    # The packaged copy is etc/prices.toml.
    shipped = (REPO / "mpcapi" / "data" / "prices.toml").read_text()
    assert shipped == (REPO / "etc" / "prices.toml").read_text()
    own = tmp_path / "prices.toml"
    own.write_text('[models."mine"]\ninput = 1\noutput = 2\n')
    assert PriceTable.load(str(own)).prices == {"mine": PRICES.prices["gpt-4o"].__class__(1, 2)}
    own.write_text('[models."mine"]\ninput = "cheap"\n')
    with pytest.raises(ValueError, match="mine"):
        PriceTable.load(str(own))
    with pytest.raises(ValueError, match="cannot read"):
        PriceTable.load(str(tmp_path / "missing.toml"))


# --- rows of real traffic -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rows_and_totals_after_known_traffic(db: SyncDb, tmp_path: Path) -> None:
    setup = ledgered(db, tmp_path)
    harness = setup.harness
    harness.fake.routes[("POST", "/chat/completions")] = answer(
        200, COMPLETION, {"x-litellm-response-cost": "0.00042"}
    )
    harness.fake.routes[("POST", "/embeddings")] = answer(
        200, {"object": "list", "data": [], "usage": {"prompt_tokens": 1000, "total_tokens": 1000}}
    )
    for _ in range(2):
        assert (await harness.post("/api/chat/completions", CHAT)).code == 200
    embedding = {"model": "text-embedding-3-small", "input": "Hi"}
    assert (await harness.post("/v1/embeddings", embedding)).code == 200
    assert (await harness.post("/api/chat/completions", {**CHAT, "temperature": 5})).code == 400
    assert setup.db.rows() == []  # nothing written on the request's path
    await setup.store()
    rows = setup.db.rows()
    rows.sort(key=lambda r: (r["route"], -r["status"]))
    assert [(r["route"], r["status"], r["cost_source"]) for r in rows] == [
        ("/chat/completions", 400, "none"),
        ("/chat/completions", 200, "litellm"),
        ("/chat/completions", 200, "litellm"),
        ("/embeddings", 200, "price_table"),
    ]
    assert rows[1]["cost_usd"] == pytest.approx(0.00042)
    assert (rows[1]["prompt_tokens"], rows[1]["completion_tokens"]) == (3, 1)
    assert rows[3]["cost_usd"] == pytest.approx(1000 * 0.02e-6)
    assert rows[1]["client"] is not None and rows[1]["user"] is None
    assert rows[1]["request_body"] is None  # bodies only with MPCAPI_LOG_BODIES
    response = await harness.get("/api/usage?group_by=model", headers=bearer(ADMIN))
    assert response.code == 200
    report = await json_body(response)
    by_model = {group["group"]: group for group in report["groups"]}
    assert by_model["gpt-4o-mini"]["requests"] == 2
    assert by_model[None]["errors"] == 1  # refused before its model was known
    assert by_model["gpt-4o-mini"]["prompt_tokens"] == 6
    assert by_model["gpt-4o-mini"]["cost_usd"] == pytest.approx(0.00084)
    assert report["totals"]["requests"] == 4
    day = await json_body(await harness.get("/api/usage?group_by=day", headers=bearer(ADMIN)))
    assert [g["requests"] for g in day["groups"]] == [4]  # GET /api/usage is not usage
    # The CLI prints the same numbers.
    url = db.url
    out = io.StringIO()
    assert run_admin(["usage", "--group-by", "model", "--json", "--database-url", url], out) == 0
    printed = {g["group"]: g for g in json.loads(out.getvalue())["groups"]}
    assert printed["gpt-4o-mini"] == by_model["gpt-4o-mini"]
    out = io.StringIO()
    assert run_admin(["usage", "--group-by", "model", "--database-url", url], out) == 0
    table = out.getvalue().splitlines()
    assert table[0].split() == ["model", "requests", "errors", "prompt", "completion", "cost_usd"]
    assert table[-1].split()[0] == "TOTAL"
    assert any(line.split()[:3] == ["gpt-4o-mini", "2", "0"] for line in table)


def run_admin(argv: list[str], out: io.StringIO) -> int:
    import contextlib

    with contextlib.redirect_stdout(out):
        return admin_main(argv)


@pytest_twisted.ensureDeferred
async def test_bodies_are_stored_only_when_asked_and_redacted(
    sqlite_db: SyncDb, tmp_path: Path
) -> None:
    setup = ledgered(sqlite_db, tmp_path, log_bodies=True)
    body = {**CHAT, "api_key": "sk-provider-secret-123456", "metadata": {"password": "hunter2"}}
    headers = {"Authorization": "Bearer sk-client-secret-abcdef"}
    assert (await setup.harness.post("/api/chat/completions", body, headers=headers)).code == 200
    await setup.store()
    (row,) = sqlite_db.rows()
    stored = json.loads(row["request_body"])
    assert stored["api_key"] == REDACTED and stored["metadata"]["password"] == REDACTED
    assert stored["messages"] == CHAT["messages"]
    assert json.loads(row["response_body"]) == COMPLETION
    everything = json.dumps(row)
    for secret in ("sk-provider-secret", "hunter2", "sk-client-secret", "sk-ours"):
        assert secret not in everything


# --- streams ------------------------------------------------------------------------------------


def chunk(content: str) -> bytes:
    choice = {"index": 0, "delta": {"content": content}}
    document = {"object": "chat.completion.chunk", "choices": [choice]}
    return b"data: " + json.dumps(document).encode() + b"\n\n"


# LiteLLM's usage chunk: a choice with an empty delta, and the cost in the usage.
USAGE_CHUNK = (
    b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{}}],"usage":'
    + json.dumps(MOCK_USAGE).encode()
    + b"}\n\n"
)
EVENTS = chunk("Hel") + b": keep-alive\n\n" + chunk("lo") + b"data: x\r\ndata: y\r\n\r\n"


def streaming_upstream(seen_bodies: list[bytes]) -> Any:
    def stream(request: Request) -> bytes:
        request.content.seek(0)
        body = request.content.read()
        seen_bodies.append(body)
        request.setHeader(b"content-type", b"text/event-stream")
        asked = json.loads(body).get("stream_options", {}).get("include_usage") is True
        return EVENTS + (USAGE_CHUNK if asked else b"") + b"data: [DONE]\n\n"

    return stream


@pytest_twisted.ensureDeferred
async def test_hidden_usage_chunk_is_counted_and_removed(sqlite_db: SyncDb, tmp_path: Path) -> None:
    setup = ledgered(sqlite_db, tmp_path)
    bodies: list[bytes] = []
    setup.harness.fake.routes[("POST", "/chat/completions")] = streaming_upstream(bodies)
    response = await setup.harness.post("/api/chat/completions", {**CHAT, "stream": True})
    received = await response.content()
    # Everything else byte for byte, without the usage chunk the client did not ask for.
    assert received == EVENTS + b"data: [DONE]\n\n"
    (forwarded,) = bodies
    assert json.loads(forwarded)["stream_options"] == {"include_usage": True}
    await setup.store()
    (row,) = sqlite_db.rows()
    assert (row["prompt_tokens"], row["completion_tokens"]) == (8, 9)
    assert (row["cost_source"], row["cost_usd"]) == ("litellm", pytest.approx(6.6e-06))
    assert row["outcome"] == "completed" and row["ttfb_ms"] is not None


@pytest_twisted.ensureDeferred
async def test_usage_chunk_kept_when_the_client_asked(sqlite_db: SyncDb, tmp_path: Path) -> None:
    setup = ledgered(sqlite_db, tmp_path)
    bodies: list[bytes] = []
    setup.harness.fake.routes[("POST", "/chat/completions")] = streaming_upstream(bodies)
    original = json.dumps(
        {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    ).encode()
    response = await setup.harness.post("/api/chat/completions", original)
    assert await response.content() == EVENTS + USAGE_CHUNK + b"data: [DONE]\n\n"
    assert bodies == [original]  # the client's own bytes, not re-serialised
    await setup.store()
    (row,) = sqlite_db.rows()
    assert (row["prompt_tokens"], row["completion_tokens"]) == (8, 9)


@pytest_twisted.ensureDeferred
async def test_abandoned_stream_is_counted_with_the_text_sent(
    sqlite_db: SyncDb, tmp_path: Path
) -> None:
    setup = ledgered(sqlite_db, tmp_path)
    harness = setup.harness
    upstream: list[Request] = []

    def hanging(request: Request) -> int:
        upstream.append(request)
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(chunk("one") + chunk("two") + chunk("three"))
        return NOT_DONE_YET

    harness.fake.routes[("POST", "/chat/completions")] = hanging
    pending = defer.ensureDeferred(harness.post("/api/chat/completions", {**CHAT, "stream": True}))
    harness.flush()
    response = await pending
    received: list[bytes] = []
    treq.collect(response, received.append).addErrback(lambda _: None)
    harness.flush()
    assert b"".join(received) == chunk("one") + chunk("two") + chunk("three")
    # The client goes away mid-stream.
    (served,) = [r for r in setup.recording.requests if r.path.endswith(b"/completions")]
    served.connectionLost(Failure(ConnectionDone()))
    harness.flush()
    await setup.store()
    (row,) = sqlite_db.rows()
    assert row["outcome"] == "client_abort"
    assert (row["cost_source"], row["completion_tokens"]) == ("deltas_price_table", 3)
    assert row["cost_usd"] == pytest.approx(3 * 0.6e-6)


# --- budgets ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_budget_spent_is_429(db: SyncDb, tmp_path: Path, log_events: list[LogEvent]) -> None:
    setup = ledgered(db, tmp_path, keys=True)
    harness = setup.harness
    harness.fake.routes[("POST", "/chat/completions")] = answer(
        200, COMPLETION, {"x-litellm-response-cost": "0.0005"}
    )
    key, secret = db.sync.run(create_key, "alice", budget_usd=0.001)
    _, other = db.sync.run(create_key, "bob")
    # Spent earlier (by another instance, say): 0.00085, over 80 %.
    earlier = setup.ledger.row_of(
        exchange(request_id="earlier", key_id=key.id, model="gpt-4o-mini", prompt_tokens=1,
                 completion_tokens=1, cost_usd=0.00085, route="/chat/completions")
    )  # fmt: skip
    db.sync.run(insert_rows, [earlier])
    first = await harness.post("/api/chat/completions", CHAT, headers=bearer(secret))
    assert first.code == 200
    assert any("has spent" in text and key.id in text for text in texts(log_events))
    # Its own cost is still queued here, and counts: 0.00135 >= 0.001.
    refused = await harness.post("/api/chat/completions", CHAT, headers=bearer(secret))
    assert refused.code == 429
    document = await json_body(refused)
    assert set(document) == {"error", "message", "request_id"}
    assert document["error"]["code"] == "insufficient_quota"
    assert "budget" in document["message"] and "spent" in document["message"]
    models = await harness.get("/api/models", headers=bearer(secret))
    assert models.code == 429
    # Other keys are not concerned; once stored, the database says the same.
    assert (await harness.post("/api/chat/completions", CHAT, headers=bearer(other))).code == 200
    await setup.store()
    harness.clock.advance(6)
    again = await harness.post("/api/chat/completions", CHAT, headers=bearer(secret))
    assert again.code == 429
    assert sum(1 for text in texts(log_events) if "has spent" in text) == 1
    assert isinstance(key, ClientKey)


# --- GET /api/usage -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("group_by=color", "group_by"),
        ("from=yesterday", "from"),
        ("to=2026-13-45", "to"),
        ("from=2026-11-02&to=2026-11-01", "earlier"),
        ("from=2026-11-01T10:00:00Z&to=2026-11-01T10:00:00Z", "earlier"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_usage_queries_are_400(
    sqlite_db: SyncDb, tmp_path: Path, query: str, message: str
) -> None:
    setup = ledgered(sqlite_db, tmp_path)
    response = await setup.harness.get(f"/api/usage?{query}", headers=bearer(ADMIN))
    assert response.code == 400
    document = await json_body(response)
    assert set(document) == {"error", "message", "request_id"}
    assert document["error"]["code"] == "bad_request" and message in document["message"]


@pytest_twisted.ensureDeferred
async def test_usage_needs_the_admin_key_and_honours_the_period(
    sqlite_db: SyncDb, tmp_path: Path
) -> None:
    setup = ledgered(sqlite_db, tmp_path)
    assert (await setup.harness.get("/api/usage")).code == 401
    assert (await setup.harness.get("/api/usage", headers=bearer("wrong"))).code == 401
    closed = ledgered(sqlite_db, tmp_path, admin_key="")
    assert (await closed.harness.get("/api/usage", headers=bearer(ADMIN))).code == 403
    rows = [
        {"request_id": f"r{n}", "created_at": f"2026-11-0{n}T12:00:00.000Z", "user": "u",
         "model": "m", "status": 200, "cost_usd": 0.5, "cost_source": "litellm"}
        for n in (1, 2, 3)
    ]  # fmt: skip
    sqlite_db.sync.run(insert_rows, rows)
    sqlite_db.sync.run(insert_rows, rows)  # stored once, whatever happens
    response = await setup.harness.get(
        "/api/usage?group_by=user&from=2026-11-02&to=2026-11-02", headers=bearer(ADMIN)
    )
    report = await json_body(response)
    assert report["groups"] == [
        {"group": "u", "requests": 1, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0,
         "cost_usd": 0.5}
    ]  # fmt: skip
    assert report["from"] == "2026-11-02T00:00:00.000Z"
    assert report["to"] == "2026-11-03T00:00:00.000Z"
    since = "/api/usage?from=2026-01-01"  # (the harness's own requests are from 1970)
    everything = await json_body(await setup.harness.get(since, headers=bearer(ADMIN)))
    assert everything["group_by"] == "model" and everything["totals"]["requests"] == 3


# --- batching and the spool file ----------------------------------------------------------------


def fields(n: int, **more: Any) -> Exchange:
    return exchange(**{"request_id": f"req-{n}", "method": "POST", "route": "/chat/completions",
                       "model": "gpt-4o-mini", "status": 200, "duration_ms": 5.0,
                       "prompt_tokens": 1, "completion_tokens": 1, "cost_usd": 0.001,
                       **more})  # fmt: skip


def bare_ledger(db: SyncDb, tmp_path: Path, **options: Any) -> tuple[UsageLedger, Clock]:
    clock = Clock()
    ledger = UsageLedger(
        db,  # type: ignore[arg-type]
        clock,
        PRICES,
        str(tmp_path / "spool.jsonl"),
        in_thread,
        **options,
    )
    ledger.startService()
    return ledger, clock


def test_rows_are_written_in_batches(sqlite_db: SyncDb, tmp_path: Path) -> None:
    ledger, clock = bare_ledger(sqlite_db, tmp_path, batch=3)
    ledger.observe(fields(1))
    ledger.observe(fields(2))
    assert sqlite_db.calls == 0 and len(ledger.queue) == 2
    ledger.observe(fields(3))  # a full batch goes at once
    assert len(sqlite_db.rows()) == 3 and sqlite_db.calls == 1
    ledger.observe(fields(4))
    clock.advance(FLUSH_EVERY)  # the rest on the next tick
    assert len(sqlite_db.rows()) == 4 and sqlite_db.calls == 2


def test_outage_spools_then_replays_every_row_once(
    db: SyncDb, tmp_path: Path, log_events: list[LogEvent]
) -> None:
    ledger, clock = bare_ledger(db, tmp_path)
    spool = tmp_path / "spool.jsonl"
    ledger.observe(fields(0))
    clock.advance(FLUSH_EVERY)
    db.down = True
    for n in range(1, 4):
        ledger.observe(fields(n))
    clock.advance(FLUSH_EVERY)
    assert [row["request_id"] for row in read_lines(str(spool))] == ["req-1", "req-2", "req-3"]
    calls = db.calls
    for n in range(4, 8):
        ledger.observe(fields(n))
        clock.advance(FLUSH_EVERY)  # between attempts, rows go straight to the spool file
    assert db.calls <= calls + 2
    assert len(read_lines(str(spool))) == 7
    down = [t for t in texts(log_events) if "unreachable" in t]
    assert len(down) == 1 and "the test's outage" in down[0]
    db.down = False
    clock.advance(2.5)
    assert not spool.exists()
    ids = [row["request_id"] for row in db.rows()]
    assert sorted(ids) == [f"req-{n}" for n in range(8)]
    assert len([t for t in texts(log_events) if "database is back" in t]) == 1
    # A replay of rows already stored stores nothing twice.
    append_lines(str(spool), [ledger.row_of(fields(n)) for n in (1, 2)])
    ledger.spooled = True
    ledger.observe(fields(8))
    clock.advance(FLUSH_EVERY)
    assert sorted(row["request_id"] for row in db.rows()) == [f"req-{n}" for n in range(9)]
    assert not spool.exists()


def test_a_full_queue_overflows_to_the_spool_file(sqlite_db: SyncDb, tmp_path: Path) -> None:
    ledger, clock = bare_ledger(sqlite_db, tmp_path, max_queue=2, batch=100)
    for n in range(5):
        ledger.observe(fields(n))
    assert len(ledger.queue) == 2
    assert len(read_lines(str(tmp_path / "spool.jsonl"))) == 3
    clock.advance(FLUSH_EVERY)
    assert len(sqlite_db.rows()) == 5
    assert not (tmp_path / "spool.jsonl").exists()


def test_any_batch_goes_in_with_a_few_statement_sizes(sqlite_db: SyncDb) -> None:
    """The drivers keep every statement they prepare: batches of every size must not make
    a new one each."""
    texts: set[str] = set()

    def counted(cursor: Any, rows: list[dict[str, Any]]) -> int:
        execute = cursor.execute

        def noting(statement: str, params: Any = ()) -> Any:
            texts.add(statement)
            return execute(statement, params)

        cursor.execute = noting
        return insert_rows(cursor, rows)

    stored = 0
    for size in (263, 7, 199, 1, 50):
        rows = [{"request_id": f"b{size}-{n}", "created_at": "2026-11-27T00:00:00.000Z"}
                for n in range(size)]  # fmt: skip
        stored += sqlite_db.sync.run(counted, rows)
    assert stored == 263 + 7 + 199 + 1 + 50
    assert len(sqlite_db.rows()) == stored
    assert len(texts) <= len(STATEMENT_SIZES)


def test_each_flush_reports_the_rows_waiting(sqlite_db: SyncDb, tmp_path: Path) -> None:
    reported: list[int] = []
    ledger, clock = bare_ledger(sqlite_db, tmp_path, batch=100, report_queue=reported.append)
    for n in range(7):
        ledger.observe(fields(n))
    clock.advance(FLUSH_EVERY)
    clock.advance(FLUSH_EVERY)
    assert reported == [7, 0]
    assert len(sqlite_db.rows()) == 7


@pytest_twisted.ensureDeferred
async def test_the_composition_root_feeds_the_ledgers_reports_to_its_metrics(
    tmp_path: Path,
) -> None:
    """The ledger that ``build_gateway`` opens tells the metrics its queue and refusals."""
    harness = make_harness(
        usage_ledger=True,
        database_url=f"sqlite:///{tmp_path / 'usage.db'}",
        usage_spool=str(tmp_path / "spool.jsonl"),
    )
    ledger = harness.parts.ledger
    assert ledger is not None
    value = harness.parts.metrics.registry.get_sample_value
    ledger.startService()
    try:
        ledger.observe(fields(1))
        ledger.observe(fields(2, prompt_tokens=2**63))  # no database can take it
        harness.clock.advance(FLUSH_EVERY)  # the flusher reports the rows waiting, then flushes
        assert value("mpcapi_usage_queue_rows") == 2
        for _ in range(1000):
            if ledger.refused:
                break
            await sleep(0.01)
    finally:
        await ledger.stopService()
        ledger.database.close()
    assert value("mpcapi_usage_rows_refused_total") == 1


def test_only_openai_routes_are_usage(sqlite_db: SyncDb, tmp_path: Path) -> None:
    ledger, clock = bare_ledger(sqlite_db, tmp_path)
    ledger.observe(fields(1, route=None, path="/health"))
    ledger.observe(fields(2))
    clock.advance(FLUSH_EVERY)
    assert [row["request_id"] for row in sqlite_db.rows()] == ["req-2"]


def test_spool_left_by_an_earlier_run_is_replayed(sqlite_db: SyncDb, tmp_path: Path) -> None:
    from twisted.internet.task import Clock

    earlier = UsageLedger(sqlite_db, Clock(), PRICES, "", in_thread)  # type: ignore[arg-type]
    append_lines(str(tmp_path / "spool.jsonl"), [earlier.row_of(fields(n)) for n in range(3)])
    ledger, clock = bare_ledger(sqlite_db, tmp_path)
    assert ledger.spooled
    clock.advance(FLUSH_EVERY)
    assert len(sqlite_db.rows()) == 3


def test_stop_stores_what_is_queued(sqlite_db: SyncDb, tmp_path: Path) -> None:
    ledger, _ = bare_ledger(sqlite_db, tmp_path)
    ledger.observe(fields(1))
    stopped = ledger.stopService()
    assert stopped.called
    assert len(sqlite_db.rows()) == 1
