"""The least a Twisted reverse proxy can do: what Twisted itself costs, for bench/run to compare.

Plain twisted.web server + twisted.web.client.Agent over one persistent HTTPConnectionPool.
`/api/chat/completions` -> `<upstream>/chat/completions`, `/api/models` -> `<upstream>/models`,
copying method, body, status and content type. No validation, no logging, no error mapping.
"""

# mypy: disable-error-code="no-untyped-call"

import argparse
from io import BytesIO
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.web import http, resource, server
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

reactor: Any = _reactor

ROUTES = {b"/api/chat/completions": b"/chat/completions", b"/api/models": b"/models"}


class Proxy(resource.Resource):
    isLeaf = True

    def __init__(self, agent: Agent, upstream: bytes) -> None:
        super().__init__()
        self.agent, self.upstream = agent, upstream

    def render(self, request: server.Request) -> int | bytes:
        target = ROUTES.get(request.path)
        if target is None:
            request.setResponseCode(http.NOT_FOUND)
            return b'{"error":"not_found"}'
        body = request.content.read() if request.content is not None else b""
        headers = Headers({b"content-type": [b"application/json"]})
        producer: Any = FileBodyProducer(BytesIO(body)) if body else None
        d = self.agent.request(request.method, self.upstream + target, headers, producer)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def relay(response: IResponse) -> object:
            request.setResponseCode(response.code)
            for value in response.headers.getRawHeaders(b"content-type", []):
                request.setHeader(b"content-type", value)
            return readBody(response).addCallback(send)

        def send(data: bytes) -> None:
            if not gone:
                request.write(data)
                request.finish()

        def fail(reason: object) -> None:
            if not gone:
                request.setResponseCode(http.BAD_GATEWAY)
                request.finish()

        d.addCallback(relay).addErrback(fail)
        return server.NOT_DONE_YET


class QuietSite(server.Site):
    def log(self, request: http.Request) -> None:
        """No access log: the minimal proxies measure their frameworks, not logging."""


def pool_from_arguments(description: str) -> tuple[argparse.Namespace, HTTPConnectionPool]:
    """The minimal proxies' command line (port, upstream, pool size) and their persistent pool."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:4000")
    parser.add_argument("--pool-size", type=int, default=256, help="idle connections kept")
    args = parser.parse_args()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = args.pool_size
    return args, pool


def serve(root: resource.IResource, port: int) -> None:
    """Serve ``root`` on 127.0.0.1:``port`` until the process is stopped."""
    reactor.listenTCP(port, QuietSite(root), backlog=1024, interface="127.0.0.1")
    reactor.run()


def main() -> None:
    args, pool = pool_from_arguments(__doc__.splitlines()[0])
    serve(Proxy(Agent(reactor, pool=pool), args.upstream.rstrip("/").encode()), args.port)


if __name__ == "__main__":
    main()
