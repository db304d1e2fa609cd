"""The LiteLLM client: treq over our own connection pool, timeouts, error mapping.

``LiteLLMClient.send`` resolves when LiteLLM's response headers arrive (or raises a
502/504 ``ApiError``); ``read_body`` collects a body with an inactivity timeout and
closes the upstream connection when cancelled, which ``treq.collect`` alone does not.
With several instances (see ``balancer``) ``send`` picks one per request and moves a
request to another only when the first refused the connection: nothing of it was sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import attrs
import treq
from hyperlink import EncodedURL
from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    PotentialDataLoss,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from mpcapi.config.live import LiveSettings
from mpcapi.config.settings import Settings, without_password
from mpcapi.errors import ApiError, bad_gateway, gateway_timeout
from mpcapi.internals import quiet_pool, standard_endpoints
from mpcapi.upstream.balancer import Balancer, Upstream, split_urls

# Headers of LiteLLM's answers that reach the client: what SDKs need to parse and back off.
RELAYED_HEADERS = (b"content-type", b"retry-after")
RELAYED_HEADER_PREFIXES = (b"x-ratelimit-", b"x-litellm-", b"llm_provider-")

_UNREACHABLE = (
    error.ConnectError,
    error.DNSLookupError,
    error.ConnectionLost,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
    ResponseFailed,
)

# Failures before any connection existed: nothing of the request reached that instance, so
# another may take it without LiteLLM billing it twice. Anything later is never retried.
_NEVER_CONNECTED = (
    error.ConnectionRefusedError,
    error.NoRouteError,
    error.UnknownHostError,
    error.DNSLookupError,
    error.TCPTimedOutError,
    error.TimeoutError,  # the connect timeout (MPCAPI_CONNECT_TIMEOUT), not LITELLM_TIMEOUT
)

LITELLM_LIVENESS_PATH = "/health/liveliness"


@implementer(IBodyProducer)
class BytesProducer:
    """A request body that is already in memory: written at once, no cooperator."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def make_pool(reactor: Any, settings: Settings) -> HTTPConnectionPool:
    """A persistent pool sized for many concurrent requests to one LiteLLM."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = settings.pool_size
    # Below uvicorn's 5 s keep-alive, so we rarely reuse a connection LiteLLM is closing.
    pool.cachedConnectionTimeout = 4
    pool.retryAutomatically = True
    return quiet_pool(pool)


@implementer(IAgentEndpointFactory)
class _ReusedEndpoints:
    """One endpoint per upstream host: Agent would build (and IDNA-encode) one per request."""

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._standard = standard_endpoints(reactor, connect_timeout)
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._standard.endpointForURI(uri)
        return endpoint


def make_http_client(reactor: Any, pool: HTTPConnectionPool, settings: Settings) -> Any:
    """treq's HTTPClient on our pool; cookies refused, so no state leaks between clients."""
    endpoints = _ReusedEndpoints(reactor, settings.connect_timeout)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    jar: Any = _NO_COOKIES  # treq's type names its own jar class; any CookieJar works
    return treq.client.HTTPClient(agent, cookiejar=jar, data_to_body_producer=BytesProducer)


class _WireURL(EncodedURL):
    """A URL already in its wire form: treq need not IDNA-encode it, nor write it out again,
    on every request."""

    _text: str | None = None

    def to_uri(self) -> _WireURL:  # type: ignore[override]
        return self

    def to_text(self, with_password: bool = False) -> str:
        if with_password:
            return super().to_text(with_password)
        if self._text is None:
            self._text = super().to_text()
        return self._text


class _NoCookies(CookieJar):
    """A jar that never sends nor keeps a cookie, so no state passes between clients; treq's
    cookie handling would otherwise run the standard library's cookie policy on every request
    and every answer."""

    def __init__(self) -> None:
        super().__init__(policy=DefaultCookiePolicy(allowed_domains=[]))

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


# The client's jar, and each request's cookies (treq would build an empty jar per request).
_NO_COOKIES = _NoCookies()


def _cancelled(failure_value: BaseException) -> bool:
    if isinstance(failure_value, defer.CancelledError):
        return True
    reasons = getattr(failure_value, "reasons", None) or []
    return any(reason.check(defer.CancelledError) for reason in reasons)


