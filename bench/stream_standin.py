"""A stand-in streaming LiteLLM for bench/streams.py: timed SSE chat completion chunks.

`POST /chat/completions` with `"stream": true` answers `text/event-stream` with N
`chat.completion.chunk` events, the first at once and then one every `interval` ms (timers,
never sleeps: thousands of streams at once), then `data: [DONE]`. Each chunk carries
`"sent_at"` (the server's `time.time()` just before the write) and `"seq"` (0..N-1), so a
client can compute how long each event took to reach it. A request may override the defaults
with a top-level `"stand_in": {"events": 30, "interval_ms": 1000}` (MPC-API passes unknown
fields through unchanged). Without `"stream": true` it answers one `chat.completion`. With
`--models`, a model not in the list gets LiteLLM's 400 "Invalid model name" error.

For bench/bodies.py, two audio routes that never hold a large body in memory:
`POST /audio/transcriptions` counts the bytes of the upload (Twisted keeps a large body in a
temporary file; it is read back in 64 KiB chunks) and answers a transcription whose text says
how many (`received N bytes`, also in the `x-standin-received-bytes` header);
`POST /audio/speech` answers `audio/mpeg` with as many bytes as its `"input"` says when that
is a number (1000 otherwise), written 64 KiB at a time by a push producer that stops while the
client's connection is paused (backpressure).

The main port counts its connections and streams; `GET /stats` on the control port (which is
not counted) reports them, `POST /stats/reset` sets the peaks to the current values. Only
warnings and errors are logged (to stdout, after one start-up line).

    .venv/bin/python bench/stream_standin.py --port 4000 --control-port 4001
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import sys
import time
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

reactor: Any = _reactor

MODEL = "gpt-4o-mini"
AUDIO_CHUNK = 64 * 1024
SPEECH_DEFAULT_BYTES = 1000
# Chunks written per reactor turn at most, so that one answer cannot starve the others even
# if the transport were slow to pause us.
SPEECH_BURST = 16
_AUDIO_BYTES = bytes(range(256)) * (AUDIO_CHUNK // 256)  # one chunk, reused for every write


class Stats:
    """Connections and streams on the main port: now, peak since the last reset, totals."""

    def __init__(self) -> None:
        self.connections = 0
        self.peak_connections = 0
        self.total_connections = 0
        self.streams = 0
        self.peak_streams = 0
        self.streams_started = 0
        self.streams_completed = 0
        self.streams_aborted = 0
        self.uploads = 0
        self.upload_bytes_last = 0  # the body bytes of the last upload
        self.speech_answers = 0
        self.speech_bytes_sent = 0  # in all, including answers cut short

    def connection_opened(self) -> None:
        self.connections += 1
        self.total_connections += 1
        self.peak_connections = max(self.peak_connections, self.connections)

    def connection_closed(self) -> None:
        self.connections -= 1

    def stream_started(self) -> None:
        self.streams += 1
        self.streams_started += 1
        self.peak_streams = max(self.peak_streams, self.streams)

    def stream_ended(self, completed: bool) -> None:
        self.streams -= 1
        if completed:
            self.streams_completed += 1
        else:
            self.streams_aborted += 1

    def reset_peaks(self) -> None:
        self.peak_connections = self.connections
        self.peak_streams = self.streams

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class CountingChannel(http.HTTPChannel):
    """An HTTPChannel that reports its connection's life to the site's `Stats`."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self._stats().connection_opened()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._stats().connection_closed()
        super().connectionLost(reason)

    def _stats(self) -> Stats:
        stats: Stats = self.site.stats  # type: ignore[attr-defined]
        return stats


class QuietSite(server.Site):
    noisy = False

    def __init__(self, root: Resource) -> None:
        # Twisted would otherwise parse a multipart body into request.args, whole and in
        # memory (some 600 MB for a 50 MB upload): LiteLLM streams uploads, so must we.
        super().__init__(root, parsePOSTFormSubmission=False)

    def log(self, request: Any) -> None:
        """No access log: it would cost more than the answers."""


class CountingSite(QuietSite):
    protocol = CountingChannel  # type: ignore[assignment]

    def __init__(self, root: Resource, stats: Stats) -> None:
        super().__init__(root)
        self.stats = stats


_ids = itertools.count(1)


