"""/metrics and /api/stats of a real daemon with two workers: known traffic spread over both
workers shows its exact totals, whichever worker answers the scrape."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .harness import Daemon, wait_until

ADMIN = "admin-key-for-metrics-tests"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}
EMBEDDING = {"model": "text-embedding-3-small", "input": "Hello!"}


def call(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"content-type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


def get(url: str, token: str | None = ADMIN) -> tuple[int, bytes]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(daemon.url + "/metrics")
    assert status == 200, body
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def served_by(daemon: Daemon) -> set[str]:
    return {
        worker
        for worker in ("[worker 1]", "[worker 2]")
        if any(worker in line and "POST /api/" in line for line in daemon.log_text().splitlines())
    }


def test_two_workers_show_the_exact_totals_of_known_traffic(
    start_mpcapi: Callable[..., Daemon],
) -> None:
    daemon = start_mpcapi(MPCAPI_WORKERS="2", MPCAPI_ADMIN_KEY=ADMIN)
    chats = embeddings = invalid = 0
    prompt = completion = 0
    cost = 0.0

    def one_chat(_: int) -> tuple[int, Any, Any]:
        return call(daemon.api_base + "/chat/completions", CHAT)

    for _ in range(10):  # the kernel picks the worker; a few bursts reach both
        with ThreadPoolExecutor(max_workers=24) as pool:
            answers = list(pool.map(one_chat, range(24)))
        for status, headers, document in answers:
            assert status == 200, document
            chats += 1
            prompt += document["usage"]["prompt_tokens"]
            completion += document["usage"]["completion_tokens"]
            cost += float(headers.get("x-litellm-response-cost") or 0)
        status, _, _ = call(daemon.url + "/v1/embeddings", EMBEDDING)
        assert status == 200
        embeddings += 1
        status, _, _ = call(daemon.api_base + "/chat/completions", {**CHAT, "temperature": 5})
        assert status == 400
        invalid += 1
        if wait_until(lambda: served_by(daemon) == {"[worker 1]", "[worker 2]"}, 1):
            break
    assert served_by(daemon) == {"[worker 1]", "[worker 2]"}

    for _ in range(6):  # whichever worker answers, the totals are every worker's
        samples = scrape(daemon)

        def value(name: str, samples: Any = samples, **labels: str) -> float:
            return float(samples.get((name, tuple(sorted(labels.items()))), 0.0))

        chat_200 = dict(route="/chat/completions", method="POST", status="200")
        assert value("mpcapi_requests_total", **chat_200, model="gpt-4o-mini") == chats
        embedded = dict(route="/embeddings", method="POST", status="200")
        assert value("mpcapi_requests_total", **embedded, model="text-embedding-3-small") == (
            embeddings
        )
        chat_400 = dict(route="/chat/completions", method="POST", status="400")
        assert value("mpcapi_requests_total", **chat_400, model="") == invalid
        assert value("mpcapi_tokens_total", model="gpt-4o-mini", type="prompt") == prompt
        assert value("mpcapi_tokens_total", model="gpt-4o-mini", type="completion") == completion
        if cost:
            assert abs(value("mpcapi_cost_usd_total", model="gpt-4o-mini") - cost) < 1e-9
        durations = value("mpcapi_request_duration_seconds_count", route="/chat/completions")
        assert durations == chats + invalid
        assert value("mpcapi_upstream_duration_seconds_count", route="/chat/completions") == chats
        assert value("mpcapi_inflight_requests") == 1  # this scrape
        pids = {dict(labels).get("pid") for name, labels in samples if name.startswith("process_")}
        assert len(pids) == 2, pids  # process metrics of both workers

    status, body = get(daemon.url + "/api/stats")
    assert status == 200
    stats = json.loads(body)
    assert stats["workers"] == 2
    assert stats["totals"]["requests"] == chats + embeddings + invalid
    assert stats["totals"]["errors_4xx"] == invalid
    assert stats["totals"]["prompt_tokens"] >= prompt  # embeddings count their prompt tokens
    assert stats["models"]["gpt-4o-mini"]["requests"] == chats
    assert len(stats["errors"]) == min(invalid, 20)
    assert {error["status"] for error in stats["errors"]} == {400}


def test_metrics_guard_on_a_real_daemon(start_mpcapi: Callable[..., Daemon]) -> None:
    closed = start_mpcapi()
    assert get(closed.url + "/metrics", token=None)[0] == 403
    guarded = start_mpcapi(MPCAPI_ADMIN_KEY=ADMIN)
    assert get(guarded.url + "/metrics", token=None)[0] == 401
    assert get(guarded.url + "/metrics", token="wrong")[0] == 401
    assert get(guarded.url + "/metrics")[0] == 200
    public = start_mpcapi(MPCAPI_ADMIN_KEY=ADMIN, MPCAPI_METRICS_PUBLIC="true")
    status, body = get(public.url + "/metrics", token=None)
    assert status == 200 and b"process_cpu_seconds_total" in body
    assert get(public.url + "/api/stats", token=None)[0] == 401


def test_a_stream_counts_its_time_to_first_byte_and_usage(
    start_mpcapi: Callable[..., Daemon],
) -> None:
    daemon = start_mpcapi(MPCAPI_ADMIN_KEY=ADMIN)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(
        daemon.api_base + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        events = [line for line in response.read().decode().splitlines() if line]
    chunks = [json.loads(line[len("data: ") :]) for line in events if line.startswith("data: {")]
    usage = next(chunk["usage"] for chunk in reversed(chunks) if chunk.get("usage"))
    samples = scrape(daemon)
    route = (("route", "/chat/completions"),)
    assert samples[("mpcapi_time_to_first_byte_seconds_count", route)] == 1
    assert samples[("mpcapi_time_to_first_byte_seconds_sum", route)] > 0
    prompt = (("model", "gpt-4o-mini"), ("type", "prompt"))
    assert samples[("mpcapi_tokens_total", prompt)] == usage["prompt_tokens"]
    ok = (("method", "POST"), ("model", "gpt-4o-mini"), ("route", "/chat/completions"))
    assert samples[("mpcapi_requests_total", (*ok, ("status", "200")))] == 1
