"""SSE relay: LiteLLM's event stream to the client, chunk by chunk.

Each chunk LiteLLM sends is written to the client the moment it arrives, and read as the
route's family of events (``mpcapi.openai.events``: chat, Responses, Anthropic). The relay is
the client connection's producer, so a slow reader pauses the upstream read
(backpressure); a client that leaves closes the upstream connection; silence longer than
``LITELLM_TIMEOUT`` and an upstream that breaks off without ``data: [DONE]`` end the
stream with one SSE error event in the family's shape, so SDKs raise instead of hanging.
"""

from __future__ import annotations

from enum import Enum

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.server import Request
from zope.interface import implementer

from mpcapi.exchange import Exchange
from mpcapi.openai.events import CHAT_EVENTS, EventFormat
from mpcapi.openai.sse import SSEEvent, SSEParser
from mpcapi.upstream.bodies import UpstreamBody

SSE_HEADERS = {
    b"content-type": b"text/event-stream",
    b"cache-control": b"no-cache",
    b"x-accel-buffering": b"no",
}


class StreamEnd(Enum):
    """How a relayed stream ended; logged with the request."""

    COMPLETED = "completed"
    CLIENT_ABORT = "client_abort"
    UPSTREAM_ERROR = "upstream_error"
    TIMEOUT = "timeout"


@implementer(IPushProducer)
class ClientRelay(UpstreamBody):
    """Writes LiteLLM's body through to the client's request, as the client's producer:
    a slow reader pauses LiteLLM, a client that leaves closes the LiteLLM connection.

    ``ended`` fires with a ``StreamEnd`` once the body is over, however it ended.
    Subclasses write what arrives and say how it ends (``_end``).
    """

    def __init__(
        self, request: Request, exchange: Exchange, clock: IReactorTime, idle_timeout: float
    ) -> None:
        super().__init__(clock, idle_timeout)
        self._request = request
        self._exchange = exchange
        self.outcome: StreamEnd | None = None
        self.ended: Deferred[StreamEnd] = Deferred()

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(self._client_gone)
        self._start_timer()

    # Client side (IPushProducer): the client's transport tells us to slow down.

    def pauseProducing(self) -> None:
        self._pause_upstream()

    def resumeProducing(self) -> None:
        self._resume_upstream()

    def stopProducing(self) -> None:
        # The client's connection is closing; the request hears of it right after, and only
        # then may the handler return (or Klein would finish a request that is gone).
        self._abandon()

    def _client_gone(self, _: object) -> None:
        self._abandon()
        self._announce(self.outcome or StreamEnd.CLIENT_ABORT)

    def _abandon(self) -> None:
        if self.outcome is None:
            self.outcome = StreamEnd.COMPLETED if self._complete() else StreamEnd.CLIENT_ABORT
            self._exchange.stream_end = self.outcome.value
            self._stop_timer()
            self._close_upstream()

    def _complete(self) -> bool:
        """Whether a client that leaves now has had everything."""
        return False

    def _announce(self, outcome: StreamEnd) -> None:
        if not self.ended.called:  # it was cancelled if the handler was
            self.ended.callback(outcome)


class SSERelay(ClientRelay):
    """Relays LiteLLM's event stream, reading it as the route's family of events."""

    def __init__(
        self,
        request: Request,
        exchange: Exchange,
        clock: IReactorTime,
        idle_timeout: float,
        hide_usage: bool = False,
        events: EventFormat = CHAT_EVENTS,
    ) -> None:
        # The stream's facts (events, first byte, text chunks, usage, end) go on the exchange.
        super().__init__(request, exchange, clock, idle_timeout)
        exchange.streamed = True
        # True when we asked LiteLLM for usage and the client did not: the usage-only chunk is
        # counted, not relayed, so events are written whole, one at a time, as they complete.
        self._hide_usage = hide_usage
        self._parser = SSEParser()
        self._events = events
        self._reader = events.reader()

    @property
    def object_ids(self) -> list[str]:
        """The ids the stream gave what it created (a stored response)."""
        return self._reader.object_ids

    # Upstream side (IProtocol)

    def dataReceived(self, data: bytes) -> None:
        if self.outcome is not None:
            return
        exchange = self._exchange
        if exchange.first_byte_at is None:
            exchange.first_byte_at = self._clock.seconds()
        if self._hide_usage:
            for raw, event in self._parser.feed_frames(data):
                if event is None or not self._observe(event):
                    self._request.write(raw)
        else:
            self._request.write(data)
            for event in self._parser.feed(data):
                self._observe(event)
        self._touch_timer()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        if self.outcome is not None:
            return
        if reason.check(ResponseDone) and self._exchange.saw_done:
            self._end(StreamEnd.COMPLETED)
        else:
            end = "[DONE]" if self._events is CHAT_EVENTS else "its end event"
            why = f"without {end}" if reason.check(ResponseDone) else f": {reason.value}"
            self._end(
                StreamEnd.UPSTREAM_ERROR,
                self._events.error_event(
                    f"LiteLLM closed the stream {why}".replace(" :", ":"), "upstream_error"
                ),
            )

    # Internals

    def _observe(self, event: SSEEvent) -> bool:
        """Count the event; note the end marker, the usage and the text events. True when
        the event is the usage-only chunk we asked for and the client did not."""
        exchange = self._exchange
        reader = self._reader
        text, usage_only = reader.read(event)
        exchange.saw_done = reader.done
        if text:
            exchange.content_deltas += 1
        if reader.usage is not None:
            exchange.usage = reader.usage
            if self._hide_usage and usage_only:
                return True  # the client never sees it: not one of its events
        exchange.events += 1
        return False

    def _timed_out(self) -> None:
        message = f"LiteLLM sent nothing for {self._idle_timeout:g} s"
        self._end(StreamEnd.TIMEOUT, self._events.error_event(message, "timeout"))
        self._close_upstream()

    def _complete(self) -> bool:
        # A client that closes once it has [DONE] (the OpenAI SDK does) got everything.
        return self._exchange.saw_done

    def _end(self, outcome: StreamEnd, last_event: bytes = b"") -> None:
        self.outcome = outcome
        self._exchange.stream_end = outcome.value
        self._stop_timer()
        self._request.unregisterProducer()
        if self._hide_usage and self._parser.rest():
            self._request.write(self._parser.rest())  # an unfinished last event, as it came
        if last_event:
            self._request.write(last_event)
        self._request.finish()
        self._announce(outcome)
