"""Client keys (MPCAPI_AUTH=keys) and the admin key, in memory over real databases: the
gateway through StubTreq, its key cache on a task.Clock, the keys in a real SQLite file or a
PostgreSQL schema of the test's own (the database's thread runs on the real reactor)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import LogEvent, formatEvent
from twisted.web.test.requesthelper import DummyRequest

from mpcapi.admin import main as admin_main
from mpcapi.config.settings import Settings
from mpcapi.errors import ApiError
from mpcapi.exchange import Exchange
from mpcapi.policy import keys as keys_module
from mpcapi.policy.keys import FRESH_FOR, UNKNOWN_FOR, USABLE_FOR, require_admin
from mpcapi.storage.database import MIGRATIONS, Database, Migration, SyncDatabase
from mpcapi.storage.keys import ClientKey, create_key, hash_key, key_by_hash, list_keys, revoke_key
from tests.support.databases import database_url, sqlite_url
from tests.support.gateway import CHAT, Harness, make_harness
from tests.support.keys import Answer, call, database_of, new_key, settle

ROUTES = [
    ("GET", "/api/models"),
    ("GET", "/v1/models"),
    ("POST", "/api/chat/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/api/completions"),
    ("POST", "/api/embeddings"),
    ("GET", "/api/ws"),
    ("GET", "/v1/ws"),
]
WELL_FORMED_UNKNOWN = "sk-mpc-" + "A" * 43


# --- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def auth(tmp_path: Path) -> Iterator[Harness]:
    """A gateway with client keys on, over a SQLite file."""
    harness = make_harness(auth="keys", database_url=sqlite_url(tmp_path))
    yield harness
    assert harness.keys is not None
    harness.keys.database.close()


@pytest.fixture
def auth_any_db(db_url: str) -> Iterator[Harness]:
    """The same over SQLite and over PostgreSQL."""
    harness = make_harness(auth="keys", database_url=db_url)
    yield harness
    assert harness.keys is not None
    harness.keys.database.close()


async def assert_401(response: Answer, message_part: str) -> None:
    assert response.code == 401
    assert response.headers.getRawHeaders(b"www-authenticate") == [b"Bearer"]
    document = response.json()
    assert set(document) == {"error", "message", "request_id"}
    assert document["error"]["code"] == "invalid_api_key"
    assert message_part in document["message"]
    assert document["request_id"] == response.headers.getRawHeaders(b"x-request-id")[0].decode()


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest_twisted.ensureDeferred
async def test_missing_key_is_401_on_every_route(auth: Harness, method: str, path: str) -> None:
    response = await call(auth, method, path)
    await assert_401(response, "missing client key")
    assert auth.fake.seen == []


@pytest.mark.parametrize(
    "authorization",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Bearer a b", WELL_FORMED_UNKNOWN, "Token x"],
)
@pytest_twisted.ensureDeferred
async def test_malformed_authorization_is_401(auth: Harness, authorization: str) -> None:
    response = await call(auth, "POST", "/api/chat/completions", authorization)
    await assert_401(response, "malformed Authorization header")
    assert auth.fake.seen == []


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest_twisted.ensureDeferred
async def test_unknown_key_is_401(auth: Harness, method: str, path: str) -> None:
    response = await call(auth, method, path, f"Bearer {WELL_FORMED_UNKNOWN}")
    await assert_401(response, "invalid client key")
    assert auth.fake.seen == []


@pytest.mark.parametrize("token", ["sk-litellm-1234", "sk-mpc-short", "sk-mpc-" + "é" * 43])
@pytest_twisted.ensureDeferred
async def test_key_of_another_shape_is_401_without_a_query(auth: Harness, token: str) -> None:
    queries = count_queries(auth)
    response = await call(auth, "GET", "/api/models", f"Bearer {token}")
    await assert_401(response, "invalid client key")
    assert queries == []


@pytest_twisted.ensureDeferred
async def test_revoked_key_is_401(auth_any_db: Harness) -> None:
    key, secret = await new_key(auth_any_db)
    await database_of(auth_any_db).run(revoke_key, key.id)
    response = await call(auth_any_db, "POST", "/api/chat/completions", f"Bearer {secret}")
    await assert_401(response, f"client key {key.id} has been revoked")
    assert auth_any_db.fake.seen == []


@pytest_twisted.ensureDeferred
async def test_a_key_is_checked_before_the_body(auth: Harness) -> None:
    response = await settle(
        auth, auth.client.post("http://mpcapi.test/api/chat/completions", data=b"{x")
    )
    body = await settle(auth, response.content())
    await assert_401(Answer(response.code, response.headers, body), "missing client key")


# --- acceptance ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [r for r in ROUTES if not r[1].endswith("/ws")])
@pytest_twisted.ensureDeferred
async def test_valid_key_is_forwarded_with_our_key_not_the_clients(
    auth_any_db: Harness, method: str, path: str
) -> None:
    _, secret = await new_key(auth_any_db)
    response = await call(auth_any_db, method, path, f"bearer {secret}")
    assert response.code == 200, response.body
    (seen,) = auth_any_db.fake.seen
    assert seen.header("authorization") == "Bearer sk-ours"
    assert secret not in json.dumps(seen.headers)


@pytest_twisted.ensureDeferred
async def test_without_litellm_key_the_client_key_is_not_passed_on(tmp_path: Path) -> None:
    harness = make_harness(auth="keys", database_url=sqlite_url(tmp_path), litellm_api_key="")
    try:
        _, secret = await new_key(harness)
        response = await call(harness, "POST", "/api/chat/completions", f"Bearer {secret}")
        assert response.code == 200
        assert harness.fake.seen[0].header("authorization") is None
    finally:
        database_of(harness).close()


@pytest_twisted.ensureDeferred
async def test_with_auth_off_the_clients_authorization_still_passes_through() -> None:
    harness = make_harness(litellm_api_key="")
    response = await harness.get("/api/models", headers={"Authorization": "Bearer sk-litellm-x"})
    assert response.code == 200
    assert harness.fake.seen[0].header("authorization") == "Bearer sk-litellm-x"


@pytest.mark.parametrize("path", ["/health", "/health/ready"])
@pytest_twisted.ensureDeferred
async def test_health_stays_open(auth: Harness, path: str) -> None:
    response = await call(auth, "GET", path)
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_the_record_and_log_name_the_key_never_the_secret(
    auth: Harness, log_events: list[LogEvent]
) -> None:
    key, secret = await new_key(auth, "bob", rpm=60, tpm=1000, budget_usd=2.5)
    response = await call(auth, "POST", "/api/chat/completions", f"Bearer {secret}")
    assert response.code == 200
    request_events = [e for e in log_events if e.get("log_namespace") == "mpcapi.request"]
    assert request_events, log_events
    event = request_events[-1]
    assert event["key_id"] == key.id
    assert event["user"] == "bob"
    everything = "\n".join(formatEvent(e) + repr(sorted(e.items(), key=str)) for e in log_events)
    assert secret not in everything
    assert key.key_hash not in everything


@pytest_twisted.ensureDeferred
async def test_the_exchange_holds_the_keys_row(tmp_path: Path) -> None:
    """The rate limiter and the ledger read ``exchange.key``: the key's row."""
    exchanges: list[Exchange] = []
    auth = make_harness(
        auth="keys", database_url=sqlite_url(tmp_path), observers=[exchanges.append]
    )
    key, secret = await new_key(auth, "carol", rpm=5, tpm=0, budget_usd=1.0)
    response = await call(auth, "GET", "/api/models", f"Bearer {secret}")
    assert response.code == 200
    (exchange,) = exchanges
    assert (exchange.key_id, exchange.user) == (key.id, "carol")
    found = exchange.key
    database_of(auth).close()
    assert found is not None
    assert (found.id, found.user, found.rpm, found.tpm, found.budget_usd, found.revoked) == (
        key.id,
        "carol",
        5,
        0,
        1.0,
        False,
    )