def _reason(failure_value: BaseException) -> str:
    reasons = getattr(failure_value, "reasons", None)
    if reasons:
        return "; ".join(str(reason.value) for reason in reasons)
    return str(failure_value) or type(failure_value).__name__


def _error_detail(body: bytes) -> Any:
    """The ``error`` member of an OpenAI-style error body (or the whole document)."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document.get("error", document) if isinstance(document, dict) else document


def error_message(body: bytes) -> str:
    """The human part of an error body from LiteLLM, shortened for our own messages."""
    detail = _error_detail(body)
    if detail is None:
        return body.decode("utf-8", "replace")[:500]
    message = detail.get("message", detail) if isinstance(detail, dict) else detail
    return str(message)[:500]


# LiteLLM without a database answers an unknown key with 400 of this type, not 401.
KEY_REFUSAL_TYPES = frozenset({"auth_error", "no_db_connection"})


def _refuses_key(status: int, body: bytes) -> bool:
    if status in (401, 403):
        return True
    detail = _error_detail(body) if status == 400 else None
    return isinstance(detail, dict) and detail.get("type") in KEY_REFUSAL_TYPES


class _NeverConnectedError(ApiError):
    """A 502 for a connection that never existed: the request may go to another instance."""


@attrs.define
class LiteLLMClient:
    """Sends requests to the LiteLLM Gateway (one instance or several, see ``balancer``) and
    maps transport failures to ``ApiError``. Its URLs, key and timeouts are the settings in
    force (``live``): a reload changes them for the next request."""

    live: LiveSettings
    http: Any
    clock: IReactorTime
    balancer: Balancer = attrs.field(
        default=attrs.Factory(
            lambda self: Balancer(split_urls(self.live.current.litellm_base_url)), takes_self=True
        )
    )

    @property
    def base_url(self) -> str:
        """As configured: one URL, or several separated by commas."""
        return self.live.current.litellm_base_url

    @property
    def api_key(self) -> str:
        return self.live.current.litellm_api_key

    @property
    def timeout(self) -> float:
        """Seconds to wait for response headers, and between body chunks (LITELLM_TIMEOUT)."""
        return self.live.current.litellm_timeout

    @property
    def probe_timeout(self) -> float:
        """Seconds a liveness probe may take (MPCAPI_READY_TIMEOUT)."""
        return self.live.current.ready_timeout

    def url(self, path: str, upstream: Upstream | None = None) -> EncodedURL:
        """The parsed URL of ``path`` on ``upstream`` (the first instance), built once."""
        if upstream is None:
            upstream = self.balancer.instances[0]
        url = upstream.urls.get(path)
        if url is None:
            url = upstream.urls[path] = _WireURL.from_text(upstream.base_url + path)
        return url

    def headers(self, client_authorization: bytes | None, request_id: str) -> Headers:
        """Our key when we have one, else the client's own Authorization."""
        headers = Headers(
            {
                b"content-type": [b"application/json"],
                b"accept": [b"application/json, text/event-stream"],
                b"x-request-id": [request_id.encode("ascii")],
            }
        )
        if self.api_key:
            headers.setRawHeaders(b"authorization", [b"Bearer " + self.api_key.encode("latin-1")])
        elif client_authorization:
            headers.setRawHeaders(b"authorization", [client_authorization])
        return headers

    async def send(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        authorization: bytes | None = None,
        request_id: str,
        timeout: float | None = None,
    ) -> IResponse:
        """Send one request; return the response once its headers have arrived.

        The response counts among its instance's requests in flight until its body has been
        read (or the stream has ended, however it ended).
        """
        limit = self.timeout if timeout is None else timeout
        headers = self.headers(authorization, request_id)
        balancer = self.balancer
        upstream = balancer.pick()
        assert upstream is not None
        tried: list[Upstream] = []
        deadline = self.clock.seconds() + limit
        wait = limit
        while True:
            upstream.in_flight += 1
            try:
                response = await self._exchange(upstream, method, path, headers, body, wait, limit)
            except _NeverConnectedError as refused:
                upstream.in_flight -= 1
                if len(balancer.instances) == 1:
                    raise  # nowhere else to go; as it always was with one LiteLLM
                balancer.went_down(upstream, refused.message)
                tried.append(upstream)
                retry = balancer.pick(tried)
                wait = deadline - self.clock.seconds()
                if retry is None or wait <= 0:
                    raise
                upstream = retry
                continue
            except BaseException:
                upstream.in_flight -= 1
                raise
            return _Counted(response, upstream)

    async def _exchange(
        self,
        upstream: Upstream,
        method: str,
        path: str,
        headers: Headers,
        body: bytes | None,
        wait: float,
        limit: float,
    ) -> IResponse:
        """One request to one instance; ``_NeverConnectedError`` when it never connected."""
        d = self.http.request(
            method,
            self.url(path, upstream),
            headers=headers,
            data=body,
            cookies=_NO_COOKIES,
            allow_redirects=False,
            unbuffered=True,
        )
        timed_out = []

        def give_up() -> None:
            timed_out.append(True)
            d.cancel()  # aborts the connection, so LiteLLM sees us leave

        timer = self.clock.callLater(wait, give_up)
        try:
            response: IResponse = await d
        except Exception as failure:
            if timed_out:
                raise gateway_timeout(
                    f"LiteLLM at {upstream.name} did not answer within {limit:g} s"
                ) from None
            if _cancelled(failure):  # the client left; nobody is waiting for an answer
                raise defer.CancelledError() from None
            if isinstance(failure, _UNREACHABLE):
                unreachable = (
                    _NeverConnectedError if isinstance(failure, _NEVER_CONNECTED) else ApiError
                )
                raise unreachable(
                    502,
                    "Bad Gateway",
                    f"LiteLLM at {upstream.name} is unreachable: {_reason(failure)}",
                    upstream_failure="unreachable",
                ) from None
            raise
        finally:
            if timer.active():
                timer.cancel()
        return response

    async def probe(self, upstream: Upstream, request_id: str) -> None:
        """Ask ``upstream``'s liveness probe; take it out or put it back accordingly."""
        started = self.clock.seconds()
        headers = self.headers(None, request_id)
        limit = self.probe_timeout
        problem: str | None = None
        upstream.status = None
        try:
            response = await self._exchange(
                upstream, "GET", LITELLM_LIVENESS_PATH, headers, None, limit, limit
            )
            collector = BodyCollector(self.clock, limit, upstream.name)
            response.deliverBody(collector)
            await collector.done
            upstream.status = response.code
            if response.code != 200:
                problem = (
                    f"LiteLLM at {upstream.name} answered its liveness probe with {response.code}"
                )
        except ApiError as failure:
            problem = failure.message
        upstream.latency_ms = round((self.clock.seconds() - started) * 1000, 2)
        if problem is None:
            self.balancer.came_up(upstream)
        else:
            self.balancer.went_down(upstream, problem)

    def probe_all(self, request_id: str = "upstream-probe") -> defer.Deferred[Any]:
        """Probe every instance at once; fires when all have answered (or timed out)."""
        return defer.DeferredList(
            [
                defer.Deferred.fromCoroutine(self.probe(upstream, request_id))
                for upstream in self.balancer.instances
            ],
            consumeErrors=True,
        )

    def source(self, response: IResponse) -> str:
        """The URL (as shown) of the instance that sent ``response``."""
        upstream = getattr(response, "upstream", None)
        return upstream.name if upstream is not None else without_password(self.base_url)

    def read_body(self, response: IResponse) -> defer.Deferred[bytes]:
        """Collect the whole body; 504 after ``timeout`` s of silence, 502 if cut short."""
        collector = BodyCollector(self.clock, self.timeout, self.source(response))
        response.deliverBody(collector)
        return collector.done


