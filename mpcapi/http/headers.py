"""Response headers every answer gets: basic security headers, and CORS when allowed.

CORS is off by default: browsers may call MPC-API only from the origins listed in
``MPCAPI_CORS_ORIGINS`` (``*`` for any). A preflight from a listed origin gets 204 with
the methods and headers it may use; one from any other origin gets 403.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from mpcapi.errors import ApiError, render_error
from mpcapi.http.requestlog import exchange_of

SECURITY_HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"server": b"mpc-api",  # not Twisted's name and version
}
ALLOWED_METHODS = b"GET, POST, OPTIONS"
ALLOWED_HEADERS = frozenset(
    {"authorization", "content-type", "x-request-id", "cache-control", "openai-organization"}
)
# What a browser script may read from our answers (SDKs back off with these).
EXPOSED_HEADERS = (
    b"x-request-id, retry-after, x-mpcapi-cache, x-ratelimit-limit-requests, "
    b"x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, "
    b"x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens"
)
PREFLIGHT_MAX_AGE = b"600"


class CorsPolicy:
    """Which browser origins may call us."""

    def __init__(self, origins: Iterable[str]) -> None:
        listed = {origin.strip().rstrip("/") for origin in origins if origin.strip()}
        self.any_origin = "*" in listed
        self.origins = frozenset(listed - {"*"})

    def allows(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins


class ResponseHeaders(Resource):
    """Wraps a leaf resource: security headers on every answer, CORS for listed origins."""

    isLeaf = True

    def __init__(self, wrapped: IResource, cors: CorsPolicy) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._cors = cors

    def render(self, request: Any) -> Any:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        origin = request.getHeader(b"origin")
        if origin is not None:
            origin = origin.decode("latin-1") if isinstance(origin, bytes) else origin
            if request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
                return self._preflight(request, origin)
            if self._cors.allows(origin):
                self._allow(request, origin)
        result = self._wrapped.render(request)
        return NOT_DONE_YET if result is NOT_DONE_YET else result

    def _allow(self, request: Any, origin: str) -> None:
        request.setHeader(b"access-control-allow-origin", origin.encode("latin-1"))
        request.setHeader(b"access-control-expose-headers", EXPOSED_HEADERS)
        request.setHeader(b"vary", b"Origin")

    def _preflight(self, request: Any, origin: str) -> bytes:
        if not self._cors.allows(origin):
            refusal = ApiError(403, "Forbidden", f"origin {origin} may not call this API")
            return render_error(request, refusal, exchange_of(request))
        asked = request.getHeader(b"access-control-request-headers") or b""
        asked_text = asked.decode("latin-1") if isinstance(asked, bytes) else asked
        wanted = [name.strip().lower() for name in asked_text.split(",") if name.strip()]
        granted = ", ".join(name for name in wanted if name in ALLOWED_HEADERS)
        self._allow(request, origin)
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", ALLOWED_METHODS)
        if granted:
            request.setHeader(b"access-control-allow-headers", granted.encode("ascii"))
        request.setHeader(b"access-control-max-age", PREFLIGHT_MAX_AGE)
        request.setHeader(b"content-length", b"0")
        return b""