# --- timing: new keys at once, revoked keys within 5 s ------------------------------------------


def count_queries(harness: Harness) -> list[str]:
    """Record every key lookup that reaches the database."""
    database = database_of(harness)
    queries: list[str] = []
    run = database.run

    async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        queries.append(fn.__name__)
        return await run(fn, *args, **kwargs)

    database.run = counting  # type: ignore[method-assign]
    return queries


@pytest_twisted.ensureDeferred
async def test_a_new_key_works_at_once(auth_any_db: Harness) -> None:
    # The gateway has been answering (and caching) before the key exists.
    response = await call(auth_any_db, "GET", "/api/models", f"Bearer {WELL_FORMED_UNKNOWN}")
    assert response.code == 401
    _, secret = await new_key(auth_any_db)
    response = await call(auth_any_db, "GET", "/api/models", f"Bearer {secret}")
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_a_revoked_key_is_refused_within_five_seconds(auth_any_db: Harness) -> None:
    harness = auth_any_db
    key, secret = await new_key(harness)
    header = f"Bearer {secret}"
    assert (await call(harness, "GET", "/api/models", header)).code == 200
    await database_of(harness).run(revoke_key, key.id)
    refused_at = None
    for tenth in range(1, 51):  # every 0.1 s of the clock, up to 5 s
        harness.clock.advance(0.1)
        response = await call(harness, "GET", "/api/models", header)
        if response.code == 401:
            refused_at = tenth / 10
            break
        assert response.code == 200
    assert refused_at is not None, "still accepted 5 s after revocation"
    assert refused_at <= USABLE_FOR + 0.2
    # ... and from then on.
    harness.clock.advance(0.1)
    await assert_401(await call(harness, "GET", "/api/models", header), "revoked")