@implementer(IResponse)
class _Counted:
    """LiteLLM's response, counted in its instance's ``in_flight`` until its body ends."""

    __slots__ = ("_response", "code", "upstream")

    def __init__(self, response: IResponse, upstream: Upstream | None) -> None:
        self._response = response
        self.code = response.code
        self.upstream = upstream

    def __getattr__(self, name: str) -> Any:  # headers, phrase, length…: rarely read
        return getattr(self._response, name)

    def deliverBody(self, protocol: IProtocol) -> None:
        if self.upstream is not None:
            protocol = _CountedBody(protocol, self.upstream)
        self._response.deliverBody(protocol)

    def setPreviousResponse(self, response: IResponse) -> None:
        self._response.setPreviousResponse(response)


@implementer(IProtocol)
class _CountedBody:
    """Hands a body to ``protocol``; its end (complete, broken, aborted) ends the count."""

    __slots__ = ("_protocol", "_upstream", "dataReceived")

    def __init__(self, protocol: IProtocol, upstream: Upstream) -> None:
        self._protocol = protocol
        self._upstream: Upstream | None = upstream
        # Chunks go straight to the protocol: no extra call per chunk.
        self.dataReceived = protocol.dataReceived

    def makeConnection(self, transport: ITransport) -> None:
        self._protocol.makeConnection(transport)

    def connectionMade(self) -> None:
        self._protocol.connectionMade()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.in_flight -= 1
        self._protocol.connectionLost(reason)


