"""Rate limits and the response cache, for real: twistd daemons in front of the real LiteLLM,
driven by the openai SDK; two daemons sharing one Redis and one PostgreSQL (limits, cache,
usage ledger); a Redis that goes away and comes back."""

from __future__ import annotations

import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import psycopg
import pytest
from openai import OpenAI

from mpcapi.policy.limits import LEASE_SECONDS
from tests.support.databases import postgres_schema
from tests.support.ports import free_port
from tests.support.redisserver import REDIS_SERVER, SHARED_REDIS_URL, RedisServer

from .harness import HELLO, MOCK_TEXT, Daemon, answered_500
from .test_usage_ledger import ADMIN, usage

StartDaemon = Callable[..., Daemon]


def sdk(daemon: Daemon) -> OpenAI:
    return OpenAI(base_url=daemon.api_base, api_key="unused", max_retries=0, timeout=30)


def chat(daemon: Daemon, content: str = "Hello!", **headers: str) -> Any:
    """A raw chat call: the parsed completion is ``.parse()``, the headers ``.headers``."""
    return sdk(daemon).chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": content}],
        extra_headers=headers or None,
    )


def redis_metrics(daemon: Daemon) -> dict[str, float]:
    """The mpcapi_redis_* samples of the daemon's /metrics."""
    request = urllib.request.Request(
        daemon.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    text = urllib.request.urlopen(request, timeout=5).read().decode()
    return {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in text.splitlines())
        if name.startswith("mpcapi_redis_")
    }


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in the shared Redis; its keys are deleted afterwards."""
    prefix = f"mpcapi-test:{uuid.uuid4().hex}:"
    yield prefix
    keys = subprocess.run(
        ["redis-cli", "--scan", "--pattern", prefix + "*"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout.split()
    if keys:
        subprocess.run(["redis-cli", "del", *keys], capture_output=True, timeout=10, check=False)


def test_the_sdk_gets_rate_limit_error_and_the_headers(start_mpcapi: StartDaemon) -> None:
    daemon = start_mpcapi(MPCAPI_DEFAULT_RPM="3")
    answers = [chat(daemon) for _ in range(3)]
    assert [a.parse().choices[0].message.content for a in answers] == [MOCK_TEXT] * 3
    assert [a.headers["x-ratelimit-limit-requests"] for a in answers] == ["3"] * 3
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0"]
    assert answers[0].headers["x-ratelimit-reset-requests"] in ("1m0s", "59s")

    with pytest.raises(openai.RateLimitError) as raised:
        sdk(daemon).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    error = raised.value
    assert error.status_code == 429
    document = error.response.json()
    assert document["error"]["code"] == "rate_limit_exceeded"
    assert document["message"].startswith("rate limit of 3 requests per minute reached")
    assert document["request_id"] == error.response.headers["x-request-id"]
    retry_after = int(error.response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert 0 < int(error.response.headers["retry-after-ms"]) <= 60_000
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    log = daemon.wait_for_log("rate_limited")
    assert " 429 " in log


def test_tokens_per_minute_from_the_real_usage(start_mpcapi: StartDaemon) -> None:
    daemon = start_mpcapi(MPCAPI_DEFAULT_TPM="25")  # the mock model's answer uses 30 tokens
    first = chat(daemon)
    assert first.headers["x-ratelimit-remaining-tokens"] == "25"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the tokens are counted once the request is logged
        try:
            chat(daemon)
        except openai.RateLimitError as error:
            assert error.response.headers["x-ratelimit-remaining-tokens"] == "0"
            break
        time.sleep(0.05)
    else:
        pytest.fail("the tokens limit never refused")


def test_the_cache_answers_a_repeated_request(start_mpcapi: StartDaemon) -> None:
    daemon = start_mpcapi(MPCAPI_CACHE_TTL="60")
    first = chat(daemon, "cache me")
    second = chat(daemon, "cache me")
    assert (first.headers["x-mpcapi-cache"], second.headers["x-mpcapi-cache"]) == ("miss", "hit")
    assert second.parse().id == first.parse().id
    bypass = chat(daemon, "cache me", **{"Cache-Control": "no-cache"})
    assert bypass.headers["x-mpcapi-cache"] == "bypass"
    # A stream of a cached answer is replayed, and the SDK reads it like any stream.
    chunks = list(
        sdk(daemon).chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "cache me"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == MOCK_TEXT
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == bypass.parse().usage.total_tokens


def test_two_daemons_share_one_limit_one_cache_and_one_ledger(
    start_mpcapi: StartDaemon, redis_prefix: str
) -> None:
    """Two daemons on the shared Redis and PostgreSQL (a key prefix and a schema of this
    test's own): a miss on one is a hit on the other; an RPM of N admits N requests in all,
    however many arrive at once on either daemon; and one ledger holds the rows of both,
    whose totals either daemon reports."""
    rpm = 20
    with postgres_schema() as database_url:
        shared = {
            "MPCAPI_REDIS_URL": SHARED_REDIS_URL,
            "MPCAPI_REDIS_PREFIX": redis_prefix,
            "MPCAPI_DEFAULT_RPM": str(rpm),
            "MPCAPI_CACHE_TTL": "60",
            "MPCAPI_DATABASE_URL": database_url,
            "MPCAPI_ADMIN_KEY": ADMIN,
        }
        daemons = {"one": start_mpcapi(**shared), "two": start_mpcapi(**shared)}
        sent: list[str] = []

        def ask(name: str, content: str, tag: str) -> Any:
            sent.append(f"scale-{name}-{tag}")
            return chat(daemons[name], content, **{"x-request-id": sent[-1]})

        question = f"shared {uuid.uuid4().hex}"
        first = ask("one", question, "first")
        assert first.headers["x-mpcapi-cache"] == "miss"
        time.sleep(0.3)  # daemon one stores the answer in the background
        second = ask("two", question, "second")
        assert second.headers["x-mpcapi-cache"] == "hit"
        assert second.parse().id == first.parse().id
        assert second.headers["x-ratelimit-remaining-requests"] == str(rpm - 2)  # one limit

        # The rest of the limit: 2 * rpm requests at once, alternating between the daemons.
        def attempt(n: int) -> tuple[str, int]:
            name = ("one", "two")[n % 2]
            try:
                ask(name, f"burst {n}", f"burst-{n}")
            except openai.RateLimitError:
                return name, 429
            return name, 200

        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(attempt, range(2 * rpm), timeout=120))
        statuses = Counter(status for _, status in answers)
        assert statuses == {200: rpm - 2, 429: rpm + 2}, statuses
        assert {name for name, status in answers if status == 200} == {"one", "two"}
        assert {name for name, status in answers if status == 429} == {"one", "two"}
        for name in daemons:
            with pytest.raises(openai.RateLimitError):
                ask(name, question, "after")

        # One ledger: every request of both daemons, refusals included, once.
        expected = {"requests": len(sent), "errors": rpm + 4}

        def totals(name: str) -> dict[str, Any]:
            report: dict[str, Any] = usage(daemons[name])["totals"]
            return {key: report[key] for key in expected}

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and totals("one") != expected:
            time.sleep(0.2)
        assert totals("one") == totals("two") == expected
        with psycopg.connect(database_url) as connection:
            stored = [row[0] for row in connection.execute("SELECT request_id FROM usage")]
        assert sorted(stored) == sorted(sent)
        assert {request_id.split("-")[1] for request_id in stored} == {"one", "two"}


def test_each_daemon_knows_what_the_shared_cache_holds(
    start_mpcapi: StartDaemon, redis_prefix: str
) -> None:
    """Each daemon's index of the answers in Redis: filled by a scan when it starts, then by
    the other daemon's announcements. Once it is complete a daemon trusts it, so these hits
    come only through it: an answer stored before the second daemon started (the scan), and
    one the first daemon stored afterwards (the announcement)."""
    shared = {
        "MPCAPI_REDIS_URL": SHARED_REDIS_URL,
        "MPCAPI_REDIS_PREFIX": redis_prefix,
        "MPCAPI_CACHE_TTL": "60",
    }
    one = start_mpcapi(**shared)
    before, after, never = (f"index {uuid.uuid4().hex}" for _ in range(3))
    assert chat(one, before).headers["x-mpcapi-cache"] == "miss"
    time.sleep(0.3)  # stored in the background
    two = start_mpcapi(**shared)
    assert chat(two, "warm up").headers["x-mpcapi-cache"] == "miss"  # its index starts
    time.sleep(0.5)  # subscribed and scanned
    assert chat(two, before).headers["x-mpcapi-cache"] == "hit"
    first = chat(one, after)
    assert first.headers["x-mpcapi-cache"] == "miss"
    time.sleep(0.3)
    second = chat(two, after)
    assert second.headers["x-mpcapi-cache"] == "hit"
    assert second.parse().id == first.parse().id
    assert chat(two, never).headers["x-mpcapi-cache"] == "miss"


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
def test_a_redis_outage_keeps_requests_flowing_and_recovers(start_mpcapi: StartDaemon) -> None:
    server = RedisServer(free_port())
    server.start()
    try:
        daemon = start_mpcapi(
            MPCAPI_REDIS_URL=server.url,
            MPCAPI_DEFAULT_RPM="10000",
            MPCAPI_CACHE_TTL="60",
            MPCAPI_ADMIN_KEY=ADMIN,
        )
        assert chat(daemon, "before").headers["x-ratelimit-remaining-requests"] == "9999"
        time.sleep(0.3)
        assert chat(daemon, "before").headers["x-mpcapi-cache"] == "hit"

        server.stop()
        # High limits are admitted here for LEASE_SECONDS after Redis last answered: past it,
        # every admission needs Redis.
        time.sleep(LEASE_SECONDS * 2)
        during = []
        for n in range(10):
            started = time.monotonic()
            answer = chat(daemon, f"during {n}")
            during.append(time.monotonic() - started)
            assert answer.parse().choices[0].message.content == MOCK_TEXT
            assert "x-ratelimit-remaining-requests" not in answer.headers  # served unlimited
            assert answer.headers["x-mpcapi-cache"] == "miss"
        assert max(during[1:]) < 1.0  # only the first request noticed, then no waiting
        log = daemon.wait_for_log("is unavailable")
        assert log.count("is unavailable") == 1
        assert not answered_500(log)
        counted = redis_metrics(daemon)
        assert counted["mpcapi_redis_outages_total"] == 1
        assert counted["mpcapi_redis_failures_total"] >= 10  # each request's limit and lookup

        server.start()  # an empty Redis again, on the same port
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            answer = chat(daemon, "after")
            if "x-ratelimit-remaining-requests" in answer.headers:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the limits never came back with Redis")
        assert answer.headers["x-ratelimit-remaining-requests"] == "9999"
        log = daemon.wait_for_log("available again")
        assert log.count("available again") == 1
        assert log.count("is unavailable") == 1
        status = urllib.request.urlopen(daemon.url + "/health", timeout=5).status
        assert status == 200
        assert redis_metrics(daemon)["mpcapi_redis_outages_total"] == 1
    finally:
        server.stop()