@pytest_twisted.ensureDeferred
async def test_a_busy_key_costs_one_query_per_two_seconds(auth: Harness) -> None:
    _, secret = await new_key(auth)
    queries = count_queries(auth)
    for _ in range(40):  # 4 s of requests, one every 0.1 s
        assert (await call(auth, "GET", "/api/models", f"Bearer {secret}")).code == 200
        auth.clock.advance(0.1)
    assert 1 <= len(queries) <= 3, queries
    assert FRESH_FOR == 2.0


@pytest_twisted.ensureDeferred
async def test_unknown_keys_are_remembered_for_a_second(auth: Harness) -> None:
    queries = count_queries(auth)
    header = f"Bearer {WELL_FORMED_UNKNOWN}"
    for _ in range(20):
        assert (await call(auth, "GET", "/api/models", header)).code == 401
    assert queries == ["key_by_hash"]
    auth.clock.advance(UNKNOWN_FOR)
    assert (await call(auth, "GET", "/api/models", header)).code == 401
    assert queries == ["key_by_hash", "key_by_hash"]


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_with_one_key_share_one_query(auth: Harness) -> None:
    _, secret = await new_key(auth)
    queries = count_queries(auth)
    headers = {"Authorization": f"Bearer {secret}"}
    pending = [auth.client.get("http://mpcapi.test/api/models", headers=headers) for _ in range(5)]
    responses = [await settle(auth, d) for d in pending]
    for response in responses:
        await settle(auth, response.content())
    assert [r.code for r in responses] == [200] * 5
    assert queries == ["key_by_hash"]


@pytest_twisted.ensureDeferred
async def test_an_unavailable_database_is_503(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "mpcapi.db"
    harness = make_harness(auth="keys", database_url=f"sqlite:///{missing}")
    try:
        response = await call(harness, "GET", "/api/models", f"Bearer {WELL_FORMED_UNKNOWN}")
        assert response.code == 503
        assert response.json()["error"]["code"] == "service_unavailable"
        assert harness.fake.seen == []
    finally:
        database_of(harness).close()


# --- constant time, hashes only -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_hash_is_compared_in_constant_time(
    auth: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[Any, Any]] = []
    real = keys_module.hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", spy)
    key, secret = await new_key(auth)
    assert (await call(auth, "GET", "/api/models", f"Bearer {secret}")).code == 200
    assert compared == [(key.key_hash, hash_key(secret))]


