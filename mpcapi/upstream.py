"""The LiteLLM client: treq over our own connection pool, timeouts, error mapping.

``LiteLLMClient.send`` resolves when LiteLLM's response headers arrive (or raises a
502/504 ``ApiError``); ``read_body`` collects a body with an inactivity timeout and
closes the upstream connection when cancelled, which ``treq.collect`` alone does not.
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
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    PotentialDataLoss,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
    _StandardEndpointFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from mpcapi.errors import ApiError, bad_gateway, gateway_timeout
from mpcapi.settings import Settings

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


class _QuietClientFactory(_HTTP11ClientFactory):
    """No "Starting factory" log line for every new upstream connection."""

    noisy = False


def make_pool(reactor: Any, settings: Settings) -> HTTPConnectionPool:
    """A persistent pool sized for many concurrent requests to one LiteLLM."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = settings.pool_size
    # Below uvicorn's 5 s keep-alive, so we rarely reuse a connection LiteLLM is closing.
    pool.cachedConnectionTimeout = 4
    pool.retryAutomatically = True
    pool._factory = _QuietClientFactory
    return pool


@implementer(IAgentEndpointFactory)
class _ReusedEndpoints:
    """One endpoint per upstream host: Agent would build (and IDNA-encode) one per request."""

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._standard = _StandardEndpointFactory(
            reactor, BrowserLikePolicyForHTTPS(), connect_timeout, None
        )
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
    no_cookies: Any = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return treq.client.HTTPClient(agent, cookiejar=no_cookies, data_to_body_producer=BytesProducer)


class _WireURL(EncodedURL):
    """A URL already in its wire form: treq need not IDNA-encode it on every request."""

    def to_uri(self) -> _WireURL:  # type: ignore[override]
        return self


# Passed as each request's cookies: treq would otherwise build an empty jar per request.
_NO_COOKIES = CookieJar()


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


@attrs.define
class LiteLLMClient:
    """Sends requests to one LiteLLM Gateway and maps transport failures to ``ApiError``."""

    base_url: str
    api_key: str
    http: Any
    clock: IReactorTime
    timeout: float

    _urls: dict[str, EncodedURL] = attrs.field(factory=dict, init=False)

    def url(self, path: str) -> EncodedURL:
        """The parsed URL of ``path`` under the base URL, built once per path."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = _WireURL.from_text(self.base_url + path)
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
        """Send one request; return the response once its headers have arrived."""
        limit = self.timeout if timeout is None else timeout
        d = self.http.request(
            method,
            self.url(path),
            headers=self.headers(authorization, request_id),
            data=body,
            cookies=_NO_COOKIES,
            allow_redirects=False,
            unbuffered=True,
        )
        timed_out = []

        def give_up() -> None:
            timed_out.append(True)
            d.cancel()  # aborts the connection, so LiteLLM sees us leave

        timer = self.clock.callLater(limit, give_up)
        try:
            response: IResponse = await d
        except Exception as failure:
            if timed_out:
                raise gateway_timeout(
                    f"LiteLLM at {self.base_url} did not answer within {limit:g} s"
                ) from None
            if _cancelled(failure):  # the client left; nobody is waiting for an answer
                raise defer.CancelledError() from None
            if isinstance(failure, _UNREACHABLE):
                raise bad_gateway(
                    f"LiteLLM at {self.base_url} is unreachable: {_reason(failure)}",
                    "unreachable",
                ) from None
            raise
        finally:
            if timer.active():
                timer.cancel()
        return response

    def read_body(self, response: IResponse) -> defer.Deferred[bytes]:
        """Collect the whole body; 504 after ``timeout`` s of silence, 502 if cut short."""
        collector = BodyCollector(self.clock, self.timeout, self.base_url)
        response.deliverBody(collector)
        return collector.done


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
