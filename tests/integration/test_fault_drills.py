"""Fault drills under load: 16 clients (the openai SDK, no retries) send plain and streamed
chat requests through a real ``twistd -n mpcapi`` while LiteLLM, Redis or PostgreSQL is killed
(SIGKILL: no shutdown, every connection reset) and then started again on the same port.

Each drill records what every request saw (when it started and ended, how it ended) and checks:
who may fail and how (only what the dead service was needed for, in MPC-API's error shapes),
that no request hangs (each ends well within the client's timeout), and that traffic
recovers once the service is back. The single-request versions of these faults are in
test_upstream_faults.py, test_policy.py and test_usage_ledger.py."""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest

from tests.support.databases import own_postgres
from tests.support.ports import free_port
from tests.support.redisserver import REDIS_SERVER, RedisServer

from . import harness
from .harness import (
    LITELLM_CONFIG,
    LITELLM_MASTER_KEY,
    MOCK_TEXT,
    Daemon,
    DaemonLauncher,
    LiteLLMServer,
    answered_500,
    http_status,
    wait_until,
)

StartDaemon = Callable[..., Daemon]

CLIENTS = 16
CLIENT_TIMEOUT = 30.0  # the SDK's per-request timeout: no request may come near it
WARM_UP = 3.0  # seconds of traffic before a kill, all of which must succeed
OUTAGE = 5.0  # seconds of traffic while the service is down
FAST = 2.0  # a request to a daemon whose LiteLLM is down is answered within this
RECOVERY_TIMEOUT = 30.0  # after the service is back, traffic succeeds again within this
JOIN_TIMEOUT = CLIENT_TIMEOUT + 10.0

# The LiteLLM drill adds two mock models to etc/litellm/config.yaml: one that answers after
# 2 s (a request surely in flight at the kill) and one whose stream lasts a few seconds (a
# stream surely cut in the middle). LiteLLM cuts a mock answer into chunks of 3 characters.
SLOW_DELAY_SECONDS = 2
LONG_TEXT = "abcdefghi" * 700
DRILL_MODELS = f"""model_list:
  - model_name: mock-slow
    litellm_params:
      model: openai/gpt-4o-mini
      api_key: sk-mock-not-used
      mock_response: "{MOCK_TEXT}"
      mock_delay: {SLOW_DELAY_SECONDS}
    model_info:
      mode: chat
  - model_name: mock-long-stream
    litellm_params:
      model: openai/gpt-4o-mini
      api_key: sk-mock-not-used
      mock_response: "{LONG_TEXT}"
    model_info:
      mode: chat
"""


# --- the load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind of request: its model, whether it streams, the text it asks and must get."""

    name: str
    model: str = "gpt-4o-mini"
    stream: bool = False
    expected: str = MOCK_TEXT
    question: Callable[[str], str] = lambda request_id: "Hello!"


@dataclass(frozen=True)
class Outcome:
    """How one request ended. ``result``: ``ok`` (the whole expected answer), ``status`` (an
    HTTP error answer), ``stream_error`` (an SSE error event after the first chunk),
    ``broken`` (a wrong or cut answer), ``timeout`` or ``connection`` (the client gave up or
    lost the connection)."""

    kind: str
    request_id: str
    started: float
    ended: float
    result: str
    status: int | None = None
    body: Any = None
    chunks: int = 0
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


RECORDED_HEADERS = ("x-request-id", "x-mpcapi-cache", "x-ratelimit-remaining-requests")


@dataclass
class InFlight:
    kind: str
    started: float
    chunks: int = 0


def send(client: openai.OpenAI, kind: Kind, request_id: str, flight: InFlight) -> Outcome:
    """One request of ``kind``; never raises (every way it can end is an ``Outcome``)."""
    headers: dict[str, str] = {}

    def outcome(result: str, status: int | None = None, body: Any = None) -> Outcome:
        return Outcome(
            kind.name,
            request_id,
            flight.started,
            time.monotonic(),
            result,
            status,
            body,
            flight.chunks,
            headers,
        )

    try:
        raw = client.chat.completions.with_raw_response.create(
            model=kind.model,
            messages=[{"role": "user", "content": kind.question(request_id)}],
            stream=kind.stream,
            extra_headers={"x-request-id": request_id},
        )
        headers.update({n: raw.headers[n] for n in RECORDED_HEADERS if n in raw.headers})
        answer = raw.parse()
        if isinstance(answer, openai.Stream):
            parts = []
            for chunk in answer:
                flight.chunks += 1
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
            text = "".join(parts)
        else:
            text = answer.choices[0].message.content or ""
        return outcome("ok" if text == kind.expected else "broken", body=text[-80:])
    except openai.APITimeoutError:
        return outcome("timeout")
    except openai.APIConnectionError as error:
        return outcome("connection", body=repr(error.__cause__ or error))
    except openai.APIStatusError as error:
        try:
            body = error.response.json()
        except ValueError:
            body = error.response.text
        headers["x-request-id"] = error.response.headers.get("x-request-id", "")
        return outcome("status", error.status_code, body)
    except openai.APIError as error:  # an SSE error event: the SDK raises it mid-stream
        return outcome("stream_error", body=error.body)


