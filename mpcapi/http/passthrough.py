"""Binary relay: an answer that is not JSON (speech audio, a file's contents) written to the
client as it arrives, never held whole.

The relay is the client connection's producer, so a slow reader pauses the upstream read
(backpressure) and memory stays at a few chunks however large the answer is. A client
that leaves closes the upstream connection. An upstream that breaks off, or is silent for
longer than ``LITELLM_TIMEOUT``, cannot be told in a binary body: the client's connection
is dropped, so it sees a short body instead of a whole one.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone

from mpcapi.http.streaming import ClientRelay, StreamEnd


class BodyRelay(ClientRelay):
    """Writes LiteLLM's binary body through to ``request`` (see the module doc)."""

    def dataReceived(self, data: bytes) -> None:
        if self.outcome is not None:
            return
        if self._exchange.first_byte_at is None:
            self._exchange.first_byte_at = self._clock.seconds()
        self._request.write(data)
        self._touch_timer()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        if self.outcome is not None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._end(StreamEnd.COMPLETED)
        else:
            self._end(StreamEnd.UPSTREAM_ERROR)

    def _timed_out(self) -> None:
        self._end(StreamEnd.TIMEOUT)
        self._close_upstream()

    def _end(self, outcome: StreamEnd) -> None:
        self.outcome = outcome
        self._exchange.stream_end = outcome.value
        self._stop_timer()
        self._request.unregisterProducer()
        if outcome is StreamEnd.COMPLETED:
            self._request.finish()
        else:  # a short body is the only way to say it in a binary answer
            transport = self._request.channel.transport if self._request.channel else None
            if transport is not None:
                transport.abortConnection()  # type: ignore[attr-defined]
        self._announce(outcome)


__all__ = ["BodyRelay"]
