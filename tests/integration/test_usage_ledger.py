"""The usage ledger of a real daemon in front of the real LiteLLM mock models: rows and totals
after known traffic (SQLite, the shared PostgreSQL), and a PostgreSQL of the test's own that is
stopped mid-traffic and started again: every request ends up in the ledger exactly once."""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest

from mpcapi.storage.database import SyncDatabase
from mpcapi.storage.keys import create_key
from tests.support.databases import own_postgres, postgres_schema

from .harness import HELLO, Daemon

ADMIN = "admin-ledger-secret"
CHAT_MODEL = "gpt-4o-mini"


def usage(daemon: Daemon, query: str = "group_by=model") -> dict[str, Any]:
    request = urllib.request.Request(
        f"{daemon.url}/api/usage?{query}", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        document: dict[str, Any] = json.loads(response.read())
        return document


def sdk(daemon: Daemon, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.api_base, api_key=key, max_retries=0, timeout=30)


def known_traffic(client: openai.OpenAI, tag: str) -> dict[str, int]:
    """3 chats, 2 streams (one asking for usage, one not), 1 embedding, 1 invalid request;
    the tokens the client can see."""
    prompt = completion = 0
    for n in range(3):
        answer = client.chat.completions.create(
            model=CHAT_MODEL, messages=HELLO, extra_headers={"x-request-id": f"{tag}-chat-{n}"}
        )
        assert answer.usage is not None
        prompt += answer.usage.prompt_tokens
        completion += answer.usage.completion_tokens
    asked = list(
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-request-id": f"{tag}-stream-usage"},
        )
    )
    assert asked[-1].usage is not None
    prompt += asked[-1].usage.prompt_tokens
    completion += asked[-1].usage.completion_tokens
    plain = list(
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=HELLO,
            stream=True,
            extra_headers={"x-request-id": f"{tag}-stream-plain"},
        )
    )
    # The usage chunk MPC-API asked for is not shown to a client that did not ask.
    assert all(chunk.usage is None and chunk.choices for chunk in plain)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in plain)
    assert text == "".join(c.choices[0].delta.content or "" for c in asked if c.choices)
    # The same request: the same tokens as the stream that asked.
    prompt += asked[-1].usage.prompt_tokens
    completion += asked[-1].usage.completion_tokens
    client.embeddings.create(
        model="text-embedding-3-small", input="Hi", extra_headers={"x-request-id": f"{tag}-emb"}
    )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=HELLO,
            temperature=5,
            extra_headers={"x-request-id": f"{tag}-bad"},
        )
    return {"prompt_tokens": prompt, "completion_tokens": completion}


def check_totals(report: dict[str, Any], expected: dict[str, int]) -> None:
    groups = {group["group"]: group for group in report["groups"]}
    chat = groups[CHAT_MODEL]
    assert chat["requests"] == 5 and chat["errors"] == 0
    assert chat["prompt_tokens"] == expected["prompt_tokens"]
    assert chat["completion_tokens"] == expected["completion_tokens"]
    assert chat["cost_usd"] > 0
    assert groups["text-embedding-3-small"]["requests"] == 1