class ChunkStream:
    """One streamed answer: `events` chunks on a timer, then `[DONE]` and the end."""

    def __init__(
        self, request: server.Request, stats: Stats, events: int, interval: float, model: str
    ) -> None:
        self._request = request
        self._stats = stats
        self._events = events
        self._interval = interval
        self._id = f"chatcmpl-standin-{next(_ids)}"
        self._model = model
        self._created = int(time.time())
        self._seq = 0
        self._start = reactor.seconds()
        self._timer: IDelayedCall | None = None
        self._over = False

    def start(self) -> None:
        self._stats.stream_started()
        self._request.notifyFinish().addErrback(self._client_gone)
        self._tick()

    def _chunk(self, seq: int) -> bytes:
        last = seq == self._events - 1
        delta: dict[str, str] = {"role": "assistant"} if seq == 0 else {}
        if not last or seq == 0:
            delta["content"] = f"tok{seq} "
        document = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": "stop" if last else None,
                }
            ],
            "seq": seq,
            "sent_at": time.time(),
        }
        return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"

    def _tick(self) -> None:
        self._timer = None
        if self._over:
            return
        self._request.write(self._chunk(self._seq))
        self._seq += 1
        if self._seq < self._events:
            due = self._start + self._seq * self._interval
            self._timer = reactor.callLater(max(0.0, due - reactor.seconds()), self._tick)
            return
        self._request.write(b"data: [DONE]\n\n")
        self._over = True
        self._stats.stream_ended(completed=True)
        self._request.finish()

    def _client_gone(self, _: Failure) -> None:
        if self._over:
            return
        self._over = True
        self._stats.stream_ended(completed=False)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _json(request: server.Request, status: int, document: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(document).encode()


class ChatCompletions(Resource):
    isLeaf = True

    def __init__(
        self, stats: Stats, events: int, interval_ms: float, models: frozenset[str] = frozenset()
    ) -> None:
        super().__init__()
        self._stats = stats
        self._events = events
        self._interval_ms = interval_ms
        self._models = models

    def render_POST(self, request: server.Request) -> bytes | int:
        try:
            body = json.loads(request.content.read() if request.content is not None else b"")
            options = body.get("stand_in") or {}
            events = max(1, int(options.get("events", self._events)))
            interval = float(options.get("interval_ms", self._interval_ms)) / 1000
            model = str(body.get("model") or MODEL)
        except (ValueError, TypeError, AttributeError) as err:
            message = {"message": f"bad request: {err}", "type": "invalid_request_error"}
            return _json(request, 400, {"error": message})
        if self._models and model not in self._models:
            return _json(request, 400, unknown_model(model))
        if body.get("stream") is not True:
            return _json(request, 200, completion(model))
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        ChunkStream(request, self._stats, events, interval, model).start()
        return server.NOT_DONE_YET


def unknown_model(model: str) -> dict[str, Any]:
    """LiteLLM's answer to a model it does not serve (400, its error shape)."""
    message = (
        f"Invalid model name passed in model={model}. "
        "Call `/v1/models` to view available models for your key."
    )
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": "400"}
    }