class Traffic:
    """``CLIENTS`` threads, each with its own SDK client, sending requests in a loop (the
    ``plan`` picks the kind of the n-th request of client i) until the block ends."""

    def __init__(self, daemon: Daemon, tag: str, plan: Callable[[int, int], Kind]) -> None:
        self.daemon = daemon
        self.tag = tag
        self.plan = plan
        self.outcomes: list[Outcome] = []
        self.in_flight: dict[str, InFlight] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), name=f"{tag}-{i}", daemon=True)
            for i in range(CLIENTS)
        ]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        hung = [thread.name for thread in self._threads if thread.is_alive()]
        assert not hung, f"clients still waiting {JOIN_TIMEOUT:.0f} s after the end: {hung}"

    def _client(self, index: int) -> None:
        with openai.OpenAI(
            base_url=self.daemon.api_base,
            api_key="unused",
            max_retries=0,
            timeout=CLIENT_TIMEOUT,
        ) as client:
            n = 0
            while not self._stop.is_set():
                kind = self.plan(index, n)
                request_id = f"{self.tag}-{index}-{n}"
                n += 1
                flight = InFlight(kind.name, time.monotonic())
                with self._lock:
                    self.in_flight[request_id] = flight
                result = send(client, kind, request_id, flight)
                with self._lock:
                    del self.in_flight[request_id]
                    self.outcomes.append(result)
                if result.result != "ok":
                    self._stop.wait(0.1)  # no busy loop on fast errors

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def flying(self) -> list[InFlight]:
        with self._lock:
            return list(self.in_flight.values())

    def run_for(self, seconds: float) -> None:
        time.sleep(seconds)


def ok_kinds(outcomes: list[Outcome], since: float = 0.0) -> Counter[str]:
    return Counter(o.kind for o in outcomes if o.result == "ok" and o.started >= since)


def describe(outcomes: list[Outcome]) -> str:
    counts = Counter((o.kind, o.result, o.status) for o in outcomes)
    return ", ".join(f"{k}/{r}{'/' + str(s) if s else ''}: {n}" for (k, r, s), n in counts.items())


def assert_mpcapi_502(outcome: Outcome) -> None:
    """A 502 in the seed's error shape, naming the request."""
    assert outcome.status == 502, outcome
    body = outcome.body
    assert isinstance(body, dict), outcome
    assert body["error"]["code"] == "bad_gateway" and body["message"], outcome
    assert body["request_id"] == outcome.request_id == outcome.headers["x-request-id"], outcome


def assert_sse_error(outcome: Outcome) -> None:
    """The stream's last event was MPC-API's error event: ``{"error": {message, type}}``."""
    assert outcome.result == "stream_error", outcome
    assert isinstance(outcome.body, dict), outcome
    assert outcome.body["type"] == "upstream_error" and outcome.body["message"], outcome
    # (A stream the kill cut before its first chunk ends the same way: headers were sent.)


def assert_nothing_hung(outcomes: list[Outcome], longest: float) -> None:
    print(f"\n{len(outcomes)} requests: {describe(outcomes)}")  # shown with pytest -s
    hung = [o for o in outcomes if o.result in ("timeout", "connection", "broken")]
    assert not hung, f"requests that hung, lost their connection or were cut: {hung[:5]}"
    slowest = max(outcomes, key=lambda o: o.seconds)
    assert slowest.seconds < longest, f"a request took {slowest.seconds:.1f} s: {slowest}"


# --- LiteLLM killed and restarted ----------------------------------------------------------------


@pytest.fixture
def drill_litellm(tmp_path: Path) -> Iterator[LiteLLMServer]:
    config = tmp_path / "litellm-drill.yaml"
    config.write_text(LITELLM_CONFIG.read_text().replace("model_list:\n", DRILL_MODELS, 1))
    server = LiteLLMServer(tmp_path / "litellm.log", config)
    try:
        server.start()
        yield server
    finally:
        server.stop()


CHAT = Kind("chat")
STREAM = Kind("stream", stream=True)
SLOW = Kind("slow", model="mock-slow")
LONG_STREAM = Kind("long-stream", model="mock-long-stream", stream=True, expected=LONG_TEXT)


def litellm_plan(index: int, n: int) -> Kind:
    if index == 0:
        return SLOW
    if index == 1:
        return LONG_STREAM
    return STREAM if (index + n) % 2 else CHAT


