"""/metrics, /api/stats and the dashboard's files, in memory: families and values after known
traffic, the admin guard, bounded labels, the ring of recent errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from mpcapi.metrics.errorring import ErrorRing
from mpcapi.metrics.labels import route_of
from mpcapi.metrics.metrics import MODEL_LABEL_LIMIT, Metrics
from mpcapi.metrics.summary import quantile
from tests.support.exchanges import exchange
from tests.support.gateway import CHAT, COMPLETION, Harness, answer, make_harness

ADMIN = "admin-secret-1"
BEARER = {"Authorization": f"Bearer {ADMIN}"}
NOW = 1_795_000_000


def observed(**overrides: Any) -> Harness:
    """The shared harness with an admin key, its clock at a known time."""
    return make_harness(now=NOW, **{"admin_key": ADMIN, **overrides})


async def scrape(o: Harness) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    response = await o.get("/metrics", headers=BEARER)
    assert response.code == 200, await response.text()
    text = (await response.content()).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def stats_of(o: Harness) -> Any:
    response = await o.get("/api/stats", headers=BEARER)
    assert response.code == 200
    return json.loads(await response.content())


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))


async def known_traffic(o: Harness) -> None:
    """3 chats (3+1 tokens, $0.001 each), 1 embedding, 1 schema violation, 1 unknown route,
    1 chat that LiteLLM fails with a 500, and a health check."""
    o.fake.routes[("POST", "/chat/completions")] = answer(
        200, COMPLETION, {"x-litellm-response-cost": "0.001"}
    )
    for _ in range(3):
        assert (await o.post("/api/chat/completions", CHAT)).code == 200
    embedding = {"model": "text-embedding-3-small", "input": "hi"}
    assert (await o.post("/v1/embeddings", embedding)).code == 200
    assert (await o.post("/api/chat/completions", {**CHAT, "temperature": 5})).code == 400
    assert (await o.get("/api/nothing-here")).code == 404
    o.fake.routes[("POST", "/chat/completions")] = answer(500, {"error": "down"})
    failed = await o.post("/api/chat/completions", CHAT, headers={"x-request-id": "req-failed"})
    assert failed.code == 502
    assert (await o.get("/health")).code == 200


# --- the families after known traffic --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_metric_families_count_known_traffic_exactly() -> None:
    o = observed()
    await known_traffic(o)
    samples = await scrape(o)

    def requests(route: str, method: str, status: str, model: str) -> float:
        key = labels(route=route, method=method, status=status, model=model)
        return samples.get(("mpcapi_requests_total", key), 0)

    assert requests("/chat/completions", "POST", "200", "gpt-4o-mini") == 3
    assert requests("/embeddings", "POST", "200", "text-embedding-3-small") == 1
    # A body that fails validation has no model yet; the failed chat counts under the model,
    # which LiteLLM served before (see the capping test for models it never served).
    assert requests("/chat/completions", "POST", "400", "") == 1
    assert requests("/chat/completions", "POST", "502", "gpt-4o-mini") == 1
    assert requests("other", "GET", "404", "") == 1
    assert requests("/health", "GET", "200", "") == 1
    assert samples[("mpcapi_tokens_total", labels(model="gpt-4o-mini", type="prompt"))] == 9
    assert samples[("mpcapi_tokens_total", labels(model="gpt-4o-mini", type="completion"))] == 3
    assert samples[("mpcapi_cost_usd_total", labels(model="gpt-4o-mini"))] == pytest.approx(0.003)
    duration = ("mpcapi_request_duration_seconds_count", labels(route="/chat/completions"))
    assert samples[duration] == 5
    upstream = ("mpcapi_upstream_duration_seconds_count", labels(route="/chat/completions"))
    assert samples[upstream] == 4  # the schema violation never reached LiteLLM
    assert samples[("mpcapi_upstream_errors_total", labels(kind="status_5xx"))] == 1
    for kind in ("unreachable", "timeout", "key_refused", "broken"):
        assert samples[("mpcapi_upstream_errors_total", labels(kind=kind))] == 0
    assert samples[("mpcapi_inflight_requests", ())] == 1  # the scrape itself
    assert samples[("mpcapi_ratelimited_total", ())] == 0
    assert samples[("mpcapi_redis_failures_total", ())] == 0
    assert samples[("mpcapi_redis_outages_total", ())] == 0
    assert samples[("mpcapi_usage_rows_refused_total", ())] == 0
    assert samples[("mpcapi_cache_requests_total", labels(result="hit"))] == 0
    assert ("process_cpu_seconds_total", ()) in samples
    assert ("process_resident_memory_bytes", ()) in samples


@pytest_twisted.ensureDeferred
async def test_metrics_speak_openmetrics_when_asked() -> None:
    o = observed()
    response = await o.get(
        "/metrics", headers={**BEARER, "Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith(
        "application/openmetrics-text"
    )
    assert (await response.content()).endswith(b"# EOF\n")
    plain = await o.get("/metrics", headers=BEARER)
    assert plain.headers.getRawHeaders("content-type")[0].startswith("text/plain")


def test_streams_cache_and_rate_limits_feed_their_families() -> None:
    metrics = Metrics(Clock())
    base = {"method": "POST", "path": "/api/chat/completions", "route": "/chat/completions"}
    stream = {**base, "status": 200, "duration_ms": 900.0, "model": "gpt-4o-mini"}
    metrics.observe(exchange(**{**stream, "upstream_status": 200, "ttfb_ms": 120.0, "events": 5}))
    metrics.observe(exchange(**{**stream, "upstream_status": 200, "ttfb_ms": 80.0, "events": 2,
                     "outcome": "upstream_error"}))  # fmt: skip
    metrics.observe(
        exchange(**{**stream, "upstream_status": 200, "events": 0, "outcome": "timeout"})
    )
    metrics.observe(exchange(**{**base, "status": 200, "duration_ms": 1.0, "cache": "hit"}))
    metrics.observe(exchange(**{**base, "status": 200, "duration_ms": 1.0, "cache": "miss"}))
    metrics.observe(exchange(**{**base, "status": 429, "duration_ms": 1.0, "rate_limited": True}))
    metrics.observe(
        exchange(**{**base, "status": 502, "duration_ms": 1.0, "upstream_failure": "unreachable"})
    )
    value = metrics.registry.get_sample_value
    ttfb = {"route": "/chat/completions"}
    assert value("mpcapi_time_to_first_byte_seconds_count", ttfb) == 2
    assert value("mpcapi_time_to_first_byte_seconds_sum", ttfb) == pytest.approx(0.2)
    assert value("mpcapi_upstream_errors_total", {"kind": "broken"}) == 1
    assert value("mpcapi_upstream_errors_total", {"kind": "timeout"}) == 1
    assert value("mpcapi_upstream_errors_total", {"kind": "unreachable"}) == 1
    assert value("mpcapi_cache_requests_total", {"result": "hit"}) == 1
    assert value("mpcapi_cache_requests_total", {"result": "miss"}) == 1
    assert value("mpcapi_cache_requests_total", {"result": "bypass"}) == 0
    assert value("mpcapi_ratelimited_total") == 1


def test_redis_failures_and_outages_are_counted() -> None:
    metrics = Metrics(Clock())
    for began_outage in (True, False, False, True):
        metrics.redis_failed(began_outage)
    value = metrics.registry.get_sample_value
    assert value("mpcapi_redis_failures_total") == 4
    assert value("mpcapi_redis_outages_total") == 2


# --- the guard --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_without_an_admin_key_metrics_and_stats_are_closed() -> None:
    o = observed(admin_key="")
    for path in ("/metrics", "/api/stats"):
        response = await o.get(path, headers=BEARER)
        assert response.code == 403
        document = json.loads(await response.content())
        assert document["error"]["code"] == "forbidden"
        assert "MPCAPI_ADMIN_KEY" in document["message"]


@pytest_twisted.ensureDeferred
async def test_metrics_and_stats_need_the_admin_key() -> None:
    o = observed()
    for path in ("/metrics", "/api/stats"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN}):
            response = await o.get(path, headers=headers)
            assert response.code == 401, (path, headers)
            assert response.headers.getRawHeaders("www-authenticate")
            assert json.loads(await response.content())["error"]["code"] == "invalid_api_key"
        assert (await o.get(path, headers=BEARER)).code == 200


@pytest_twisted.ensureDeferred
async def test_metrics_public_opens_metrics_only() -> None:
    for admin_key in ("", ADMIN):
        o = observed(admin_key=admin_key, metrics_public=True)
        response = await o.get("/metrics")
        assert response.code == 200
        assert b"mpcapi_requests_total" in await response.content()
        assert (await o.get("/api/stats")).code in (401, 403)


# --- bounded labels ---------------------------------------------------------------------------


def test_model_labels_are_capped_and_only_served_models_get_one() -> None:
    metrics = Metrics(Clock())
    base = {"method": "POST", "path": "/api/chat/completions", "route": "/chat/completions"}
    for number in range(MODEL_LABEL_LIMIT + 10):
        served = {"status": 200, "duration_ms": 1, "upstream_status": 200}
        metrics.observe(exchange(**base, **served, model=f"model-{number}"))
    metrics.observe(exchange(**{**base, "status": 404, "duration_ms": 1, "model": "made-up",
                     "upstream_status": 404}))  # fmt: skip
    metrics.observe(exchange(**{**base, "status": 200, "duration_ms": 1, "model": "model-3",
                     "upstream_status": 200}))  # fmt: skip
    models = {
        sample.labels["model"]
        for family in metrics.registry.collect()
        if family.name == "mpcapi_requests"
        for sample in family.samples
        if sample.name == "mpcapi_requests_total"
    }
    assert len(models) == MODEL_LABEL_LIMIT + 1
    assert "other" in models and "made-up" not in models and "model-55" not in models
    value = metrics.registry.get_sample_value
    other = {"route": "/chat/completions", "method": "POST", "model": "other"}
    assert value("mpcapi_requests_total", {**other, "status": "200"}) == 10
    assert value("mpcapi_requests_total", {**other, "status": "404"}) == 1
    known = {"route": "/chat/completions", "method": "POST", "status": "200", "model": "model-3"}
    assert value("mpcapi_requests_total", known) == 2


def test_routes_and_methods_are_operations_not_raw_input() -> None:
    assert route_of(exchange(**{"route": "/chat/completions", "path": "/v1/chat/completions"})) == (
        "/chat/completions"
    )
    assert (
        route_of(exchange(**{"route": None, "path": "/v1/chat/completions"})) == "/chat/completions"
    )
    assert route_of(exchange(**{"route": None, "path": "/api/embeddings"})) == "/embeddings"
    assert route_of(exchange(**{"route": None, "path": "/health/ready"})) == "/health/ready"
    assert route_of(exchange(**{"route": None, "path": "/dashboard/dashboard.js"})) == "/dashboard"
    assert route_of(exchange(**{"route": None, "path": "/api/x/" + "y" * 500})) == "other"
    assert route_of(exchange(**{"route": None, "path": "/wp-login.php"})) == "other"
    metrics = Metrics(Clock())
    metrics.observe(
        exchange(**{"method": "BREW", "path": "/coffee", "status": 405, "duration_ms": 1})
    )
    value = metrics.registry.get_sample_value("mpcapi_requests_total", {
        "route": "other", "method": "other", "status": "405", "model": ""})  # fmt: skip
    assert value == 1


# --- /api/stats -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stats_sum_up_known_traffic() -> None:
    o = observed()
    await known_traffic(o)
    await o.get("/metrics", headers=BEARER)  # admin and health traffic is not API traffic
    stats = await stats_of(o)
    assert stats["now"] == NOW
    assert stats["workers"] == 1
    totals = stats["totals"]
    assert totals["requests"] == 7
    assert totals["errors_4xx"] == 2
    assert totals["errors_5xx"] == 1
    assert totals["prompt_tokens"] == 9
    assert totals["completion_tokens"] == 3
    assert totals["cost_usd"] == pytest.approx(0.003)
    assert totals["inflight"] == 1
    chat = stats["models"]["gpt-4o-mini"]
    assert chat["requests"] == 4 and chat["errors"] == 1
    assert stats["models"]["(none)"] == {"requests": 2, "errors": 2, "prompt_tokens": 0,
                                         "completion_tokens": 0, "cost_usd": 0.0}  # fmt: skip
    assert stats["models"]["text-embedding-3-small"]["requests"] == 1
    assert stats["users"]["anonymous"]["requests"] == 7
    assert stats["upstream_errors"]["status_5xx"] == 1
    assert stats["latency"]["count"] == 7
    assert stats["latency"]["p50_ms"] is not None
    assert [error["status"] for error in stats["errors"]] == [502, 404, 400]
    failed = stats["errors"][0]
    assert failed["request_id"] == "req-failed"
    assert failed["upstream_failure"] == "status_5xx"
    assert failed["path"] == "/api/chat/completions"
    assert failed["model"] == "gpt-4o-mini"


def test_stats_tell_users_and_top_keys_apart() -> None:
    metrics = Metrics(Clock())
    base = {
        "method": "POST",
        "path": "/api/chat/completions",
        "route": "/chat/completions",
        "status": 200,
        "duration_ms": 5,
        "model": "gpt-4o-mini",
        "upstream_status": 200,
    }
    for _ in range(3):
        metrics.observe(exchange(**{**base, "user": "alice", "key_id": "k1", "prompt_tokens": 10,
                         "completion_tokens": 5, "cost_usd": 0.5}))  # fmt: skip
    metrics.observe(exchange(**{**base, "user": "bob", "key_id": "k2", "prompt_tokens": 1,
                     "completion_tokens": 1, "cost_usd": 0.25}))  # fmt: skip
    stats = metrics.stats()
    assert stats["users"]["alice"] == {"requests": 3, "errors": 0, "prompt_tokens": 30,
                                       "completion_tokens": 15, "cost_usd": 1.5}  # fmt: skip
    assert stats["users"]["bob"]["cost_usd"] == 0.25
    assert stats["top_keys"] == [
        {"key_id": "k1", "user": "alice", "requests": 3, "tokens": 45, "cost_usd": 1.5},
        {"key_id": "k2", "user": "bob", "requests": 1, "tokens": 2, "cost_usd": 0.25},
    ]


def test_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.1)
    assert quantile(buckets, 0.7) == pytest.approx(0.3)
    assert quantile(buckets, 0.95) == pytest.approx(0.75)
    assert quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5) is None
    assert quantile([(0.1, 0.0), (float("inf"), 4.0)], 0.5) == 0.1


# --- the ring of recent errors ----------------------------------------------------------------


def test_error_ring_keeps_the_latest_and_reads_back_from_files(tmp_path: Any) -> None:
    ring = ErrorRing.in_memory()
    for number in range(ErrorRing.SLOTS + 36):
        ring.append({"time": number, "status": 500})
    times = sorted(record["time"] for record in ring.records())
    assert times == list(range(36, ErrorRing.SLOTS + 36))
    ring.append({"path": "x" * 5000})  # too long: dropped, nothing corrupted
    assert len(ring.records()) == ErrorRing.SLOTS
    first = ErrorRing.in_directory(str(tmp_path), 101)
    second = ErrorRing.in_directory(str(tmp_path), 102)
    first.append({"time": 1, "worker": 1})
    second.append({"time": 2, "worker": 2})
    found = ErrorRing.read_directory(str(tmp_path))
    assert sorted(record["worker"] for record in found) == [1, 2]


# --- the dashboard's files --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_dashboard_files_are_served_without_a_key() -> None:
    o = observed()
    page = await o.get("/dashboard/")
    assert page.code == 200
    assert page.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    assert "script-src 'self'" in page.headers.getRawHeaders("content-security-policy")[0]
    html = (await page.content()).decode()
    assert 'src="uPlot.iife.min.js"' in html and 'id="login"' in html
    for name, kind in (
        ("dashboard.js", "text/javascript"),
        ("uPlot.iife.min.js", "text/javascript"),
        ("dashboard.css", "text/css"),
        ("uPlot.LICENSE", "text/plain"),
    ):
        response = await o.get(f"/dashboard/{name}")
        assert response.code == 200, name
        assert response.headers.getRawHeaders("content-type")[0].startswith(kind)
        await response.content()
    redirect = await o.get("/dashboard", allow_redirects=False)
    assert redirect.code == 301
    assert redirect.headers.getRawHeaders("location") == ["/dashboard/"]
    assert (await o.get("/dashboard/../setup.py")).code == 404
    assert (await o.get("/dashboard/secret.txt")).code == 404
