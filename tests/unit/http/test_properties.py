"""Property-based tests: whatever a client sends, to whichever route, with whatever method and
headers, the answer is a success or an error in our JSON shape (or the fake LiteLLM's own
error, relayed), never a 500, never a traceback, and never a request left hanging.

Everything runs in memory (the StubTreq harness of conftest); a request "hangs" when its
Deferred has not fired once the harness is flushed.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseNeverReceived

from mpcapi.http.app import Gateway
from mpcapi.openai.openapi import routes_of
from tests.support.documents import bodies, deep_nesting, huge_integers
from tests.support.gateway import CHAT, Harness, make_harness

ROUTES = sorted({(path, method) for path, method, _ in routes_of(Gateway.app.url_map)})
KNOWN_PATHS = sorted({path.replace("{name}", "index.html") for path, _ in ROUTES})
POST_PATHS = [path for path, method in ROUTES if method == "POST"]
OPENAI_POST_PATHS = [path for path in POST_PATHS if not path.startswith("/admin/")]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "BREW"]
# Framing headers would make the in-memory request itself malformed (a Content-Length that
# lies waits for bytes that never come); every other name is fair game.
FRAMING = {"content-length", "transfer-encoding", "host", "connection"}
TCHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
# Twisted refuses a request whose header block passes 16 KiB at the connection level (see
# test_oversized_header_block_is_refused_not_hung); the properties stay below it.
HEADER_BUDGET = 12_000
SANE_ID_CHARS = set(string.ascii_letters + string.digits + "._:@/+=-")
TRACEBACK_MARKERS = (b"Traceback", b'File "', b"twisted.python.failure")

FAST = settings(
    max_examples=200,
    deadline=None,
    database=None,  # no .hypothesis/ in the work tree; failures print their example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Answer:
    code: int
    headers: dict[str, list[str]]
    body: bytes


def send(
    harness: Harness,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[bytes, list[bytes]] | None = None,
    allow_redirects: bool = True,
) -> Answer | Failure:
    """One request through the harness; fails the test when it is still pending after a
    flush (the harness is in memory: nothing may take real time)."""
    results: list[Any] = []
    request: Deferred[Any] = harness.client.request(
        method,
        f"http://mpcapi.test{path}",
        data=body,
        headers=headers or {},
        allow_redirects=allow_redirects,
    )

    def read(response: Any) -> Deferred[Any]:
        reading: Deferred[Any] = response.content()
        reading.addCallback(
            lambda content: Answer(
                response.code,
                {
                    name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
                    for name, values in response.headers.getAllRawHeaders()
                },
                content,
            )
        )
        return reading

    request.addCallback(read)
    request.addBoth(results.append)
    harness.flush()
    assert results, f"{method} {path} hung: no answer after the harness was flushed"
    result = results[0]
    assert isinstance(result, Answer | Failure)
    return result


def content_type_safe(name: bytes, value: bytes) -> bool:
    """In this in-memory harness (StubTreq's plain twisted Site, not ours), a Content-Type
    that str.splitlines splits (\\x0b, \\x1c, ...) makes Twisted's form parser raise into the
    test; the real daemon answers such requests normally (checked over TCP)."""
    if name.lower() != b"content-type":
        return True
    return len(value.decode("charmap").splitlines()) <= 1


def check(answer: Answer | Failure, method: str, path: str) -> Answer:
    """The invariants of every answer."""
    assert isinstance(answer, Answer), f"{method} {path}: no HTTP answer: {answer!r}"
    context = f"{method} {path} -> {answer.code} {answer.body[:300]!r}"
    if answer.code == 400 and answer.body == b"" and "x-request-id" not in answer.headers:
        # Twisted's HTTP parser refused the request line or a header (a control character
        # in a value) before any resource ran: a bare 400, as RFC 9112 allows.
        return answer
    assert answer.code < 500, context
    for marker in TRACEBACK_MARKERS:
        assert marker not in answer.body, context
    request_ids = answer.headers.get("x-request-id")
    assert request_ids and request_ids[0], context
    if answer.code >= 400 and method != "HEAD":
        document = json.loads(answer.body)
        assert isinstance(document, dict), context
        if isinstance(document.get("error"), dict):  # the fake LiteLLM's error, relayed
            assert isinstance(document["error"].get("message"), str), context
        else:  # ours
            assert isinstance(document.get("error"), str), context
            assert isinstance(document.get("message"), str), context
            assert document.get("request_id") == request_ids[0], context
            assert set(document) <= {"error", "message", "request_id", "details"}, context
        if answer.code == 405:
            assert answer.headers.get("allow"), context
    return answer


_HARNESS: list[Harness] = []


def shared_harness() -> Harness:
    """One gateway for all examples (building one per example would dominate the run time);
    rate limits are off and every request is independent, so examples cannot interfere."""
    if not _HARNESS:
        _HARNESS.append(make_harness())
    return _HARNESS[0]


# --- strategies --------------------------------------------------------------------------------

header_names = st.text(alphabet=TCHARS, min_size=1, max_size=40).filter(
    lambda name: name.lower() not in FRAMING
)
header_values = st.one_of(
    st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
    st.integers(min_value=1000, max_value=8000).map(lambda size: "é☃".encode() * (size // 5)),
    st.sampled_from(
        [b"Bearer x", b"Bearer", b"", b"websocket", b"application/json", b"*/*", b"\xff\xfe"]
    ),
)
known_header_names = st.sampled_from(
    [
        "authorization",
        "x-request-id",
        "content-type",
        "accept",
        "accept-encoding",
        "upgrade",
        "origin",
        "x-forwarded-for",
        "cookie",
        "expect",
        "if-none-match",
        "cache-control",
    ]
)


@st.composite
def header_sets(draw: st.DrawFn) -> dict[bytes, list[bytes]]:
    headers: dict[bytes, list[bytes]] = {}
    budget = HEADER_BUDGET
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        name = draw(known_header_names | header_names).encode("ascii")
        value = draw(header_values)
        if len(name) + len(value) > budget or not content_type_safe(name, value):
            continue
        budget -= len(name) + len(value) + 4
        headers.setdefault(name, []).append(value)
    return headers


paths = st.one_of(
    st.sampled_from(KNOWN_PATHS),
    st.sampled_from(KNOWN_PATHS).map(lambda path: path + "/"),
    st.text(max_size=60).map(lambda text: "/" + quote(text.encode("utf-8", "surrogatepass"))),
    st.sampled_from(KNOWN_PATHS).flatmap(
        lambda path: st.text(max_size=30).map(
            lambda query: path + "?" + quote(query.encode("utf-8", "surrogatepass"), safe="=&")
        )
    ),
)
methods = st.sampled_from(METHODS) | st.text(
    alphabet=string.ascii_uppercase, min_size=1, max_size=12
)


# --- the properties ------------------------------------------------------------------------------


@FAST
@given(path=st.sampled_from(POST_PATHS), body=bodies)
def test_any_body_to_any_validated_route(path: str, body: bytes) -> None:
    harness = shared_harness()
    check(send(harness, "POST", path, body, {b"content-type": [b"application/json"]}), "POST", path)


@FAST
@given(path=paths, method=methods, body=st.none() | bodies, headers=header_sets())
def test_any_request_to_any_path(
    path: str, method: str, body: bytes | None, headers: dict[bytes, list[bytes]]
) -> None:
    harness = shared_harness()
    check(send(harness, method, path, body, headers), method, path)


@FAST
@given(path=st.sampled_from(KNOWN_PATHS), headers=header_sets())
def test_odd_headers_on_every_route(path: str, headers: dict[bytes, list[bytes]]) -> None:
    harness = shared_harness()
    method = "POST" if path in POST_PATHS else "GET"
    body = json.dumps(CHAT).encode() if method == "POST" else None
    check(send(harness, method, path, body, headers), method, path)


@settings(max_examples=40, deadline=None, database=None)
@given(request_id=st.text(max_size=300))
def test_request_id_is_echoed_when_sane_and_replaced_otherwise(request_id: str) -> None:
    harness = shared_harness()
    raw = request_id.encode("utf-8", "surrogatepass")
    answer = check(send(harness, "GET", "/health", None, {b"x-request-id": [raw]}), "GET", "/x")
    if "x-request-id" not in answer.headers:  # Twisted refused a control character
        assert any(byte < 0x20 or byte == 0x7F for byte in raw)
        return
    echoed = answer.headers["x-request-id"][0]
    sane = 1 <= len(raw) <= 128 and all(chr(byte) in SANE_ID_CHARS for byte in raw)
    if sane:
        assert echoed == request_id
    else:
        assert echoed != request_id
    assert 1 <= len(echoed) <= 128


@FAST
@given(
    path=st.sampled_from(OPENAI_POST_PATHS),
    field=st.sampled_from(["temperature", "top_p", "n", "max_tokens", "dimensions"]),
    number=st.one_of(huge_integers, st.floats(allow_nan=False), st.just(10**4300 - 1)),
)
def test_huge_numbers_in_known_fields(path: str, field: str, number: int | float) -> None:
    harness = shared_harness()
    document: dict[str, Any] = {**CHAT, "prompt": "x", "input": "x", field: number}
    body = json.dumps(document).encode()
    answer = check(send(harness, "POST", path, body), "POST", path)
    assert answer.code in (200, 400)


# --- examples the properties only reach by chance ---------------------------------------------


def test_oversized_header_block_is_refused_not_hung() -> None:
    """Past Twisted's 16 KiB header limit the connection is refused before any resource runs:
    no JSON body, but no hang and no 500 either."""
    harness = make_harness()
    result = send(harness, "GET", "/health", None, {b"x-big": [b"a" * 20_000]})
    if isinstance(result, Failure):
        assert result.check(ResponseNeverReceived)
    else:
        assert result.code == 400


def test_deepest_nesting_is_a_400() -> None:
    harness = make_harness()
    for kind in ("array", "object"):
        body = deep_nesting(1_000_000, kind)
        answer = check(send(harness, "POST", "/api/chat/completions", body), "POST", "/api")
        assert answer.code == 400


def test_canonical_url_redirect_is_a_308_not_a_500() -> None:
    """werkzeug redirects /dashboard/index.html to the route with that default, /dashboard/;
    that was a 500 (RequestRedirect reached the catch-all handler)."""
    result = send(make_harness(), "GET", "/dashboard/index.html", allow_redirects=False)
    answer = check(result, "GET", "/dashboard/index.html")
    assert answer.code == 308
    assert answer.headers["location"] == ["/dashboard/"]