def test_litellm_killed_under_load_and_restarted(
    drill_litellm: LiteLLMServer, tmp_path: Path
) -> None:
    """Only the requests in flight at the kill fail (a 502, or an SSE error event for a
    stream already under way), none hangs, the next ones get a fast 502, and once LiteLLM is
    back on its port every kind of request succeeds again."""
    litellm = harness.LiteLLM(drill_litellm.url, LITELLM_MASTER_KEY, drill_litellm.log)
    launcher = DaemonLauncher(tmp_path / "daemons", harness.daemon_defaults(litellm))
    launcher.root.mkdir()
    try:
        daemon = launcher.start(LITELLM_TIMEOUT="20")
        with Traffic(daemon, "litellm-drill", litellm_plan) as traffic:
            assert wait_until(lambda: len(ok_kinds(traffic.snapshot())) == 4, timeout=60)
            traffic.run_for(WARM_UP)

            def cut_midway() -> bool:  # a long stream well under way, a slow answer pending
                now, flying = time.monotonic(), traffic.flying()
                return any(f.kind == "long-stream" and f.chunks >= 5 for f in flying) and any(
                    f.kind == "slow" and now - f.started > 0.3 for f in flying
                )

            assert wait_until(cut_midway, timeout=30), "no long stream and slow answer in flight"
            killed_at = time.monotonic()
            drill_litellm.kill()
            down_at = time.monotonic()
            traffic.run_for(OUTAGE)
            assert http_status(daemon.url + "/health/ready", timeout=10) == 503
            restart_at = time.monotonic()
            drill_litellm.start()  # the same port; returns once its liveness probe answers
            back_at = time.monotonic()

            def recovered() -> bool:
                after = [o for o in traffic.snapshot() if o.started >= back_at]
                failed = [o.started for o in after if o.result != "ok"]
                since = max(failed, default=back_at)
                return sum(ok_kinds(after, since).values()) >= 2 * CLIENTS and set(
                    ok_kinds(after, since)
                ) == {"chat", "stream", "slow", "long-stream"}

            assert wait_until(recovered, timeout=RECOVERY_TIMEOUT), describe(
                [o for o in traffic.snapshot() if o.started >= back_at]
            )
        outcomes = traffic.outcomes
        assert http_status(daemon.url + "/health/ready", timeout=10) == 200
    finally:
        launcher.stop_all()

    assert_nothing_hung(outcomes, longest=CLIENT_TIMEOUT / 2)
    failures = [o for o in outcomes if o.result != "ok"]
    for failure in failures:
        if failure.result == "stream_error":
            assert_sse_error(failure)
        else:
            assert_mpcapi_502(failure)

    # Before the kill everything succeeded; what was in flight at the kill failed.
    assert all(o.result == "ok" for o in outcomes if o.ended < killed_at), describe(outcomes)
    in_flight = [o for o in outcomes if o.started < killed_at <= o.ended]
    # A stream under way ends with an SSE error event. Which one is cut depends on timing: the
    # long stream's last chunks may already sit in a socket buffer when LiteLLM dies.
    cut = [o for o in in_flight if o.kind.endswith("stream") and o.result == "stream_error"]
    assert cut, f"no stream was cut by the kill: {describe(in_flight)}"
    assert any(o.kind == "slow" and o.status == 502 for o in in_flight), describe(in_flight)

    # While LiteLLM was down every request got a fast 502, streams included (no first event).
    during = [o for o in outcomes if down_at <= o.started and o.ended < restart_at]
    assert len(during) >= CLIENTS, describe(during)
    assert all(o.result == "status" and o.status == 502 for o in during), describe(during)
    slowest = max(o.seconds for o in during)
    assert slowest < FAST, f"a 502 took {slowest:.2f} s while LiteLLM was down"
    assert {o.kind for o in during} == {"chat", "stream", "slow", "long-stream"}

    log = daemon.log_text()
    assert "Traceback" not in log
    assert not answered_500(log)


# --- Redis killed and restarted ------------------------------------------------------------------


def redis_keys(server: RedisServer, pattern: str) -> list[str]:
    argv = ["redis-cli", "-p", str(server.port), "--scan", "--pattern", pattern]
    found = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True)
    return found.stdout.split()


def cached_question(request_id: str) -> str:
    return "the drill's repeated question"


def unique_question(request_id: str) -> str:
    return f"a new question {request_id}"


REDIS_KINDS = (
    Kind("chat-repeated", question=cached_question),
    Kind("chat-unique", question=unique_question),
    Kind("stream-repeated", stream=True, question=cached_question),
    Kind("stream-unique", stream=True, question=unique_question),
)


def redis_plan(index: int, n: int) -> Kind:
    return REDIS_KINDS[(index + n) % len(REDIS_KINDS)]