def completion(model: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": "Hello from the stand-in."}
    return {
        "id": f"chatcmpl-standin-{next(_ids)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


class Static(Resource):
    isLeaf = True

    def __init__(self, document: Any) -> None:
        super().__init__()
        self._document = document

    def render_GET(self, request: server.Request) -> bytes:
        return _json(request, 200, self._document)


class StatsResource(Resource):
    isLeaf = True

    def __init__(self, stats: Stats) -> None:
        super().__init__()
        self._stats = stats

    def render_GET(self, request: server.Request) -> bytes:
        return _json(request, 200, self._stats.as_dict())

    def render_POST(self, request: server.Request) -> bytes:
        self._stats.reset_peaks()
        return _json(request, 200, self._stats.as_dict())


class Transcriptions(Resource):
    """`POST /audio/transcriptions`: counts the upload's bytes, answers a transcription."""

    isLeaf = True

    def __init__(self, stats: Stats) -> None:
        super().__init__()
        self._stats = stats

    def render_POST(self, request: server.Request) -> bytes:
        received = 0
        content = request.content
        if content is not None:
            content.seek(0, os.SEEK_SET)  # read back in chunks: never the whole body at once
            while chunk := content.read(AUDIO_CHUNK):
                received += len(chunk)
        self._stats.uploads += 1
        self._stats.upload_bytes_last = received
        request.setHeader(b"x-standin-received-bytes", b"%d" % received)
        answer = {"text": f"received {received} bytes", "usage": {"type": "duration", "seconds": 1}}
        return _json(request, 200, answer)


@implementer(IPushProducer)
class AudioBody:
    """`size` bytes of audio written in chunks while the client's connection takes them:
    paused by the transport when its buffer is full, resumed when it drains."""

    def __init__(self, request: server.Request, stats: Stats, size: int) -> None:
        self._request = request
        self._stats = stats
        self._left = size
        self._paused = False
        self._over = False
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        self._stats.speech_answers += 1
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None and not self._paused and not self._over:
            self._call = reactor.callLater(0, self._write)

    def _write(self) -> None:
        self._call = None
        for _ in range(SPEECH_BURST):
            if self._paused or self._over or self._left <= 0:
                break
            n = min(AUDIO_CHUNK, self._left)
            self._left -= n
            self._stats.speech_bytes_sent += n
            # (write may pause us at once: the loop then stops)
            self._request.write(_AUDIO_BYTES if n == AUDIO_CHUNK else _AUDIO_BYTES[:n])
        if self._over:
            return
        if self._left <= 0:
            self._over = True
            self._request.unregisterProducer()
            self._request.finish()
            return
        self._schedule()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self._over = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class Speech(Resource):
    """`POST /audio/speech`: as many bytes of `audio/mpeg` as `"input"` says (a number)."""

    isLeaf = True

    def __init__(self, stats: Stats) -> None:
        super().__init__()
        self._stats = stats

    def render_POST(self, request: server.Request) -> bytes | int:
        try:
            body = json.loads(request.content.read() if request.content is not None else b"")
            spoken = str(body.get("input", ""))
        except (ValueError, AttributeError) as err:
            message = {"message": f"bad request: {err}", "type": "invalid_request_error"}
            return _json(request, 400, {"error": message})
        size = int(spoken) if spoken.strip().isdigit() else SPEECH_DEFAULT_BYTES
        request.setHeader(b"content-type", b"audio/mpeg")
        AudioBody(request, self._stats, size).start()
        return server.NOT_DONE_YET


def build_root(
    stats: Stats, events: int, interval_ms: float, served: frozenset[str] = frozenset()
) -> Resource:
    root = Resource()
    root.putChild(b"chat", Resource())
    completions = ChatCompletions(stats, events, interval_ms, served)
    root.children[b"chat"].putChild(b"completions", completions)
    models = {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}
    root.putChild(b"models", Static(models))
    audio = Resource()
    audio.putChild(b"transcriptions", Transcriptions(stats))
    audio.putChild(b"speech", Speech(stats))
    root.putChild(b"audio", audio)
    health = Resource()
    health.putChild(b"liveliness", Static("I'm alive!"))
    root.putChild(b"health", health)
    root.putChild(b"stats", StatsResource(stats))
    return root


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    p = argparse.ArgumentParser(description="Stand-in streaming LiteLLM for bench/streams.py")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4000, help="the counted, LiteLLM-like port")
    p.add_argument("--control-port", type=int, default=0, help="uncounted port (0: none)")
    p.add_argument("--events", type=int, default=20, help="chunks per stream (20)")
    p.add_argument("--interval-ms", type=float, default=100.0, help="ms between chunks (100)")
    p.add_argument("--backlog", type=int, default=4096, help="listen backlog (4096)")
    p.add_argument(
        "--models",
        default="",
        help="comma-separated models it serves; any other gets LiteLLM's 400 (default: any)",
    )
    args = p.parse_args()
    models = frozenset(m.strip() for m in args.models.split(",") if m.strip())
    raise_nofile_limit()
    # Only warnings and errors reach the log: bench/streams.py counts them as errors.
    only_problems = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stdout), [only_problems])],
        redirectStandardIO=False,
    )
    stats = Stats()
    root = build_root(stats, args.events, args.interval_ms, models)
    reactor.listenTCP(
        args.port, CountingSite(root, stats), backlog=args.backlog, interface=args.host
    )
    if args.control_port:
        reactor.listenTCP(args.control_port, QuietSite(root), interface=args.host)
    print(
        f"stream stand-in on {args.host}:{args.port} (control {args.control_port}): "
        f"{args.events} events every {args.interval_ms:g} ms",
        flush=True,
    )
    reactor.run()


if __name__ == "__main__":
    main()