@pytest_twisted.ensureDeferred
async def test_only_hashes_are_stored(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    database = SyncDatabase(url)
    database.migrate()
    key, secret = database.run(create_key, "dave")
    database.close()
    assert secret.startswith("sk-mpc-") and len(secret) == len("sk-mpc-") + 43
    assert key.id.startswith("key_") and len(key.id) == len("key_") + 8
    with sqlite3.connect(tmp_path / "mpcapi.db") as connection:
        rows = connection.execute("SELECT * FROM client_keys").fetchall()
    dump = repr(rows)
    assert secret not in dump
    assert secret[len("sk-mpc-") :] not in dump
    assert hashlib.sha256(secret.encode()).hexdigest() in dump
    assert secret not in (tmp_path / "mpcapi.db").read_bytes().decode("latin-1")


def test_key_repr_hides_the_hash() -> None:
    key = ClientKey("key_1", "ab" * 32, "eve", None, None, None, "2026-01-01T00:00:00Z")
    assert "ab" * 32 not in repr(key)


# --- the database layer -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_database_round_trip_and_migrations_once(db_url: str) -> None:
    database = Database(db_url, reactor)
    try:
        assert await database.migrate() == [m.version for m in MIGRATIONS]
        assert await database.migrate() == []
        key, secret = await database.run(create_key, "frank", rpm=10, budget_usd=0.5)
        found = await database.run(key_by_hash, hash_key(secret))
        assert found == key
        assert (found.rpm, found.tpm, found.budget_usd, found.revoked) == (10, None, 0.5, False)
        revoked = await database.run(revoke_key, key.id)
        assert revoked is not None and revoked.revoked
        again = await database.run(revoke_key, key.id)
        assert again is not None and again.revoked_at == revoked.revoked_at
        assert await database.run(revoke_key, "key_nothere") is None
        assert [k.id for k in await database.run(list_keys)] == [key.id]
    finally:
        database.close()
    # The synchronous twin sees the same rows and finds nothing to migrate.
    twin = SyncDatabase(db_url)
    try:
        assert twin.migrate() == []
        assert [k.user for k in twin.run(list_keys)] == ["frank"]
    finally:
        twin.close()


def test_a_later_migration_applies_alone(db_url: str) -> None:
    database = SyncDatabase(db_url)
    try:
        from mpcapi.storage.database import apply_migrations

        current = [m.version for m in MIGRATIONS]
        assert database.migrate() == current
        later = Migration(
            MIGRATIONS[-1].version + 1,
            "ledger",
            ("CREATE TABLE ledger_test (id INTEGER PRIMARY KEY)",),
        )
        connection = database.connection()
        assert apply_migrations(connection, database.dialect, (*MIGRATIONS, later)) == [
            later.version
        ]
        assert apply_migrations(connection, database.dialect, (*MIGRATIONS, later)) == []
        rows = database.run(
            lambda cursor: cursor.execute(
                "SELECT version, name FROM schema_migrations ORDER BY version"
            ).fetchall()
        )
        assert rows == [(m.version, m.name) for m in (*MIGRATIONS, later)]
    finally:
        database.close()


def test_a_failed_migration_leaves_nothing_behind(tmp_path: Path) -> None:
    from mpcapi.storage.database import apply_migrations

    database = SyncDatabase(sqlite_url(tmp_path))
    try:
        broken = Migration(1, "broken", ("CREATE TABLE half (id INTEGER)", "NOT SQL"))
        with pytest.raises(sqlite3.Error):
            apply_migrations(database.connection(), database.dialect, (broken,))
        tables = database.run(
            lambda cursor: cursor.execute("SELECT name FROM sqlite_master").fetchall()
        )
        assert ("half",) not in tables
        assert database.migrate() == [m.version for m in MIGRATIONS]
    finally:
        database.close()


def test_migration_versions_are_in_order_and_unique() -> None:
    versions = [migration.version for migration in MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))


# --- WebSocket ----------------------------------------------------------------------------------


