"""The one gateway builder of the unit tests: ``mpcapi.runtime.build.build_gateway`` in front
of a fake LiteLLM, both driven in memory through ``StubTreq`` on a ``task.Clock``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import treq
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mpcapi.config.settings import Settings
from mpcapi.exchange import Exchange, ExchangeObserver
from mpcapi.http.app import Gateway
from mpcapi.ledger.ledger import UsageLedger
from mpcapi.policy.keys import KeyAuthenticator
from mpcapi.runtime.build import GatewayParts, build_gateway
from mpcapi.upstream.client import LiteLLMClient
from mpcapi.upstream.http import body_producer

UPSTREAM = "http://litellm.test:4000"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}
COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}

Handler = Callable[[Request], bytes | int]


@attrs.define
class Seen:
    """One request as the fake LiteLLM received it."""

    method: str
    path: str
    headers: dict[str, list[str]]
    body: bytes
    query: str = ""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def answer(status: int, document: Any, headers: dict[str, str] | None = None) -> Handler:
    """A handler that answers with ``document`` as JSON."""

    def handle(request: Request) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        for name, value in (headers or {}).items():
            request.setHeader(name.encode(), value.encode())
        return json.dumps(document).encode()

    return handle


def never_answer(request: Request) -> int:
    return NOT_DONE_YET


class FakeLiteLLM(Resource):
    """Records every request; answers from ``routes`` keyed by (method, path)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/models"): answer(200, {"data": [{"id": "gpt-4o-mini"}], "object": "list"}),
            ("POST", "/chat/completions"): answer(200, COMPLETION),
            ("POST", "/completions"): answer(200, {"object": "text_completion", "choices": []}),
            ("POST", "/embeddings"): answer(200, {"object": "list", "data": []}),
            ("GET", "/health/liveliness"): answer(200, "I'm alive!"),
        }

    def render(self, request: Request) -> bytes | int:
        headers = {
            name.decode().lower(): [v.decode() for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        body = request.content.read() if request.content is not None else b""
        path = request.path.decode()
        method = request.method.decode()
        query = request.uri.partition(b"?")[2].decode()
        self.seen.append(Seen(method, path, headers, body, query))
        handler = self.routes.get((method, path))
        if handler is None:
            return answer(404, {"error": {"message": f"no {method} {path}"}})(request)
        return handler(request)


@attrs.define
class Harness:
    """A gateway over a fake LiteLLM; ``client`` is a StubTreq of the gateway."""

    fake: FakeLiteLLM
    clock: Clock
    upstream_stub: Any
    client: Any
    parts: GatewayParts

    @property
    def settings(self) -> Settings:
        return self.parts.live.current

    @property
    def upstream(self) -> LiteLLMClient:
        return self.parts.upstream

    @property
    def gateway(self) -> Gateway:
        return self.parts.gateway

    @property
    def keys(self) -> KeyAuthenticator | None:
        return self.parts.keys

    def flush(self) -> None:
        for _ in range(5):
            if isinstance(self.upstream_stub, StubTreq):  # not a real client over TCP
                self.upstream_stub.flush()
            self.client.flush()

    async def post(self, path: str, body: bytes | dict[str, Any], **kwargs: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.client.post(f"http://mpcapi.test{path}", data=data, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> Any:
        return await self.client.get(f"http://mpcapi.test{path}", **kwargs)


def gateway_settings(**overrides: Any) -> Settings:
    """Settings for a gateway over the fake LiteLLM: our key, no ledger unless asked for."""
    values = {
        "litellm_base_url": UPSTREAM,
        "litellm_api_key": "sk-ours",
        "usage_ledger": False,
        **overrides,
    }
    return Settings(**values)


def make_harness(
    *,
    now: float = 0.0,
    clock: Clock | None = None,
    http: Any = None,
    fake: FakeLiteLLM | None = None,
    keys: Any = None,
    ledger: UsageLedger | None = None,
    reactor: Any = None,
    observers: Sequence[ExchangeObserver] = (),
    tracing: Any = None,
    **overrides: Any,
) -> Harness:
    """A gateway made by the composition root, with ``overrides`` of its settings.

    Its clock (``clock``, or a new one) starts at ``now``. ``http`` replaces the StubTreq of
    ``fake`` as the LiteLLM client; ``keys`` and ``ledger`` replace the ones the settings
    would open, and ``tracing`` the one ``otel_endpoint`` would; ``reactor`` runs the
    databases' threads (the global reactor by default);
    ``observers`` hear of every finished HTTP exchange."""
    settings = gateway_settings(**overrides)
    fake = fake or FakeLiteLLM()
    clock = clock or Clock()
    clock.advance(now)
    upstream_stub = http if http is not None else StubTreq(fake)
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    parts = build_gateway(
        settings,
        reactor,
        clock,
        upstream_stub,
        keys=keys,
        ledger=ledger,
        tracing=tracing,
        observers=observers,
    )
    client = StubTreq(parts.gateway.resource())
    return Harness(fake, clock, upstream_stub, client, parts)


@contextmanager
def tcp_harness(**overrides: Any) -> Iterator[Harness]:
    """A harness whose LiteLLM calls go over TCP, with treq as the daemon has it, to a
    ``FakeLiteLLM`` served on 127.0.0.1: for what StubTreq cannot carry (uploads streamed
    from a file). Wait for answers with ``tests.support.keys.settle``."""
    from twisted.internet import reactor

    fake = FakeLiteLLM()
    port = reactor.listenTCP(0, Site(fake), interface="127.0.0.1")
    http = treq.client.HTTPClient(Agent(reactor), data_to_body_producer=body_producer)
    url = f"http://127.0.0.1:{port.getHost().port}"
    try:
        yield make_harness(fake=fake, http=http, litellm_base_url=url, **overrides)
    finally:
        port.stopListening()


def observed_harness(*observers: ExchangeObserver) -> tuple[Harness, list[Exchange]]:
    """A harness whose gateway reports finished exchanges to ``observers`` and a list."""
    seen: list[Exchange] = []
    harness = make_harness(observers=[*observers, seen.append])
    return harness, seen


def header(response: Any, name: str) -> str | None:
    """The first value of a response header, or None."""
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


async def json_body(response: Any) -> Any:
    return json.loads(await response.content())
