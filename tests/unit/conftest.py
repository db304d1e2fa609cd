"""In-memory harness: the Klein app in front of a fake LiteLLM, both through StubTreq."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mpcapi.config.settings import Settings
from mpcapi.http.app import Gateway
from mpcapi.policy.keys import KeyAuthenticator, open_authenticator
from mpcapi.upstream.client import LiteLLMClient

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
        self.seen.append(Seen(method, path, headers, body))
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
    settings: Settings
    upstream: LiteLLMClient
    keys: KeyAuthenticator | None = None  # with auth="keys": its database runs on the reactor
    gateway: Gateway | None = None

    def flush(self) -> None:
        for _ in range(5):
            self.upstream_stub.flush()
            self.client.flush()

    async def post(self, path: str, body: bytes | dict[str, Any], **kwargs: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.client.post(f"http://mpcapi.test{path}", data=data, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> Any:
        return await self.client.get(f"http://mpcapi.test{path}", **kwargs)


def make_harness(*, now: float = 0.0, **overrides: Any) -> Harness:
    """A gateway with ``overrides`` of its settings; its clock starts at ``now``."""
    settings = Settings(**{"litellm_base_url": UPSTREAM, "litellm_api_key": "sk-ours", **overrides})
    fake = FakeLiteLLM()
    clock = Clock()
    clock.advance(now)
    upstream_stub = StubTreq(fake)
    upstream = LiteLLMClient(
        base_url=settings.litellm_base_url,
        api_key=settings.litellm_api_key,
        http=upstream_stub,
        clock=clock,
        timeout=settings.litellm_timeout,
    )
    keys = None
    if settings.auth == "keys":
        from twisted.internet import reactor

        keys = open_authenticator(settings, reactor, clock)
    gateway = Gateway(settings, upstream, clock, keys=keys)
    client = StubTreq(gateway.resource())
    return Harness(fake, clock, upstream_stub, client, settings, upstream, keys, gateway)


@pytest.fixture
def harness() -> Harness:
    return make_harness()


async def json_body(response: Any) -> Any:
    return json.loads(await response.content())


@pytest.fixture
def log_events() -> Iterator[list[LogEvent]]:
    """Every twisted.logger event emitted while the test runs."""
    events: list[LogEvent] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)