def test_websocket_sessions_do_not_pass_the_client_key_on(tmp_path: Path) -> None:
    harness = make_harness(auth="keys", database_url=sqlite_url(tmp_path))
    try:
        endpoint = harness.gateway.websockets
        session = endpoint.session(lambda _: None, "/api/ws", b"Bearer sk-mpc-x", "127.0.0.1")
        assert session._authorization is None
        open_endpoint = make_harness().gateway.websockets
        session = open_endpoint.session(lambda _: None, "/api/ws", b"Bearer x", "127.0.0.1")
        assert session._authorization == b"Bearer x"
    finally:
        database_of(harness).close()


@pytest_twisted.ensureDeferred
async def test_websocket_upgrade_with_a_key_reaches_the_endpoint(auth: Harness) -> None:
    _, secret = await new_key(auth)
    # A plain GET with a valid key gets past the key check to the endpoint's 426.
    response = await call(auth, "GET", "/api/ws", f"Bearer {secret}")
    assert response.code == 426


# --- the admin key ------------------------------------------------------------------------------


def admin_request(authorization: str | None) -> DummyRequest:
    request = DummyRequest([b"metrics"])
    if authorization is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [authorization.encode()])
    return request


def test_admin_surfaces_are_closed_without_an_admin_key() -> None:
    with pytest.raises(ApiError) as refused:
        require_admin(admin_request("Bearer anything"), Settings(admin_key=""))
    assert refused.value.status == 403
    assert "closed" in refused.value.message


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "missing admin key"),
        ("Basic abc", "malformed"),
        ("Bearer wrong", "invalid admin key"),
        ("Bearer admin-secre", "invalid admin key"),
    ],
)
def test_admin_key_missing_or_wrong_is_401(authorization: str | None, message: str) -> None:
    with pytest.raises(ApiError) as refused:
        require_admin(admin_request(authorization), Settings(admin_key="admin-secret"))
    assert refused.value.status == 401
    assert refused.value.headers == {"WWW-Authenticate": "Bearer"}
    assert message in refused.value.message


def test_admin_key_accepted_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[Any] = []
    real = keys_module.hmac.compare_digest
    monkeypatch.setattr(
        keys_module.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b)
    )
    require_admin(admin_request("Bearer admin-secret"), Settings(admin_key="admin-secret"))
    assert compared == [1]


# --- mpcapi-admin, in process (the integration tests run the installed script) ------------------