def limited(outcome: Outcome) -> bool:
    return "x-ratelimit-remaining-requests" in outcome.headers


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
def test_redis_killed_under_load_and_restarted(start_mpcapi: StartDaemon) -> None:
    """Rate limits and cache in a Redis that is killed under load: every request is still
    served (none fails, none waits long), and after Redis is back the limiter and the cache
    use it again (limit headers, cache hits, and their keys in the new, empty Redis)."""
    server = RedisServer(free_port())
    server.start()
    try:
        daemon = start_mpcapi(
            MPCAPI_REDIS_URL=server.url, MPCAPI_DEFAULT_RPM="1000000", MPCAPI_CACHE_TTL="60"
        )
        with Traffic(daemon, "redis-drill", redis_plan) as traffic:
            traffic.run_for(WARM_UP)
            before = traffic.snapshot()
            server.kill()
            down_at = time.monotonic()
            traffic.run_for(OUTAGE)
            server.start()  # empty, on the same port
            back_at = time.monotonic()

            def redis_used_again() -> bool:
                after = [o for o in traffic.snapshot() if o.started >= back_at]
                return any(limited(o) for o in after) and any(
                    o.headers.get("x-mpcapi-cache") == "hit" and limited(o) for o in after
                )

            assert wait_until(redis_used_again, timeout=RECOVERY_TIMEOUT), describe(
                traffic.snapshot()
            )
            traffic.run_for(1.0)
        outcomes = traffic.outcomes
        assert redis_keys(server, "mpcapi:rl:*"), "the limiter wrote nothing to the new Redis"
        assert redis_keys(server, "mpcapi:cache:*"), "the cache wrote nothing to the new Redis"
    finally:
        server.stop()

    assert_nothing_hung(outcomes, longest=5.0)
    assert all(o.result == "ok" for o in outcomes), describe(outcomes)
    assert before and all(limited(o) for o in before)
    assert any(o.headers.get("x-mpcapi-cache") == "hit" for o in before)
    # Once the outage was noticed, requests were served without Redis: no limit, no cache.
    during = [o for o in outcomes if down_at + 2 <= o.started and o.ended < back_at]
    assert len(during) >= CLIENTS, describe(outcomes)
    assert not any(limited(o) for o in during)
    assert all(o.headers.get("x-mpcapi-cache") == "miss" for o in during)
    log = daemon.log_text()
    assert log.count("is unavailable") == 1 and log.count("available again") == 1
    assert not answered_500(log) and "Traceback" not in log


# --- PostgreSQL killed and restarted -------------------------------------------------------------


def pg_plan(index: int, n: int) -> Kind:
    return STREAM if (index + n) % 2 else CHAT


def stored(url: str, tag: str) -> list[str]:
    with psycopg.connect(url, connect_timeout=5) as connection:
        rows = connection.execute(
            "SELECT request_id FROM usage WHERE request_id LIKE %s", (tag + "-%",)
        ).fetchall()
    return [row[0] for row in rows]


def test_postgresql_killed_under_load_and_restarted(start_mpcapi: StartDaemon) -> None:
    """The usage ledger in a PostgreSQL that is killed under load: every request is served
    meanwhile, and once the database is back every request id is in the ledger exactly once
    (rows of the outage replayed from the spool file, none stored twice)."""
    tag = "pg-drill"
    with own_postgres() as server:
        daemon = start_mpcapi(MPCAPI_DATABASE_URL=server.url, MPCAPI_ADMIN_KEY="drill-admin")
        with Traffic(daemon, tag, pg_plan) as traffic:
            traffic.run_for(WARM_UP)
            server.kill()
            traffic.run_for(OUTAGE)
            assert "usage database unreachable" in daemon.wait_for_log("unreachable", 10)
            server.start()  # crash recovery, then it accepts again
            traffic.run_for(WARM_UP)
        outcomes = traffic.outcomes
        assert_nothing_hung(outcomes, longest=10.0)
        assert all(o.result == "ok" for o in outcomes), describe(outcomes)

        sent = sorted(o.request_id for o in outcomes)
        ids: list[str] = []

        def all_stored() -> bool:
            nonlocal ids
            try:
                ids = stored(server.url, tag)
            except psycopg.Error:
                return False
            return len(ids) >= len(sent)

        wait_until(all_stored, timeout=60)
        assert len(ids) == len(set(ids)), "a request id is stored twice"
        assert sorted(ids) == sent
        log = daemon.wait_for_log("usage database is back", timeout=10)
        assert log.count("usage database unreachable") == 1
        assert log.count("usage database is back") == 1
        assert not answered_500(log)
        # No traceback (adbapi's "Rollback failed" for every broken pooled connection is
        # silenced: the outage is logged once, above).
        assert "Rollback failed" not in log
        assert "Traceback" not in log
