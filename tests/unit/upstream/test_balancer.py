"""Several LiteLLM instances: balancing, health probes, the one safe retry, in-flight counts.

The instances are fake LiteLLMs behind one StubTreq, told apart by host name; ``Wires``
makes chosen hosts fail the way a real network does (a refused connection, a connection
lost after the request went out) before StubTreq is asked.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.logger import LogEvent
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import Request

from mpcapi.http.app import Gateway
from mpcapi.upstream.balancer import Balancer, HealthProbe, Upstream
from mpcapi.upstream.client import LiteLLMClient
from tests.support.gateway import CHAT, FakeLiteLLM, answer, json_body, make_harness, never_answer

A, B, C = "http://a.test:4000", "http://b.test:4000", "http://c.test:4000"


class ByHost(Resource):
    """One fake LiteLLM per host name (``a`` serves ``a.test``)."""

    isLeaf = True

    def __init__(self, fakes: dict[str, FakeLiteLLM]) -> None:
        super().__init__()
        self.fakes = fakes

    def render(self, request: Request) -> bytes | int:
        return self.fakes[request.getRequestHostname().decode().split(".")[0]].render(request)


@attrs.define
class Wires:
    """StubTreq, except that a host in ``failures`` fails with its exception."""

    stub: Any
    failures: dict[str, Exception] = attrs.Factory(dict)
    attempts: list[str] = attrs.Factory(list)

    def request(self, method: str, url: Any, **kwargs: Any) -> defer.Deferred[Any]:
        self.attempts.append(url.host)
        failure = self.failures.get(url.host)
        if failure is not None:
            return defer.fail(failure)
        result: defer.Deferred[Any] = self.stub.request(method, url, **kwargs)
        return result


@attrs.define
class Cluster:
    fakes: dict[str, FakeLiteLLM]
    wires: Wires
    clock: Clock
    client: LiteLLMClient
    gateway: Gateway
    api: Any

    def seen(self, host: str, path: str = "/chat/completions") -> int:
        return sum(1 for seen in self.fakes[host].seen if seen.path == path)

    def flush(self) -> None:
        for _ in range(5):
            self.wires.stub.flush()
            self.api.flush()

    def in_flight(self) -> list[int]:
        return [instance.in_flight for instance in self.client.balancer.instances]

    def instance(self, base_url: str) -> Upstream:
        return next(u for u in self.client.balancer.instances if u.base_url == base_url)

    async def chat(self) -> Any:
        pending = defer.ensureDeferred(
            self.api.post("http://mpcapi.test/api/chat/completions", data=json.dumps(CHAT))
        )
        self.flush()
        return await pending


def cluster(*urls: str) -> Cluster:
    fakes = {url.split("//")[1].split(".")[0]: FakeLiteLLM() for url in urls}
    wires = Wires(StubTreq(ByHost(fakes)))
    harness = make_harness(http=wires, litellm_base_url=",".join(urls))
    return Cluster(fakes, wires, harness.clock, harness.upstream, harness.gateway, harness.client)


def refused() -> Exception:
    return error.ConnectionRefusedError("Connection refused")


# The balancer alone


def test_pick_prefers_the_healthy_instance_with_fewest_in_flight() -> None:
    balancer = Balancer([A, B, C])
    a, b, c = balancer.instances
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 0
    c.healthy = False
    assert balancer.pick() is b
    b.in_flight = 5
    assert balancer.pick() is a


def test_ties_take_turns() -> None:
    balancer = Balancer([A, B, C])
    assert [balancer.pick() for _ in range(6)] == balancer.instances * 2


def test_with_none_healthy_any_instance_serves_but_retries_need_a_healthy_one() -> None:
    balancer = Balancer([A, B])
    a, b = balancer.instances
    a.healthy = b.healthy = False
    a.in_flight = 2
    assert balancer.pick() is b
    assert balancer.pick([b]) is None
    a.healthy = True
    assert balancer.pick([b]) is a


def test_one_instance_is_always_picked() -> None:
    balancer = Balancer([A])
    (a,) = balancer.instances
    a.healthy = False
    assert balancer.pick() is a
    assert balancer.pick([a]) is None


def test_replace_keeps_what_is_known_of_instances_that_stay() -> None:
    balancer = Balancer([A, B])
    a, b = balancer.instances
    a.in_flight, b.healthy = 4, False
    balancer.replace([B, C])
    assert [u.base_url for u in balancer.instances] == [B, C]
    assert balancer.instances[0] is b
    assert not b.healthy
    assert balancer.instances[1].in_flight == 0
    with pytest.raises(ValueError):
        balancer.replace([])


def test_each_change_of_health_is_logged_once(log_events: list[LogEvent]) -> None:
    balancer = Balancer([A, B])
    a = balancer.instances[0]
    for _ in range(3):
        balancer.went_down(a, "Connection refused")
    for _ in range(3):
        balancer.came_up(a)
    texts = [e["log_format"] for e in log_events if e.get("log_namespace") == "mpcapi.balancer"]
    assert texts == ["LiteLLM at {upstream} is out: it {why}", "LiteLLM at {upstream} is back in"]


# Spreading requests


@pytest_twisted.ensureDeferred
async def test_requests_go_to_the_least_busy_instance() -> None:
    c = cluster(A, B)
    c.fakes["a"].routes[("POST", "/chat/completions")] = never_answer
    c.fakes["b"].routes[("POST", "/chat/completions")] = never_answer
    pending = [
        defer.ensureDeferred(c.client.send("POST", "/chat/completions", body=b"{}", request_id="r"))
        for _ in range(4)
    ]
    c.flush()
    assert c.in_flight() == [2, 2]
    assert (c.seen("a"), c.seen("b")) == (2, 2)
    c.instance(A).in_flight += 10  # A is busy with other work: the next requests go to B
    more = [
        defer.ensureDeferred(c.client.send("POST", "/chat/completions", body=b"{}", request_id="r"))
        for _ in range(3)
    ]
    c.flush()
    assert (c.seen("a"), c.seen("b")) == (2, 5)
    cancelled = defer.DeferredList(pending + more, consumeErrors=True)
    for d in pending + more:
        d.cancel()
    c.flush()
    assert all(isinstance(r, Failure) for _, r in await cancelled)
    c.instance(A).in_flight -= 10
    assert c.in_flight() == [0, 0]


@pytest_twisted.ensureDeferred
async def test_in_flight_lasts_until_the_body_is_read() -> None:
    c = cluster(A, B)
    response = await c.client.send("GET", "/models", request_id="r")
    assert c.in_flight() == [1, 0], "headers have arrived, the body has not been read"
    await c.client.read_body(response)
    assert c.in_flight() == [0, 0]


@pytest_twisted.ensureDeferred
async def test_in_flight_ends_when_reading_the_body_is_given_up() -> None:
    c = cluster(A, B)
    response = await c.client.send("GET", "/models", request_id="r")
    reading = c.client.read_body(response)
    reading.addErrback(lambda _: None)
    reading.cancel()  # what a client that leaves does: the upstream connection is closed
    c.flush()
    assert c.in_flight() == [0, 0]


@pytest_twisted.ensureDeferred
async def test_in_flight_ends_with_the_stream_and_with_every_failure() -> None:
    c = cluster(A, B)
    stream = (
        b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
        + b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}\n\n'
        + b"data: [DONE]\n\n"
    )

    def streams(request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/event-stream")
        return stream

    for fake in c.fakes.values():
        fake.routes[("POST", "/chat/completions")] = streams
    pending = defer.ensureDeferred(
        c.api.post(
            "http://mpcapi.test/api/chat/completions", data=json.dumps({**CHAT, "stream": True})
        )
    )
    c.flush()
    response = await pending
    assert b"[DONE]" in await response.content()
    assert c.in_flight() == [0, 0]

    c.fakes["b"].routes[("POST", "/chat/completions")] = answer(500, {"error": "boom"})
    c.fakes["a"].routes[("POST", "/chat/completions")] = never_answer
    failed = await c.chat()  # B's turn: a 5xx, read whole and mapped to 502
    assert failed.code == 502
    assert c.in_flight() == [0, 0]
    waiting = defer.ensureDeferred(c.chat())  # A's turn: no answer until the timeout
    c.clock.advance(c.client.timeout + 1)
    c.flush()
    assert (await waiting).code == 504
    assert c.in_flight() == [0, 0]


# The one retry


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_moves_the_request_to_another_instance(
    log_events: list[LogEvent],
) -> None:
    c = cluster(A, B)
    c.wires.failures["a.test"] = refused()
    responses = [await c.chat() for _ in range(3)]
    assert [r.code for r in responses] == [200, 200, 200]
    assert c.seen("b") == 3
    assert c.wires.attempts == ["a.test", "b.test", "b.test", "b.test"], "A is out after once"
    a = c.instance(A)
    assert not a.healthy
    assert a.error is not None and "a.test:4000" in a.error and "refused" in a.error
    assert c.in_flight() == [0, 0]
    outs = [e for e in log_events if e.get("log_format", "").endswith("is out: it {why}")]
    assert len(outs) == 1


@pytest_twisted.ensureDeferred
async def test_when_every_instance_refuses_the_client_gets_one_502() -> None:
    c = cluster(A, B, C)
    for host in ("a.test", "b.test", "c.test"):
        c.wires.failures[host] = refused()
    response = await c.chat()
    assert response.code == 502
    document = await json_body(response)
    assert "is unreachable" in document["message"]
    assert sorted(c.wires.attempts) == ["a.test", "b.test", "c.test"]
    assert c.in_flight() == [0, 0, 0]


@pytest_twisted.ensureDeferred
async def test_one_instance_refusing_is_a_502_as_before() -> None:
    c = cluster(A)
    c.wires.failures["a.test"] = refused()
    response = await c.chat()
    assert response.code == 502
    assert f"LiteLLM at {A} is unreachable" in (await json_body(response))["message"]
    assert c.wires.attempts == ["a.test"]
    assert c.instance(A).healthy, "with nowhere else to go, nothing is taken out"


@pytest_twisted.ensureDeferred
async def test_no_retry_once_the_request_may_have_reached_litellm() -> None:
    c = cluster(A, B)
    lost = ResponseNeverReceived([Failure(error.ConnectionLost("gone"))])
    c.wires.failures["a.test"] = lost
    response = await c.chat()
    assert response.code == 502
    assert f"LiteLLM at {A} is unreachable" in (await json_body(response))["message"]
    assert c.wires.attempts == ["a.test"]
    assert c.instance(A).healthy


@pytest_twisted.ensureDeferred
async def test_no_retry_after_a_5xx() -> None:
    c = cluster(A, B)
    c.fakes["a"].routes[("POST", "/chat/completions")] = answer(503, {"error": "overloaded"})
    response = await c.chat()
    assert response.code == 502
    assert (c.seen("a"), c.seen("b")) == (1, 0)


@pytest_twisted.ensureDeferred
async def test_no_retry_after_a_timeout() -> None:
    c = cluster(A, B)
    c.fakes["a"].routes[("POST", "/chat/completions")] = never_answer
    waiting = defer.ensureDeferred(c.chat())
    c.clock.advance(c.client.timeout + 1)
    c.flush()
    response = await waiting
    assert response.code == 504
    assert f"LiteLLM at {A} did not answer" in (await json_body(response))["message"]
    assert (c.seen("a"), c.seen("b")) == (1, 0)
    assert c.instance(A).healthy


# Health probes


def probe_service(c: Cluster, interval: float = 5.0) -> HealthProbe:
    probe = HealthProbe(c.client.balancer, c.client.probe_all, c.clock, interval)
    probe.startService()
    return probe


def tick(c: Cluster, seconds: float) -> None:
    c.clock.advance(seconds)
    c.flush()


def test_a_failing_probe_takes_an_instance_out_and_a_passing_one_puts_it_back() -> None:
    c = cluster(A, B)
    probe = probe_service(c)
    c.fakes["a"].routes[("GET", "/health/liveliness")] = answer(500, {"error": "sick"})
    tick(c, 4.9)
    assert c.seen("a", "/health/liveliness") == 0
    tick(c, 0.1)
    assert (c.seen("a", "/health/liveliness"), c.seen("b", "/health/liveliness")) == (1, 1)
    a = c.instance(A)
    assert not a.healthy
    assert a.status == 500
    assert a.error == f"LiteLLM at {A} answered its liveness probe with 500"
    assert c.client.balancer.pick() is c.instance(B)
    assert c.client.balancer.pick() is c.instance(B)

    c.fakes["a"].routes[("GET", "/health/liveliness")] = answer(200, "I'm alive!")
    tick(c, 5)
    assert a.healthy
    assert a.error is None
    probe.stopService()


def test_an_instance_too_slow_for_its_probe_is_taken_out() -> None:
    c = cluster(A, B)
    probe = probe_service(c)
    c.fakes["a"].routes[("GET", "/health/liveliness")] = never_answer
    tick(c, 5)
    assert c.instance(A).healthy, "still within its probe timeout"
    tick(c, c.client.probe_timeout)
    assert not c.instance(A).healthy
    assert "did not answer within 2 s" in str(c.instance(A).error)
    probe.stopService()


def test_an_instance_out_for_refusing_is_probed_back_in() -> None:
    c = cluster(A, B)
    probe = probe_service(c)
    c.wires.failures["a.test"] = refused()
    tick(c, 5)
    assert not c.instance(A).healthy
    del c.wires.failures["a.test"]
    tick(c, 5)
    assert c.instance(A).healthy
    probe.stopService()


def test_one_instance_is_never_probed_in_the_background() -> None:
    c = cluster(A)
    probe = probe_service(c)
    tick(c, 60)
    assert c.seen("a", "/health/liveliness") == 0
    probe.stopService()


# /health/ready


@pytest_twisted.ensureDeferred
async def test_ready_reports_every_instance() -> None:
    c = cluster(A, B)
    c.fakes["b"].routes[("GET", "/health/liveliness")] = answer(503, {"error": "starting"})
    c.instance(A).in_flight = 3
    pending = defer.ensureDeferred(c.api.get("http://mpcapi.test/health/ready"))
    c.flush()
    response = await pending
    assert response.code == 200
    document = await json_body(response)
    assert document["status"] == "ready"
    assert document["litellm"]["url"] == f"{A},{B}"
    assert document["litellm"]["status"] == 200
    assert "error" not in document["litellm"]
    a, b = document["upstreams"]
    assert a == {
        "url": A,
        "status": 200,
        "healthy": True,
        "in_flight": 3,
        "latency_ms": a["latency_ms"],
        "error": None,
    }
    assert isinstance(a["latency_ms"], float | int)
    assert (b["url"], b["status"], b["healthy"]) == (B, 503, False)
    assert "503" in b["error"]

    c.fakes["a"].routes[("GET", "/health/liveliness")] = answer(500, {"error": "down"})
    pending = defer.ensureDeferred(c.api.get("http://mpcapi.test/health/ready"))
    c.flush()
    response = await pending
    assert response.code == 503
    document = await json_body(response)
    assert document["status"] == "unavailable"
    assert A in document["litellm"]["error"] and B in document["litellm"]["error"]
    assert [u["healthy"] for u in document["upstreams"]] == [False, False]


@pytest_twisted.ensureDeferred
async def test_ready_probes_instances_at_once() -> None:
    c = cluster(A, B)
    for fake in c.fakes.values():
        fake.routes[("GET", "/health/liveliness")] = never_answer
    pending = defer.ensureDeferred(c.api.get("http://mpcapi.test/health/ready"))
    c.flush()
    assert (c.seen("a", "/health/liveliness"), c.seen("b", "/health/liveliness")) == (1, 1)
    tick(c, c.client.probe_timeout)
    response = await pending
    assert response.code == 503
    assert c.clock.seconds() == c.client.probe_timeout, "one probe timeout, not one each"
