"""The dashboard's summary: rates, latency quantiles, tokens and cost, by route, model, user
and key, from the collected families."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import Metric

from mpcapi.metrics.labels import CACHE_RESULTS, UPSTREAM_FAILURES, is_api_traffic

# The dashboard's own families: in the multiprocess directory with the rest, never exported.
DASHBOARD_PREFIX = "mpcapi_dashboard_"
TOP_KEYS = 10


def new_entry() -> dict[str, Any]:
    return {
        "requests": 0,
        "errors": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": 0.0,
    }


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``(le, count)`` buckets."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def summarize(
    families: Iterable[Metric], now: float, errors: list[dict[str, Any]], workers: int
) -> dict[str, Any]:
    totals = {
        "requests": 0,
        "errors_4xx": 0,
        "errors_5xx": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": 0.0,
        "ratelimited": 0,
        "inflight": 0,
    }
    models: dict[str, dict[str, Any]] = {}
    users: dict[str, dict[str, Any]] = {}
    keys: dict[str, dict[str, Any]] = {}
    routes: dict[str, int] = {}
    buckets: dict[float, float] = {}
    latency = {"count": 0.0, "sum": 0.0}
    cache = dict.fromkeys(CACHE_RESULTS, 0)
    upstream_errors = dict.fromkeys(UPSTREAM_FAILURES, 0)

    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "mpcapi_requests_total":
                route, status = labels["route"], int(labels["status"])
                if not is_api_traffic(route):
                    continue
                routes[route] = routes.get(route, 0) + int(value)
                totals["requests"] += int(value)
                model = models.setdefault(labels["model"] or "(none)", new_entry())
                model["requests"] += int(value)
                if status >= 400:
                    model["errors"] += int(value)
                    totals["errors_4xx" if status < 500 else "errors_5xx"] += int(value)
            elif name == "mpcapi_tokens_total":
                model = models.setdefault(labels["model"] or "(none)", new_entry())
                model[labels["type"] + "_tokens"] += int(value)
                totals[labels["type"] + "_tokens"] += int(value)
            elif name == "mpcapi_cost_usd_total":
                models.setdefault(labels["model"] or "(none)", new_entry())["cost_usd"] += value
                totals["cost_usd"] += value
            elif name.startswith("mpcapi_request_duration_seconds") and is_api_traffic(
                labels["route"]
            ):
                if name.endswith("_bucket"):
                    bound = float(labels["le"])
                    buckets[bound] = buckets.get(bound, 0) + value
                elif name.endswith("_count"):
                    latency["count"] += value
                elif name.endswith("_sum"):
                    latency["sum"] += value
            elif name == "mpcapi_inflight_requests":
                totals["inflight"] += int(value)
            elif name == "mpcapi_ratelimited_total":
                totals["ratelimited"] += int(value)
            elif name == "mpcapi_cache_requests_total":
                cache[labels["result"]] = cache.get(labels["result"], 0) + int(value)
            elif name == "mpcapi_upstream_errors_total":
                upstream_errors[labels["kind"]] = upstream_errors.get(labels["kind"], 0) + int(
                    value
                )
            elif name == DASHBOARD_PREFIX + "user_requests_total":
                users.setdefault(labels["user"], new_entry())["requests"] += int(value)
            elif name == DASHBOARD_PREFIX + "user_tokens_total":
                users.setdefault(labels["user"], new_entry())[labels["type"] + "_tokens"] += int(
                    value
                )
            elif name == DASHBOARD_PREFIX + "user_cost_usd_total":
                users.setdefault(labels["user"], new_entry())["cost_usd"] += value
            elif name == DASHBOARD_PREFIX + "key_requests_total":
                key = keys.setdefault(labels["key_id"], {"tokens": 0, "cost_usd": 0.0})
                key["requests"] = key.get("requests", 0) + int(value)
                key["user"] = labels["user"]
            elif name == DASHBOARD_PREFIX + "key_tokens_total":
                keys.setdefault(labels["key_id"], {"tokens": 0, "cost_usd": 0.0})["tokens"] += int(
                    value
                )
            elif name == DASHBOARD_PREFIX + "key_cost_usd_total":
                keys.setdefault(labels["key_id"], {"tokens": 0, "cost_usd": 0.0})["cost_usd"] += (
                    value
                )

    cumulative = sorted(buckets.items())
    p50, p95 = quantile(cumulative, 0.5), quantile(cumulative, 0.95)
    top_keys = sorted(
        ({"key_id": key_id, "requests": 0, **values} for key_id, values in keys.items()),
        key=lambda entry: (-entry["requests"], entry["key_id"]),
    )[:TOP_KEYS]
    return {
        "now": now,
        "workers": workers,
        "totals": totals,
        "routes": routes,
        "latency": {
            "count": int(latency["count"]),
            "sum_seconds": latency["sum"],
            "p50_ms": None if p50 is None else round(p50 * 1000, 2),
            "p95_ms": None if p95 is None else round(p95 * 1000, 2),
            "buckets": [
                [bound if bound != float("inf") else "+Inf", count] for bound, count in cumulative
            ],
        },
        "models": models,
        "users": users,
        "top_keys": top_keys,
        "cache": cache,
        "upstream_errors": upstream_errors,
        "errors": errors,
    }
