"""Tenancy (#16): the admin API for keys and teams, model access, expiry, rotation, team
limits and budget periods. The gateway runs through StubTreq on a task.Clock that starts on
2026-12-03T10:00:00Z; keys, teams and usage rows live in a real SQLite file or PostgreSQL
schema, queried synchronously so that every step is deterministic."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from mpcapi.admin import main as admin_main
from mpcapi.ledger.periods import Periods, bounds_of
from mpcapi.policy import tenancy
from mpcapi.policy.access import allows, valid_pattern, visible_models
from mpcapi.storage.keys import key_by_id
from mpcapi.storage.usagerows import insert_rows
from tests.support.databases import database_url
from tests.support.exchanges import exchange
from tests.support.gateway import COMPLETION, answer
from tests.support.tenancy import START, Tenancy, tenancy_harness

DAY = 86400.0


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.fixture(params=["sqlite", "postgresql"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tenancy]:
    with database_url(request.param, tmp_path) as url:
        made = tenancy_harness(url, tmp_path)
        yield made
        made.close()


@pytest.fixture
def sqlite_setup(tmp_path: Path) -> Iterator[Tenancy]:
    with database_url("sqlite", tmp_path) as url:
        made = tenancy_harness(url, tmp_path)
        yield made
        made.close()


def spent(setup: Tenancy, key_id: str, cost: float, at: float, team_id: str | None = None) -> None:
    """A usage row of ``key_id`` (and its team) costing ``cost``, made at ``at``."""
    row = setup.ledger.row_of(
        exchange(request_id=f"r-{key_id}-{at}-{cost}", key_id=key_id, model="gpt-4o-mini",
                 prompt_tokens=1, completion_tokens=1, cost_usd=cost, started=at,
                 route="/chat/completions")
    )  # fmt: skip
    row["team_id"] = team_id
    setup.db.sync.run(insert_rows, [row])


# --- periods and patterns -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("day", "2026-12-03T10:00:00", "2026-12-03T00:00:00", "2026-12-04T00:00:00"),
        ("week", "2026-12-03T10:00:00", "2026-11-30T00:00:00", "2026-12-07T00:00:00"),
        ("week", "2026-11-30T00:00:00", "2026-11-30T00:00:00", "2026-12-07T00:00:00"),
        ("month", "2026-12-31T23:59:59", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
        ("month", "2028-02-29T12:00:00", "2028-02-01T00:00:00", "2028-03-01T00:00:00"),
    ],
)
def test_periods_follow_utc_calendar_boundaries(
    period: str, now: str, start: str, end: str
) -> None:
    bounds = bounds_of(period, epoch(now))
    assert (bounds.start, bounds.end) == (epoch(start), epoch(end))
    assert bounds.since == start + ".000Z" and bounds.resets_at == end + ".000Z"


def test_periods_are_computed_again_only_past_their_end() -> None:
    periods = Periods()
    first = periods.bounds("day", START)
    assert periods.bounds("day", START + 3600) is first
    following = periods.bounds("day", first.end)
    assert following.start == first.end and following is not first


def test_model_patterns() -> None:
    assert allows(None, "anything")
    assert allows(("gpt-4o-mini",), "gpt-4o-mini")
    assert not allows(("gpt-4o-mini",), "gpt-4o")
    assert allows(("openai/*",), "openai/gpt-4o") and not allows(("openai/*",), "openai")
    assert not allows(("openai/*",), "anthropic/claude")
    assert allows(("*",), "x")
    assert not allows((), "gpt-4o-mini")
    assert [valid_pattern(p) for p in ("a", "a/*", "*", "a*", "*/x", "", " a", "/*")] == [
        True, True, True, False, False, False, False, False,
    ]  # fmt: skip


def test_the_models_list_is_filtered_and_other_answers_are_left_alone() -> None:
    from tests.support.keys import client_key

    key = client_key("k", "u")
    import attrs

    limited = attrs.evolve(key, models=("gpt-4o-mini", "openai/*"))
    answer_ = json.dumps(
        {"object": "list", "data": [{"id": "gpt-4o-mini"}, {"id": "openai/o1"}, {"id": "x"}]}
    ).encode()
    ids = [m["id"] for m in json.loads(visible_models(answer_, limited))["data"]]
    assert ids == ["gpt-4o-mini", "openai/o1"]
    assert visible_models(answer_, key) is answer_  # no list: unchanged
    assert visible_models(b"not json", limited) == b"not json"


# --- the admin API: keys ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_key_lifecycle_through_the_admin_api(setup: Tenancy) -> None:
    status, team = await setup.admin("POST", "/admin/teams", {"name": "research", "rpm": 100})
    assert status == 201 and team["id"].startswith("team_") and team["active_keys"] == 0
    status, created = await setup.admin(
        "POST",
        "/admin/keys",
        {
            "user": "alice",
            "alias": "alice-laptop",
            "team_id": team["id"],
            "rpm": 60,
            "budget_usd": 5,
            "budget_period": "month",
            "models": ["gpt-4o-mini", "openai/*"],
            "expires_in": "30d",
            "metadata": {"cost_center": "42"},
        },
    )
    assert status == 201
    secret = created.pop("secret")
    assert secret.startswith("sk-mpc-")
    assert created["expires_at"] == "2027-01-02T10:00:00.000Z"
    assert created["budget_resets_at"] == "2027-01-01T00:00:00.000Z"
    assert created["budget_period_start"] == "2026-12-01T00:00:00.000Z"
    assert created["spend_usd"] == 0 and created["budget_remaining_usd"] == 5
    assert created["state"] == "active" and created["team_name"] == "research"
    assert created["models"] == ["gpt-4o-mini", "openai/*"]
    assert created["metadata"] == {"cost_center": "42"}

    # The secret works at once, and is never shown again.
    assert (await setup.chat(secret))[0] == 200
    status, shown = await setup.admin("GET", f"/admin/keys/{created['id']}")
    assert status == 200 and "secret" not in shown and secret not in json.dumps(shown)
    # The chat's cost (3 + 1 tokens at the price table's rate), stored before it is read.
    assert 0 < shown["spend_usd"] < 0.001
    assert shown["budget_remaining_usd"] == pytest.approx(5 - shown["spend_usd"])

    status, changed = await setup.admin(
        "PATCH", f"/admin/keys/{created['id']}", {"rpm": None, "models": None, "metadata": {}}
    )
    assert status == 200
    assert (changed["rpm"], changed["models"], changed["metadata"]) == (None, None, {})
    assert changed["alias"] == "alice-laptop" and changed["budget_usd"] == 5

    status, revoked = await setup.admin("DELETE", f"/admin/keys/{created['id']}")
    assert status == 200 and revoked["state"] == "revoked" and revoked["revoked_at"]
    # Seen by this process at once (its cached row is dropped).
    code, document, _ = await setup.chat(secret)
    assert code == 401 and "revoked" in document["message"]
    # Revoking again keeps the first time; changing a revoked key is a conflict.
    status, again = await setup.admin("DELETE", f"/admin/keys/{created['id']}")
    assert status == 200 and again["revoked_at"] == revoked["revoked_at"]
    status, refused = await setup.admin("PATCH", f"/admin/keys/{created['id']}", {"rpm": 1})
    assert status == 409 and "revoked" in refused["message"]


@pytest_twisted.ensureDeferred
async def test_listing_filters_and_pages(setup: Tenancy) -> None:
    _, team = await setup.admin("POST", "/admin/teams", {"name": "ops"})
    ids = []
    for user in ("alice", "bob", "alice", "carol"):
        body: dict[str, Any] = {"user": user}
        if user != "bob":
            body["team_id"] = team["id"]
        _, key = await setup.admin("POST", "/admin/keys", body)
        ids.append(key["id"])
    # Oldest first (keys made in the same millisecond in id order).
    _, everything = await setup.admin("GET", "/admin/keys")
    order = [k["id"] for k in everything["data"]]
    assert sorted(order) == sorted(ids) and everything["has_more"] is False
    status, page = await setup.admin("GET", "/admin/keys?limit=3")
    assert status == 200 and [k["id"] for k in page["data"]] == order[:3]
    assert page["has_more"] is True and page["next_offset"] == 3
    _, rest = await setup.admin("GET", "/admin/keys?limit=3&offset=3")
    assert [k["id"] for k in rest["data"]] == order[3:] and rest["has_more"] is False
    assert rest["next_offset"] is None
    alice = [i for i in order if i in (ids[0], ids[2])]
    _, alices = await setup.admin("GET", "/admin/keys?user=alice")
    assert [k["id"] for k in alices["data"]] == alice
    _, of_team = await setup.admin("GET", f"/admin/keys?team_id={team['id']}&user=alice")
    assert [k["id"] for k in of_team["data"]] == alice
    _, of_team = await setup.admin("GET", f"/admin/keys?team_id={team['id']}")
    assert ids[1] not in [k["id"] for k in of_team["data"]] and len(of_team["data"]) == 3
    _, teams = await setup.admin("GET", "/admin/teams")
    assert [t["name"] for t in teams["data"]] == ["ops"] and teams["data"][0]["active_keys"] == 3
    for document in page["data"]:
        assert "secret" not in document and "key_hash" not in document


@pytest_twisted.ensureDeferred
async def test_rotation_keeps_the_old_secret_for_its_grace_period_only(setup: Tenancy) -> None:
    _, created = await setup.admin("POST", "/admin/keys", {"user": "dora"})
    old = created["secret"]
    assert (await setup.chat(old))[0] == 200
    status, rotated = await setup.admin(
        "POST", f"/admin/keys/{created['id']}/rotate", {"grace_seconds": 60}
    )
    assert status == 200 and rotated["id"] == created["id"]
    new = rotated["secret"]
    assert new != old and rotated["previous_secret_valid_until"] == "2026-12-03T10:01:00.000Z"
    assert (await setup.chat(new))[0] == 200
    assert (await setup.chat(old))[0] == 200  # within the grace period
    setup.clock.advance(61)
    code, document, _ = await setup.chat(old)
    assert code == 401 and document["error"]["code"] == "key_rotated"
    assert (await setup.chat(new))[0] == 200

    # The default grace is 0: the old secret stops at once (in this process).
    status, again = await setup.admin("POST", f"/admin/keys/{created['id']}/rotate")
    assert status == 200 and again["previous_secret_valid_until"] is None
    assert (await setup.chat(new))[0] == 401
    assert (await setup.chat(again["secret"]))[0] == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "user"),
        ({"user": ""}, "user"),
        ({"user": 7}, "user"),
        ({"user": "a", "colour": "red"}, "colour"),
        ({"user": "a", "rpm": -1}, "rpm"),
        ({"user": "a", "rpm": 1.5}, "rpm"),
        ({"user": "a", "tpm": True}, "tpm"),
        ({"user": "a", "budget_usd": -2}, "budget_usd"),
        ({"user": "a", "budget_usd": "5"}, "budget_usd"),
        ({"user": "a", "budget_period": "year"}, "budget_period"),
        ({"user": "a", "models": "gpt-4o"}, "models"),
        ({"user": "a", "models": ["gpt-*"]}, "models"),
        ({"user": "a", "models": [3]}, "models"),
        ({"user": "a", "expires_at": "tomorrow"}, "expires_at"),
        ({"user": "a", "expires_at": "2027-01-01T00:00:00"}, "expires_at"),
        ({"user": "a", "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
        ({"user": "a", "expires_at": 5}, "expires_at"),
        ({"user": "a", "expires_in": "soon"}, "expires_in"),
        ({"user": "a", "expires_in": 0}, "expires_in"),
        ({"user": "a", "expires_in": "1d", "expires_at": "2027-01-01T00:00:00Z"}, "expires_in"),
        ({"user": "a", "metadata": [1]}, "metadata"),
        ({"user": "a", "metadata": {"x": "y" * 9000}}, "metadata"),
        ({"user": "a", "alias": "has space"}, "alias"),
        ({"user": "a", "alias": ""}, "alias"),
        ({"user": "a", "team_id": "team_nothere"}, "team_id"),
        ([1, 2], None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_every_bad_key_field_is_400_naming_it(
    setup: Tenancy, body: Any, field: str | None
) -> None:
    status, document = await setup.admin("POST", "/admin/keys", body)
    assert status == 400, document
    assert set(document) == {"error", "message", "request_id"}
    assert document["error"]["param"] == field
    if field is not None:
        assert field in document["message"]
    _, listed = await setup.admin("GET", "/admin/keys")
    assert listed["data"] == []  # nothing was made


@pytest.mark.parametrize(
    ("method", "path", "raw", "field"),
    [
        ("POST", "/admin/keys", b"{not json", None),
        ("POST", "/admin/teams", b"", None),
        ("GET", "/admin/keys?limit=0", None, "limit"),
        ("GET", "/admin/keys?limit=many", None, "limit"),
        ("GET", "/admin/keys?offset=-1", None, "offset"),
        ("GET", "/admin/keys?owner=x", None, "owner"),
        ("GET", "/admin/teams?limit=501", None, "limit"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_bodies_and_queries_are_400(
    sqlite_setup: Tenancy, method: str, path: str, raw: bytes | None, field: str | None
) -> None:
    status, document, _ = await sqlite_setup.send(method, path, raw=raw)
    assert status == 400 and document["error"]["param"] == field
    if field is not None:
        assert field in document["message"]


@pytest_twisted.ensureDeferred
async def test_bad_rotation_and_team_inputs_are_400(setup: Tenancy) -> None:
    _, key = await setup.admin("POST", "/admin/keys", {"user": "erin"})
    for grace in (-1, "1h", 10**9, True):
        status, document = await setup.admin(
            "POST", f"/admin/keys/{key['id']}/rotate", {"grace_seconds": grace}
        )
        assert status == 400 and document["error"]["param"] == "grace_seconds"
    for body, field in [
        ({"rpm": -1}, "rpm"),
        ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
        ({"team_id": "team_x"}, "team_id"),
        ({"owner": "x"}, "owner"),
        ({"user": ""}, "user"),
        ({"models": "*"}, "models"),
    ]:
        status, document = await setup.admin("PATCH", f"/admin/keys/{key['id']}", body)
        assert status == 400 and document["error"]["param"] == field, (body, document)
        assert field in document["message"]
    _, unchanged = await setup.admin("GET", f"/admin/keys/{key['id']}")
    assert (unchanged["rpm"], unchanged["user"], unchanged["models"]) == (None, "erin", None)
    _, team = await setup.admin("POST", "/admin/teams", {"name": "patched"})
    status, document = await setup.admin("PATCH", f"/admin/teams/{team['id']}", {"rpm": "x"})
    assert status == 400 and document["error"]["param"] == "rpm"
    for body, field in [
        ({}, "name"),
        ({"name": " "}, "name"),
        ({"name": "t", "tpm": -5}, "tpm"),
        ({"name": "t", "models": ["a*b"]}, "models"),
        ({"name": "t", "budget_period": "hour"}, "budget_period"),
        ({"name": "t", "user": "x"}, "user"),
    ]:
        status, document = await setup.admin("POST", "/admin/teams", body)
        assert status == 400 and document["error"]["param"] == field, (body, document)
        assert field in document["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/keys/key_nothere"),
        ("PATCH", "/admin/keys/key_nothere"),
        ("DELETE", "/admin/keys/key_nothere"),
        ("POST", "/admin/keys/key_nothere/rotate"),
        ("GET", "/admin/teams/team_nothere"),
        ("PATCH", "/admin/teams/team_nothere"),
        ("DELETE", "/admin/teams/team_nothere"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_unknown_ids_are_404(setup: Tenancy, method: str, path: str) -> None:
    body = {} if method in ("PATCH", "POST") else None
    status, document = await setup.admin(method, path, body)
    assert status == 404 and "nothere" in document["message"]
    assert set(document) == {"error", "message", "request_id"}


@pytest_twisted.ensureDeferred
async def test_duplicates_and_forbidden_changes_are_409(setup: Tenancy) -> None:
    _, first = await setup.admin("POST", "/admin/keys", {"user": "a", "alias": "shared"})
    status, document = await setup.admin("POST", "/admin/keys", {"user": "b", "alias": "shared"})
    assert status == 409 and "shared" in document["message"]
    assert document["error"]["param"] == "alias"
    _, second = await setup.admin("POST", "/admin/keys", {"user": "b"})
    status, _ = await setup.admin("PATCH", f"/admin/keys/{second['id']}", {"alias": "shared"})
    assert status == 409
    # A key may keep (re-send) its own alias.
    status, _ = await setup.admin("PATCH", f"/admin/keys/{first['id']}", {"alias": "shared"})
    assert status == 200

    _, team = await setup.admin("POST", "/admin/teams", {"name": "blue"})
    status, document = await setup.admin("POST", "/admin/teams", {"name": "blue"})
    assert status == 409 and document["error"]["param"] == "name"
    await setup.admin("PATCH", f"/admin/keys/{second['id']}", {"team_id": team["id"]})
    status, document = await setup.admin("DELETE", f"/admin/teams/{team['id']}")
    assert status == 409 and "active key" in document["message"]
    await setup.admin("DELETE", f"/admin/keys/{second['id']}")
    status, document = await setup.admin("DELETE", f"/admin/teams/{team['id']}")
    assert status == 200 and document["deleted"] is True
    assert (await setup.admin("GET", f"/admin/teams/{team['id']}"))[0] == 404
    status, _ = await setup.admin("POST", f"/admin/keys/{second['id']}/rotate")
    assert status == 409  # a revoked key is not rotated


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin/keys"), ("POST", "/admin/keys"), ("PATCH", "/admin/teams/x")],
)
@pytest_twisted.ensureDeferred
async def test_the_admin_api_needs_the_admin_key(
    sqlite_setup: Tenancy, tmp_path: Path, method: str, path: str
) -> None:
    status, document, headers = await sqlite_setup.send(method, path, raw=b"{bad", token=None)
    assert status == 401 and headers.getRawHeaders(b"www-authenticate") == [b"Bearer"]
    status, _, _ = await sqlite_setup.send(method, path, {"user": "x"}, token="sk-mpc-nope")
    assert status == 401
    with database_url("sqlite", tmp_path / "closed") as url:
        (tmp_path / "closed").mkdir()
        closed = tenancy_harness(url, tmp_path, admin_key=None)
        status, document, _ = await closed.send(method, path, {"user": "x"})
        closed.close()
    assert status == 403 and "MPCAPI_ADMIN_KEY" in document["message"]


@pytest_twisted.ensureDeferred
async def test_the_admin_routes_are_in_the_openapi_document(sqlite_setup: Tenancy) -> None:
    status, document, _ = await sqlite_setup.send("GET", "/openapi.json", token=None)
    assert status == 200
    paths = document["paths"]
    assert set(paths["/admin/keys"]) == {"get", "post"}
    assert set(paths["/admin/keys/{key_id}"]) == {"get", "patch", "delete"}
    assert set(paths["/admin/keys/{key_id}/rotate"]) == {"post"}
    assert set(paths["/admin/teams/{team_id}"]) == {"get", "patch", "delete"}
    create = paths["/admin/keys"]["post"]
    assert create["security"] == [{"adminKey": []}] and create["tags"] == ["admin"]
    assert "requestBody" in create and {"201", "400", "409"} <= set(create["responses"])
    assert "404" in paths["/admin/keys/{key_id}"]["get"]["responses"]


# --- refusals on the hot path -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_expired_key_is_401_saying_so(setup: Tenancy) -> None:
    _, key = await setup.admin("POST", "/admin/keys", {"user": "fay", "expires_in": 3600})
    assert (await setup.chat(key["secret"]))[0] == 200
    setup.clock.advance(3599)
    assert (await setup.chat(key["secret"]))[0] == 200
    setup.clock.advance(1)
    code, document, headers = await setup.chat(key["secret"])
    assert code == 401 and headers.getRawHeaders(b"www-authenticate") == [b"Bearer"]
    assert document["error"]["code"] == "key_expired"
    assert document["message"] == f"client key {key['id']} expired at 2026-12-03T11:00:00.000Z"
    _, shown = await setup.admin("GET", f"/admin/keys/{key['id']}")
    assert shown["state"] == "expired"
    # Extending the expiry brings it back.
    status, _ = await setup.admin("PATCH", f"/admin/keys/{key['id']}", {"expires_at": None})
    assert status == 200 and (await setup.chat(key["secret"]))[0] == 200


@pytest_twisted.ensureDeferred
async def test_a_model_outside_the_key_or_team_list_is_403(setup: Tenancy) -> None:
    setup.harness.fake.routes[("GET", "/models")] = answer(
        200,
        {
            "object": "list",
            "data": [{"id": "gpt-4o-mini"}, {"id": "openai/gpt-4o"}, {"id": "claude-3"}],
        },
    )
    _, team = await setup.admin(
        "POST", "/admin/teams", {"name": "t", "models": ["openai/*", "gpt-4o-mini"]}
    )
    _, key = await setup.admin(
        "POST",
        "/admin/keys",
        {"user": "gus", "models": ["gpt-4o-mini", "claude-3"], "team_id": team["id"]},
    )
    secret = key["secret"]
    assert (await setup.chat(secret, "gpt-4o-mini"))[0] == 200
    code, document, _ = await setup.chat(secret, "openai/gpt-4o")  # the team's, not the key's
    assert code == 403
    assert set(document) == {"error", "message", "request_id"}
    assert document["error"]["code"] == "model_not_allowed"
    assert document["error"]["type"] == "permission_error"
    assert document["error"]["param"] == "model"
    assert key["id"] in document["message"]
    code, document, _ = await setup.chat(secret, "claude-3")  # the key's, not the team's
    assert code == 403 and team["id"] in document["message"]
    code, _, _ = await setup.chat(secret, "gpt-4o-mini,claude-3")  # every one must pass
    assert code == 403
    forwarded = [s for s in setup.harness.fake.seen if s.path == "/chat/completions"]
    assert len(forwarded) == 1  # refusals never reach LiteLLM
    # GET /models lists the models both lists allow.
    code, listed, _ = await setup.send("GET", "/api/models", token=secret)
    assert code == 200 and [m["id"] for m in listed["data"]] == ["gpt-4o-mini"]
    await setup.admin("PATCH", f"/admin/keys/{key['id']}", {"models": None})
    code, listed, _ = await setup.send("GET", "/v1/models", token=secret)
    assert [m["id"] for m in listed["data"]] == ["gpt-4o-mini", "openai/gpt-4o"]
    assert (await setup.chat(secret, "openai/gpt-4o"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_a_spent_team_budget_refuses_every_key_of_the_team(setup: Tenancy) -> None:
    _, team = await setup.admin("POST", "/admin/teams", {"name": "green", "budget_usd": 1})
    _, one = await setup.admin("POST", "/admin/keys", {"user": "a", "team_id": team["id"]})
    _, two = await setup.admin("POST", "/admin/keys", {"user": "b", "team_id": team["id"]})
    _, alone = await setup.admin("POST", "/admin/keys", {"user": "c"})
    spent(setup, one["id"], 0.6, START - 10, team["id"])
    assert (await setup.chat(two["secret"]))[0] == 200
    spent(setup, two["id"], 0.5, START - 5, team["id"])
    setup.clock.advance(6)  # past the spend cache
    for key in (one, two):
        code, document, _ = await setup.chat(key["secret"])
        assert code == 429 and document["error"]["code"] == "insufficient_quota"
        assert f"team {team['id']} (green)" in document["message"]
    assert (await setup.chat(alone["secret"]))[0] == 200
    _, shown = await setup.admin("GET", f"/admin/teams/{team['id']}")
    assert shown["spend_usd"] == pytest.approx(1.1) and shown["budget_remaining_usd"] == 0


@pytest_twisted.ensureDeferred
async def test_the_team_rate_limit_applies_on_top_of_the_keys(setup: Tenancy) -> None:
    _, team = await setup.admin("POST", "/admin/teams", {"name": "small", "rpm": 2})
    keys = [
        (await setup.admin("POST", "/admin/keys", {"user": u, "team_id": team["id"]}))[1]
        for u in ("a", "b")
    ]
    assert (await setup.chat(keys[0]["secret"]))[0] == 200
    assert (await setup.chat(keys[1]["secret"]))[0] == 200
    code, document, headers = await setup.chat(keys[1]["secret"])
    assert code == 429 and document["error"]["code"] == "rate_limit_exceeded"
    assert "team small's rate limit of 2 requests per minute" in document["message"]
    assert headers.getRawHeaders(b"retry-after")
    setup.clock.advance(60)
    assert (await setup.chat(keys[0]["secret"]))[0] == 200


@pytest_twisted.ensureDeferred
async def test_the_team_tokens_limit_counts_every_keys_tokens(setup: Tenancy) -> None:
    _, team = await setup.admin("POST", "/admin/teams", {"name": "tokens", "tpm": 5})
    one, two = [
        (await setup.admin("POST", "/admin/keys", {"user": u, "team_id": team["id"]}))[1]
        for u in ("a", "b")
    ]
    assert (await setup.chat(one["secret"]))[0] == 200  # 4 tokens (3 + 1)
    assert (await setup.chat(two["secret"]))[0] == 200  # 8: the window is full now
    code, document, _ = await setup.chat(one["secret"])
    assert code == 429
    assert "team tokens's rate limit of 5 tokens per minute" in document["message"]
    setup.clock.advance(60)
    assert (await setup.chat(two["secret"]))[0] == 200


@pytest_twisted.ensureDeferred
async def test_a_period_budget_resets_at_the_period_boundary(setup: Tenancy) -> None:
    _, key = await setup.admin(
        "POST", "/admin/keys", {"user": "hal", "budget_usd": 1, "budget_period": "day"}
    )
    spent(setup, key["id"], 0.7, START - 9 * 3600)  # today, 01:00
    spent(setup, key["id"], 5.0, START - DAY)  # yesterday: another period
    assert (await setup.chat(key["secret"]))[0] == 200
    spent(setup, key["id"], 0.4, START + 1)
    setup.clock.advance(6)
    code, document, headers = await setup.chat(key["secret"])
    assert code == 429
    assert "resets at 2026-12-04T00:00:00.000Z (daily budget)" in document["message"]
    assert "$1.1000" in document["message"] and "of $1 used" in document["message"]
    assert headers.getRawHeaders(b"retry-after") == [str(14 * 3600 - 6).encode()]
    _, shown = await setup.admin("GET", f"/admin/keys/{key['id']}")
    assert shown["spend_usd"] == pytest.approx(1.1, abs=1e-4)  # the chat cost a little
    assert shown["budget_resets_at"] == "2026-12-04T00:00:00.000Z"
    # The clock passes midnight: a new period, nothing spent in it yet.
    setup.clock.advance(14 * 3600)
    assert (await setup.chat(key["secret"]))[0] == 200
    _, shown = await setup.admin("GET", f"/admin/keys/{key['id']}")
    assert shown["spend_usd"] == pytest.approx(0, abs=1e-4)
    assert shown["budget_period_start"] == "2026-12-04T00:00:00.000Z"
    # Without a period the same key's budget counts everything.
    await setup.admin("PATCH", f"/admin/keys/{key['id']}", {"budget_period": None})
    code, document, headers = await setup.chat(key["secret"])
    assert code == 429 and "resets" not in document["message"]
    assert headers.getRawHeaders(b"retry-after") is None


@pytest_twisted.ensureDeferred
async def test_usage_rows_carry_the_team_and_count_for_it(setup: Tenancy) -> None:
    setup.harness.fake.routes[("POST", "/chat/completions")] = answer(
        200, COMPLETION, {"x-litellm-response-cost": "0.25"}
    )
    _, team = await setup.admin("POST", "/admin/teams", {"name": "paid", "budget_usd": 0.5})
    _, key = await setup.admin("POST", "/admin/keys", {"user": "ivy", "team_id": team["id"]})
    assert (await setup.chat(key["secret"]))[0] == 200
    assert (await setup.chat(key["secret"]))[0] == 200
    # Not stored yet: this process's own rows count for the team at once.
    assert (await setup.chat(key["secret"]))[0] == 429
    await setup.store()
    rows = setup.db.sync.run(
        lambda cursor: cursor.execute(
            "SELECT key_id, team_id FROM usage WHERE status = 200"
        ).fetchall()
    )
    assert rows == [(key["id"], team["id"])] * 2
    _, shown = await setup.admin("GET", f"/admin/teams/{team['id']}")
    assert shown["spend_usd"] == pytest.approx(0.5)


# --- the CLI runs the same operations ----------------------------------------------------------


def without_clock(document: dict[str, Any]) -> dict[str, Any]:
    """A document without what depends on when it was read (the CLI reads the real clock)."""
    clocked = ("budget_period_start", "budget_resets_at")
    return {name: value for name, value in document.items() if name not in clocked}


def cli(url: str, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    import contextlib
    import os

    old = os.environ.get("MPCAPI_DATABASE_URL")
    os.environ["MPCAPI_DATABASE_URL"] = url
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = admin_main(list(args))
            except SystemExit as exit:  # argparse refuses the command line
                code = int(exit.code or 0)
    finally:
        if old is None:
            del os.environ["MPCAPI_DATABASE_URL"]
        else:
            os.environ["MPCAPI_DATABASE_URL"] = old
    return code, out.getvalue(), err.getvalue()


@pytest_twisted.ensureDeferred
async def test_the_cli_and_the_api_agree(setup: Tenancy) -> None:
    url = setup.db.url
    code, out, err = cli(url, "teams", "create", "--name", "cli-team", "--rpm", "7",
                         "--budget", "3", "--budget-period", "week", "--json")  # fmt: skip
    assert code == 0, err
    team = json.loads(out)
    code, out, err = cli(
        url, "keys", "create", "--user", "jo", "--team", team["id"], "--models",
        "gpt-4o-mini,openai/*", "--expires-in", "30d", "--alias", "jo-1",
        "--budget-period", "month", "--budget", "2", "--metadata", '{"a": 1}',
    )  # fmt: skip
    assert code == 0, err
    first, secret = out.splitlines()
    key_id = first.split()[1]
    assert "team=" + team["id"] in first and "models='gpt-4o-mini,openai/*'" in first
    # The API shows what the CLI made, the same document the CLI prints.
    _, by_api = await setup.admin("GET", f"/admin/keys/{key_id}")
    code, out, _ = cli(url, "keys", "show", key_id)
    assert code == 0 and without_clock(json.loads(out)) == without_clock(by_api)
    assert by_api["alias"] == "jo-1" and by_api["models"] == ["gpt-4o-mini", "openai/*"]
    assert by_api["team_id"] == team["id"] and by_api["metadata"] == {"a": 1}
    assert by_api["budget_period"] == "month" and by_api["budget_usd"] == 2
    # The CLI's clock is the real one; the expiry is 30 days from when it ran.
    expires = datetime.fromisoformat(by_api["expires_at"]).timestamp()
    assert abs(expires - (time.time() + 30 * DAY)) < 60
    _, team_by_api = await setup.admin("GET", f"/admin/teams/{team['id']}")
    code, out, _ = cli(url, "teams", "show", team["id"])
    assert code == 0 and without_clock(json.loads(out)) == without_clock(team_by_api)
    assert team_by_api["active_keys"] == 1 and team_by_api["rpm"] == 7

    # Changes made by the API are seen by the CLI, and the other way round.
    await setup.admin("PATCH", f"/admin/keys/{key_id}", {"rpm": 9})
    code, out, _ = cli(url, "keys", "list", "--team", team["id"])
    assert code == 0 and "rpm=9" in out and key_id in out
    code, out, err = cli(url, "keys", "update", key_id, "--models", "*", "--tpm", "100")
    assert code == 0, err
    _, by_api = await setup.admin("GET", f"/admin/keys/{key_id}")
    assert by_api["models"] == ["*"] and by_api["tpm"] == 100 and by_api["rpm"] == 9
    code, out, err = cli(url, "keys", "rotate", key_id, "--grace", "1h")
    assert code == 0, err
    new_secret = out.splitlines()[1]
    assert new_secret.startswith("sk-mpc-") and new_secret != secret
    # The CLI's errors are the API's: a bad field, an unknown id, a duplicate.
    code, _, err = cli(url, "keys", "update", key_id, "--budget-period", "year")
    assert code == 2 and "budget-period" in err
    code, _, err = cli(url, "keys", "show", "key_nothere")
    assert code == 1 and "no key with id 'key_nothere'" in err
    code, _, err = cli(url, "keys", "create", "--user", "x", "--alias", "jo-1")
    assert code == 1 and "alias 'jo-1' is taken" in err
    code, _, err = cli(url, "teams", "delete", team["id"])
    assert code == 1 and "active key" in err
    code, out, _ = cli(url, "keys", "revoke", key_id)
    assert code == 0
    assert (await setup.admin("GET", f"/admin/keys/{key_id}"))[1]["state"] == "revoked"
    code, out, err = cli(url, "teams", "delete", team["id"])
    assert code == 0, err
    assert setup.db.sync.run(key_by_id, key_id).team_id is None


def test_tenancy_functions_take_the_clock_they_are_given(tmp_path: Path) -> None:
    from mpcapi.storage.database import SyncDatabase

    database = SyncDatabase(f"sqlite:///{tmp_path / 't.db'}")
    database.migrate()
    try:
        made = database.run(tenancy.create_key, {"user": "k", "expires_in": "1h"}, START)
        assert made["expires_at"] == "2026-12-03T11:00:00.000Z"
        later = database.run(tenancy.get_key, made["id"], START + 3600)
        assert later["state"] == "expired"
        with pytest.raises(tenancy.InvalidInputError) as bad:
            database.run(tenancy.update_key, made["id"], {"expires_at": "2026-12-03T10:30:00Z"},
                         START + 3600)  # fmt: skip
        assert bad.value.field == "expires_at" and "future" in bad.value.message
    finally:
        database.close()


def test_the_cli_lists_an_expired_key_as_expired(tmp_path: Path) -> None:
    from mpcapi.storage.database import SyncDatabase

    url = f"sqlite:///{tmp_path / 'e.db'}"
    database = SyncDatabase(url)
    database.migrate()
    long_ago = 1_000_000_000.0  # 2001: the key expired long before the CLI's clock
    made = database.run(tenancy.create_key, {"user": "old", "expires_in": "1h"}, long_ago)
    database.close()
    code, out, _ = cli(url, "keys", "list")
    assert code == 0 and f"{made['id']}  user=old" in out and " expired " in out
    assert "expires 2001-09-09T02:46:40.000Z" in out