def run_admin(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, cwd: Path
) -> tuple[int, str, str]:
    monkeypatch.chdir(cwd)
    for name in ("MPCAPI_DATABASE_URL", "MPCAPI_CONFIG", "PORT"):
        monkeypatch.delenv(name, raising=False)
    code = admin_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_admin_create_list_revoke(
    db_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = ["--database-url", db_url]
    code, out, err = run_admin(
        [*db, "keys", "create", "--user", "gina", "--rpm", "60", "--budget", "10"],
        capsys,
        monkeypatch,
        tmp_path,
    )
    assert code == 0, err
    created, secret = out.splitlines()
    key_id = created.split()[1]
    assert key_id.startswith("key_")
    assert secret.startswith("sk-mpc-")
    assert "shown only once" in err

    code, out, _ = run_admin(["keys", "list", *db], capsys, monkeypatch, tmp_path)
    assert code == 0
    (line,) = out.splitlines()
    assert line.split()[0] == key_id
    for part in ("user=gina", "rpm=60", "tpm=default", "budget_usd=10", "active"):
        assert part in line
    assert secret not in out and hash_key(secret) not in out

    code, out, _ = run_admin([*db, "keys", "revoke", key_id], capsys, monkeypatch, tmp_path)
    assert code == 0 and f"revoked {key_id}" in out
    code, out, _ = run_admin([*db, "keys", "list"], capsys, monkeypatch, tmp_path)
    assert " revoked " in out

    code, out, err = run_admin([*db, "keys", "revoke", "key_0000"], capsys, monkeypatch, tmp_path)
    assert code == 1
    assert err == "mpcapi-admin: no key with id 'key_0000' (see mpcapi-admin keys list)\n"


def test_admin_uses_the_daemons_configuration_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "mpcapi.toml"
    config.write_text('database_url = "sqlite:///from-toml.db"\n')
    code, _, err = run_admin(
        ["--config", str(config), "keys", "create", "--user", "h"], capsys, monkeypatch, tmp_path
    )
    assert code == 0, err
    assert (tmp_path / "from-toml.db").exists()
    (tmp_path / ".env").write_text("MPCAPI_DATABASE_URL=sqlite:///from-dotenv.db\n")
    code, _, err = run_admin(["keys", "list"], capsys, monkeypatch, tmp_path)
    assert code == 0, err
    assert (tmp_path / "from-dotenv.db").exists()


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["keys", "list"], {"PORT": "abc"}, "mpcapi-admin: configuration error: PORT: "),
        (
            ["--database-url", "mysql://x", "keys", "list"],
            {},
            "mpcapi-admin: configuration error: --database-url: ",
        ),
        (
            ["keys", "list"],
            {"MPCAPI_DATABASE_URL": "redis://x"},
            "mpcapi-admin: configuration error: MPCAPI_DATABASE_URL: ",
        ),
    ],
)
def test_admin_bad_configuration_is_one_line_and_exit_2(
    argv: list[str],
    env: dict[str, str],
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("MPCAPI_DATABASE_URL", "MPCAPI_CONFIG", "PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert admin_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "create"],
        ["keys", "create", "--user", "x", "--rpm", "-1"],
        ["keys", "create", "--user", "x", "--budget", "lots"],
        ["keys", "create", "--user", " "],
        ["keys", "revoke"],
        ["keys"],
        [],
    ],
)
def test_admin_bad_usage_is_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        admin_main(argv)
    assert exited.value.code == 2
    assert "usage: mpcapi-admin" in capsys.readouterr().err


def test_admin_unreachable_database_is_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/missing/dir/x.db"
    code, _, err = run_admin(["--database-url", url, "keys", "list"], capsys, monkeypatch, tmp_path)
    assert code == 1
    assert err.startswith("mpcapi-admin: database error: ") and err.count("\n") == 1


def test_the_effective_configuration_masks_the_database_password() -> None:
    settings = Settings(database_url="postgresql://mpc:s3cret@db:5432/mpcapi", admin_key="adm")
    masked = settings.masked()
    assert masked["database_url"] == "postgresql://mpc:***@db:5432/mpcapi"
    assert masked["admin_key"] == "***"
    assert Settings().masked()["database_url"] == "sqlite:///mpcapi.db"


@pytest_twisted.ensureDeferred
async def test_websocket_requests_stop_once_their_key_is_revoked(auth: Harness) -> None:
    key, secret = await new_key(auth)
    endpoint = auth.gateway.websockets
    sent: list[dict[str, Any]] = []
    header = f"Bearer {secret}".encode()
    session = endpoint.session(lambda raw: sent.append(json.loads(raw)), "/api/ws", header, "x")
    message = {"id": "1", "type": "chat.completions", "body": CHAT}

    async def wait_for(condition: Any) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            auth.flush()
            assert time.monotonic() < deadline
            await deferLater(reactor, 0.002, lambda: None)

    session.received(json.dumps(message).encode(), False)
    await wait_for(lambda: auth.fake.seen)
    assert auth.fake.seen[0].header("authorization") == "Bearer sk-ours"
    session.closed()

    await database_of(auth).run(revoke_key, key.id)
    auth.clock.advance(USABLE_FOR)
    session = endpoint.session(lambda raw: sent.append(json.loads(raw)), "/api/ws", header, "x")
    session.received(json.dumps({**message, "id": "2"}).encode(), False)
    await wait_for(lambda: any(m.get("id") == "2" for m in sent))
    (refusal,) = [m for m in sent if m.get("id") == "2"]
    assert refusal["type"] == "error" and refusal["status"] == 401
    assert "revoked" in refusal["message"]
    assert len(auth.fake.seen) == 1
