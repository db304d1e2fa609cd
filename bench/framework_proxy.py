"""The least a Klein + treq reverse proxy can do: what the two frameworks cost on top of plain
Twisted (bench/reference_proxy.py), for bench/run to compare.

One Klein route per forwarded path, the handler a coroutine that sends the body with treq over
one persistent ``HTTPConnectionPool`` (unbuffered, no cookies, no redirects, as MPC-API calls
it) and relays status, content type and body. No validation, no logging, no error mapping:
the floor under MPC-API that its choice of web framework and HTTP client sets.
"""

from __future__ import annotations

import argparse
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import treq
from klein import Klein
from twisted.internet import reactor as _reactor
from twisted.web import http, server
from twisted.web.client import Agent, HTTPConnectionPool

reactor: Any = _reactor


class _NoCookies(CookieJar):
    def __init__(self) -> None:
        super().__init__(policy=DefaultCookiePolicy(allowed_domains=[]))

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


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
            cookies=_JAR,
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


_JAR = _NoCookies()


class QuietSite(server.Site):
    def log(self, request: http.Request) -> None:
        """No access log: this proxy measures the frameworks, not logging."""


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:4000")
    parser.add_argument("--pool-size", type=int, default=256, help="idle connections kept")
    args = parser.parse_args()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = args.pool_size
    client = treq.client.HTTPClient(Agent(reactor, pool=pool), cookiejar=_JAR)
    proxy = Proxy(client, args.upstream.rstrip("/"))
    site = QuietSite(proxy.app.resource())
    reactor.listenTCP(args.port, site, backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