def test_rows_and_totals_on_sqlite(start_mpcapi: Callable[..., Daemon], tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    daemon = start_mpcapi(MPCAPI_DATABASE_URL=f"sqlite:///{path}", MPCAPI_ADMIN_KEY=ADMIN)
    with sdk(daemon) as client:
        expected = known_traffic(client, "lite")
    check_totals(usage(daemon), expected)
    with sqlite3.connect(path) as connection:
        rows = {
            row[0]: row[1:]
            for row in connection.execute(
                "SELECT request_id, status, cost_source, outcome, ttfb_ms, completion_tokens "
                "FROM usage WHERE request_id LIKE 'lite-%'"
            )
        }
    assert sorted(rows) == sorted(
        f"lite-{name}"
        for name in ("chat-0", "chat-1", "chat-2", "stream-usage", "stream-plain", "emb", "bad")
    )
    assert rows["lite-chat-0"][:2] == (200, "litellm")
    assert rows["lite-bad"][:2] == (400, "none")
    status, source, outcome, ttfb, completion = rows["lite-stream-plain"]
    assert (status, outcome) == (200, "completed") and ttfb is not None and completion > 0
    assert source in ("litellm", "price_table")


def test_rows_and_totals_on_postgresql_with_keys(start_mpcapi: Callable[..., Daemon]) -> None:
    with postgres_schema() as url:
        database = SyncDatabase(url)
        database.migrate()
        _, alice = database.run(create_key, "alice")
        _, carol = database.run(create_key, "carol", budget_usd=0.0)
        database.close()
        daemon = start_mpcapi(MPCAPI_DATABASE_URL=url, MPCAPI_ADMIN_KEY=ADMIN, MPCAPI_AUTH="keys")
        with sdk(daemon, alice) as client:
            expected = known_traffic(client, "pg")
        by_model = usage(daemon)
        check_totals(by_model, expected)
        by_user = {g["group"]: g for g in usage(daemon, "group_by=user")["groups"]}
        assert by_user["alice"]["requests"] == 7
        assert by_user["alice"]["prompt_tokens"] == by_model["totals"]["prompt_tokens"]
        assert by_user["alice"]["cost_usd"] == pytest.approx(by_model["totals"]["cost_usd"])
        by_key = usage(daemon, "group_by=key")["groups"]
        assert [g["requests"] for g in by_key if g["group"] is not None] == [7]
        # A key whose budget is spent (0 here) gets 429, on HTTP and on the WebSocket.
        with sdk(daemon, carol) as client, pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
        assert "budget" in refused.value.response.json()["message"]
        from websockets.sync.client import connect

        ws_url = daemon.url.replace("http://", "ws://", 1) + "/api/ws"
        headers = {"Authorization": f"Bearer {carol}"}
        with connect(ws_url, open_timeout=30, additional_headers=headers) as connection:
            body = {"model": CHAT_MODEL, "messages": HELLO}
            connection.send(json.dumps({"id": "1", "type": "chat.completions", "body": body}))
            answer = json.loads(connection.recv(timeout=30))
        assert (answer["type"], answer["status"]) == ("error", 429)
        assert "budget" in answer["message"]


def test_a_nul_in_a_model_name_is_stored_and_holds_back_nothing(
    start_mpcapi: Callable[..., Daemon],
) -> None:
    """PostgreSQL text cannot hold NUL, and a client may put one in a model name: its row is
    stored with U+FFFD instead, and the rows after it are stored too."""
    with postgres_schema() as url:
        daemon = start_mpcapi(MPCAPI_DATABASE_URL=url, MPCAPI_ADMIN_KEY=ADMIN)
        with sdk(daemon) as client:
            with pytest.raises(openai.BadRequestError):  # LiteLLM knows no such model
                client.chat.completions.create(model="gpt\u0000x", messages=HELLO)
            client.chat.completions.create(model=CHAT_MODEL, messages=HELLO)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and usage(daemon)["totals"]["requests"] < 2:
            time.sleep(0.2)
        groups = {g["group"]: g["requests"] for g in usage(daemon)["groups"]}
        assert groups == {"gpt\ufffdx": 1, CHAT_MODEL: 1}
        assert "unreachable" not in daemon.log_text()


# --- a PostgreSQL of the test's own, stopped and started again ----------------------------------


def chat(client: openai.OpenAI, request_id: str, stream: bool) -> float:
    started = time.monotonic()
    if stream:
        chunks = list(
            client.chat.completions.create(
                model=CHAT_MODEL,
                messages=HELLO,
                stream=True,
                extra_headers={"x-request-id": request_id},
            )
        )
        assert chunks and all(chunk.usage is None for chunk in chunks)
    else:
        answer = client.chat.completions.create(
            model=CHAT_MODEL, messages=HELLO, extra_headers={"x-request-id": request_id}
        )
        assert answer.choices[0].message.content
    return time.monotonic() - started


def stored_ids(url: str) -> list[str]:
    with psycopg.connect(url, connect_timeout=5) as connection:
        rows = connection.execute(
            "SELECT request_id FROM usage WHERE request_id LIKE 'outage-%'"
        ).fetchall()
    return [row[0] for row in rows]


def test_postgresql_outage_loses_no_row_and_stores_none_twice(
    start_mpcapi: Callable[..., Daemon],
) -> None:
    with own_postgres() as server:
        url, stop, start = server.url, server.stop, server.start
        daemon = start_mpcapi(MPCAPI_DATABASE_URL=url, MPCAPI_ADMIN_KEY=ADMIN)
        sent: list[str] = []
        with sdk(daemon) as client:
            for n in range(6):
                sent.append(f"outage-before-{n}")
                chat(client, sent[-1], stream=n % 2 == 1)
            assert usage(daemon)["totals"]["requests"] >= 6
            stop()
            for n in range(10):
                sent.append(f"outage-during-{n}")
                assert chat(client, sent[-1], stream=n % 2 == 1) < 10
            log = daemon.wait_for_log("usage database unreachable", timeout=15)
            assert "usage database unreachable" in log
            start()
            for n in range(6):
                sent.append(f"outage-after-{n}")
                chat(client, sent[-1], stream=n % 2 == 1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ids = stored_ids(url)
            except psycopg.Error:
                ids = []
            if sorted(ids) == sorted(sent):
                break
            time.sleep(0.5)
        assert sorted(ids) == sorted(sent)
        assert len(ids) == len(set(ids))
        log = daemon.wait_for_log("usage database is back", timeout=10)
        assert log.count("usage database unreachable") == 1
        assert log.count("usage database is back") == 1
        try:
            usage(daemon)
        except urllib.error.URLError as error:  # pragma: no cover - diagnostics
            pytest.fail(f"GET /api/usage failed after the outage: {error}")


def test_websocket_requests_have_rows(start_mpcapi: Callable[..., Daemon], tmp_path: Path) -> None:
    from websockets.sync.client import connect

    path = tmp_path / "usage.db"
    daemon = start_mpcapi(MPCAPI_DATABASE_URL=f"sqlite:///{path}", MPCAPI_ADMIN_KEY=ADMIN)
    url = daemon.url.replace("http://", "ws://", 1) + "/api/ws"
    body = {"model": CHAT_MODEL, "messages": HELLO}
    with connect(url, open_timeout=30) as connection:
        connection.send(json.dumps({"id": "plain", "type": "chat.completions", "body": body}))
        asked = {**body, "stream_options": {"include_usage": True}}
        connection.send(json.dumps({"id": "asked", "type": "chat.completions", "body": asked}))
        chunks: dict[str, list[dict[str, Any]]] = {"plain": [], "asked": []}
        finished = 0
        while finished < 2:
            message = json.loads(connection.recv(timeout=30))
            if message["type"] == "chunk":
                chunks[message["id"]].append(message["data"])
            else:
                assert message["type"] == "done", message
                finished += 1
    # The usage chunk the ledger asked for is not relayed; the one the client asked for is.
    assert all(not chunk.get("usage") for chunk in chunks["plain"])
    usage_chunks = [chunk["usage"] for chunk in chunks["asked"] if chunk.get("usage")]
    assert usage_chunks
    report = usage(daemon, "group_by=model")
    groups = {group["group"]: group for group in report["groups"]}
    assert groups[CHAT_MODEL]["requests"] == 2
    assert groups[CHAT_MODEL]["prompt_tokens"] == 2 * usage_chunks[-1]["prompt_tokens"]
    with sqlite3.connect(path) as connection_db:
        rows = connection_db.execute(
            "SELECT method, route, status, outcome, cost_source FROM usage WHERE method = 'WS'"
        ).fetchall()
    assert len(rows) == 2
    assert {row[:4] for row in rows} == {("WS", "/chat/completions", 200, "completed")}
