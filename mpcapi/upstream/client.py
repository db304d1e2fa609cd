"""The LiteLLM client: requests over treq (``upstream.http``), timeouts, error mapping.

``LiteLLMClient.send`` resolves when LiteLLM's response headers arrive (or raises a
502/504 ``ApiError``); ``read_body`` collects a body with an inactivity timeout and
closes the upstream connection when cancelled, which ``treq.collect`` alone does not.
With several instances (see ``balancer``) ``send`` picks one per request and moves a
request to another only when the first refused the connection: nothing of it was sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from hyperlink import EncodedURL
from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IReactorTime,
)
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from mpcapi.config.live import LiveSettings
from mpcapi.config.settings import without_password
from mpcapi.errors import ApiError, bad_gateway, gateway_timeout
from mpcapi.tracing.context import TraceContext
from mpcapi.upstream.balancer import Balancer, Upstream, split_urls
from mpcapi.upstream.bodies import BodyCollector, CountedResponse
from mpcapi.upstream.http import NO_COOKIES, WireURL

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

    def url(self, path: str, upstream: Upstream | None = None, fixed: bool = True) -> EncodedURL:
        """The parsed URL of ``path`` on ``upstream`` (the first instance); built once for a
        ``fixed`` path (a route's own), each time for one with ids or a query in it."""
        if upstream is None:
            upstream = self.balancer.instances[0]
        if not fixed:
            return WireURL.from_text(upstream.base_url + path)
        url = upstream.urls.get(path)
        if url is None:
            url = upstream.urls[path] = WireURL.from_text(upstream.base_url + path)
        return url

    def headers(
        self,
        client_authorization: bytes | None,
        request_id: str,
        trace: TraceContext | None = None,
    ) -> Headers:
        """Our key when we have one, else the client's own Authorization; the trace
        context, with our LiteLLM call as the parent, when tracing is on."""
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
        if trace is not None:
            headers.setRawHeaders(b"traceparent", [trace.upstream_traceparent()])
            if trace.tracestate:
                headers.setRawHeaders(b"tracestate", [trace.tracestate.encode("latin-1")])
        return headers

    async def send(
        self,
        method: str,
        path: str,
        *,
        body: bytes | IBodyProducer | None = None,
        authorization: bytes | None = None,
        request_id: str,
        timeout: float | None = None,
        trace: TraceContext | None = None,
        fixed: bool = True,
        content_type: bytes | None = None,
        passed: Mapping[bytes, Sequence[bytes]] | None = None,
    ) -> IResponse:
        """Send one request; return the response once its headers have arrived. ``body``
        is JSON unless ``content_type`` says otherwise (an upload streamed from a file is
        an ``IBodyProducer``); ``passed`` are client headers LiteLLM should see; ``fixed``
        says ``path`` is a route's own (no ids, no query).

        The response counts among its instance's requests in flight until its body has been
        read (or the stream has ended, however it ended).
        """
        limit = self.timeout if timeout is None else timeout
        headers = self.headers(authorization, request_id, trace)
        if content_type is not None:
            headers.setRawHeaders(b"content-type", [content_type])
        for name, values in (passed or {}).items():
            headers.setRawHeaders(name, list(values))
        balancer = self.balancer
        upstream = balancer.pick()
        assert upstream is not None
        tried: list[Upstream] = []
        deadline = self.clock.seconds() + limit
        wait = limit
        while True:
            upstream.in_flight += 1
            try:
                response = await self._exchange(
                    upstream, method, path, headers, body, wait, limit, fixed
                )
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
            return CountedResponse(response, upstream)

    async def _exchange(
        self,
        upstream: Upstream,
        method: str,
        path: str,
        headers: Headers,
        body: bytes | IBodyProducer | None,
        wait: float,
        limit: float,
        fixed: bool = True,
    ) -> IResponse:
        """One request to one instance; ``_NeverConnectedError`` when it never connected."""
        d = self.http.request(
            method,
            self.url(path, upstream, fixed),
            headers=headers,
            data=body,
            cookies=NO_COOKIES,
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


__all__ = ["LiteLLMClient", "check_upstream_status", "error_message", "relayed_headers"]