class UpstreamBody(Protocol):
    """Reads one LiteLLM response body, watching for silence.

    ``_start_timer`` arms an inactivity timer that ``_touch_timer`` pushes back on each
    chunk; silence longer than ``idle_timeout`` calls the subclass's ``_timed_out``.
    ``_close_upstream`` drops the LiteLLM connection (cancelling a Deferred does not).
    """

    def __init__(self, clock: IReactorTime, idle_timeout: float) -> None:
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._timer: IDelayedCall | None = None

    def _start_timer(self) -> None:
        self._timer = self._clock.callLater(self._idle_timeout, self._silence)

    def _touch_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _silence(self) -> None:
        self._timer = None
        self._timed_out()

    def _timed_out(self) -> None:
        raise NotImplementedError

    def _pause_upstream(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).pauseProducing()

    def _resume_upstream(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).resumeProducing()

    def _close_upstream(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()


class BodyCollector(UpstreamBody):
    """Accumulates a response body; cancelling ``done`` closes the upstream connection."""

    def __init__(self, clock: IReactorTime, idle_timeout: float, source: str) -> None:
        super().__init__(clock, idle_timeout)
        self._source = source
        self._chunks: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def connectionMade(self) -> None:
        self._start_timer()

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)
        self._touch_timer()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self._stop_timer()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(
                bad_gateway(
                    f"LiteLLM at {self._source} broke off its answer: {reason.value}", "broken"
                )
            )

    def _timed_out(self) -> None:
        self.done.errback(
            gateway_timeout(f"LiteLLM at {self._source} sent nothing for {self._idle_timeout:g} s")
        )
        self._close_upstream()

    def _cancel(self, _: defer.Deferred[bytes]) -> None:
        self._stop_timer()
        self._close_upstream()


def relayed_headers(response: IResponse) -> Mapping[bytes, list[bytes]]:
    """The headers of LiteLLM's answer that the client should see."""
    kept: dict[bytes, list[bytes]] = {}
    for name, values in response.headers.getAllRawHeaders():
        lower = name.lower()
        if lower in RELAYED_HEADERS or lower.startswith(RELAYED_HEADER_PREFIXES):
            kept[lower] = list(values)
    return kept


def check_upstream_status(status: int, body: bytes, *, our_key: bool, base_url: str) -> None:
    """Raise the 502 that a LiteLLM 5xx (or a refusal of our own key) stands for."""
    if status >= 500:
        raise bad_gateway(f"LiteLLM answered {status}: {error_message(body)}", "status_5xx")
    if our_key and _refuses_key(status, body):
        raise bad_gateway(
            f"LiteLLM at {base_url} refused the gateway's LITELLM_API_KEY ({status}): "
            f"{error_message(body)}",
            "key_refused",
        )


__all__ = [
    "ApiError",
    "BodyCollector",
    "BytesProducer",
    "LiteLLMClient",
    "check_upstream_status",
    "make_http_client",
    "make_pool",
    "relayed_headers",
]
