"""Ownership of stored objects on both databases: claimed once, checked by the provider id
inside LiteLLM's ids, lists cut to the caller's."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from mpcapi.errors import ApiError
from mpcapi.policy.ownership import Ownership
from mpcapi.storage.database import Database
from tests.support.databases import database_url


@pytest.fixture(params=["sqlite", "postgresql"])
def ownership(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ownership]:
    with database_url(request.param, tmp_path) as url:
        database = Database(url, reactor)
        try:
            yield Ownership(database)
        finally:
            database.close()


def litellm_file_id(raw: str) -> str:
    text = f"litellm:{raw};model,standin-gpt"
    return "file-" + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest_twisted.ensureDeferred
async def test_the_first_owner_stays_and_others_get_404(ownership: Ownership) -> None:
    await ownership.claim("file", "file-1", "key_a")
    await ownership.claim("file", "file-1", "key_b")  # ignored: the first owner stays
    await ownership.check("file", "file-1", "key_a")
    await ownership.check("file", litellm_file_id("file-1"), "key_a")  # the same file
    for kind, object_id, owner in [
        ("file", "file-1", "key_b"),
        ("batch", "file-1", "key_a"),  # owners are per kind
        ("file", "file-unknown", "key_a"),  # nobody's
    ]:
        with pytest.raises(ApiError) as refused:
            await ownership.check(kind, object_id, owner)
        assert refused.value.status == 404
        assert object_id in refused.value.message


@pytest_twisted.ensureDeferred
async def test_a_list_keeps_the_callers_objects_only(ownership: Ownership) -> None:
    await ownership.claim("file", "file-1", "key_a")
    await ownership.claim("file", "file-2", "key_b")
    await ownership.claim("file", "file-3", "key_a")
    listing = {
        "object": "list",
        "data": [{"id": "file-1"}, {"id": litellm_file_id("file-2")}, {"id": "file-3"}, "odd"],
        "first_id": "file-1",
        "last_id": "file-3",
        "has_more": False,
    }
    mine = await ownership.only_owned("file", listing, "key_a")
    assert [item["id"] for item in mine["data"]] == ["file-1", "file-3"]
    assert (mine["first_id"], mine["last_id"], mine["has_more"]) == ("file-1", "file-3", False)
    theirs = await ownership.only_owned("file", listing, "key_b")
    assert [item["id"] for item in theirs["data"]] == [litellm_file_id("file-2")]
    nobodys = await ownership.only_owned("file", listing, "key_c")
    assert nobodys["data"] == [] and nobodys["first_id"] is None
    assert await ownership.only_owned("file", {"error": "x"}, "key_a") == {"error": "x"}
