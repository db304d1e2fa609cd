"""The least a Klein + treq reverse proxy can do: what the two frameworks cost on top of plain
Twisted (bench/reference_proxy.py), for bench/run to compare.

One Klein route per forwarded path, the handler a coroutine that sends the body with treq over
one persistent ``HTTPConnectionPool`` (unbuffered, no cookies, no redirects, as MPC-API calls
it) and relays status, content type and body. No validation, no logging, no error mapping:
the floor under MPC-API that its choice of web framework and HTTP client sets.
"""

from __future__ import annotations

from typing import Any

import treq
from klein import Klein
from reference_proxy import pool_from_arguments, reactor, serve
from twisted.web import server
from twisted.web.client import Agent

# The same refusing jar MPC-API gives treq: treq's default jar would build a cookie policy
# check per request, which no proxy wants.
from mpcapi.upstream.http import NO_COOKIES


class Proxy:
    app = Klein()

    def __init__(self, client: treq.client.HTTPClient, upstream: str) -> None:
        self.client, self.upstream = client, upstream

    async def forward(self, request: server.Request, path: str) -> bytes:
        body = request.content.read() if request.content is not None else b""
        response = await self.client.request(
            request.method.decode("ascii"),
            self.upstream + path,
            data=body or None,
            headers={b"content-type": [b"application/json"]},
            cookies=NO_COOKIES,
            allow_redirects=False,
            unbuffered=True,
        )
        request.setResponseCode(response.code)
        for value in response.headers.getRawHeaders(b"content-type", []):
            request.setHeader(b"content-type", value)
        answer: bytes = await response.content()
        return answer

    @app.route("/api/chat/completions", methods=["POST"])
    def chat(self, request: server.Request) -> Any:
        return self.forward(request, "/chat/completions")

    @app.route("/api/models", methods=["GET"])
    def models(self, request: server.Request) -> Any:
        return self.forward(request, "/models")


def main() -> None:
    args, pool = pool_from_arguments((__doc__ or "").splitlines()[0])
    client = treq.client.HTTPClient(Agent(reactor, pool=pool), cookiejar=NO_COOKIES)
    serve(Proxy(client, args.upstream.rstrip("/")).app.resource(), args.port)


if __name__ == "__main__":
    main()
