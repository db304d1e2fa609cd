"""``UpstreamStream``: reads one LiteLLM event stream for one WebSocket message."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.internet import error
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from mpcapi.errors import ApiError, bad_gateway, gateway_timeout, phrase
from mpcapi.openai.events import CHAT_EVENTS
from mpcapi.openai.sse import DONE, SSEEvent, SSEParser
from mpcapi.upstream.bodies import UpstreamBody
from mpcapi.upstream.client import check_upstream_status, error_message

if TYPE_CHECKING:
    from mpcapi.websocket.session import Message, WebSocketSession


class UpstreamStream(UpstreamBody):
    """Reads one LiteLLM event stream and hands its events to the session.

    Silence longer than ``idle_timeout`` (while the client keeps up) is a 504; an end
    without ``data: [DONE]`` is a 502. ``cancel`` closes the upstream connection.
    """

    def __init__(
        self, session: WebSocketSession, message: Message, clock: IReactorTime, idle_timeout: float
    ) -> None:
        super().__init__(clock, idle_timeout)
        self._session = session
        self._message = message
        self._parser = SSEParser()
        self._paused = False
        self.over = False

    def connectionMade(self) -> None:
        if self._session.paused:
            self.pause()
        else:
            self._start_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.over:
            return
        self._touch_timer()
        for event in self._parser.feed(data):
            self._event(event)
            if self.over:
                return

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        if self.over:
            return
        if reason.check(ResponseDone):
            route = self._message.route
            end = "[DONE]" if route is None or route.events is CHAT_EVENTS else "its end event"
            why = f"LiteLLM closed the stream without {end}"
        else:
            why = f"LiteLLM broke off the stream: {reason.value}"
        self._fail(bad_gateway(why, "broken"), "upstream_error")

    def cancel(self) -> None:
        self._stop()
        self._close_upstream()

    def pause(self) -> None:
        self._paused = True
        self._stop_timer()  # a slow client is not a silent LiteLLM
        self._pause_upstream()

    def resume(self) -> None:
        if not self._paused or self.over:
            return
        self._paused = False
        self._start_timer()
        self._resume_upstream()

    def _event(self, event: SSEEvent) -> None:
        if event.data == DONE:
            self._stop()
            self._session.done(self._message)
            return
        try:
            chunk = json.loads(event.data)
        except ValueError:
            self._fail(
                bad_gateway("LiteLLM sent an event that is not JSON", "broken"), "upstream_error"
            )
            self._close_upstream()
            return
        problem = self._reported_error(chunk)
        if problem is not None:
            self._fail(problem, "upstream_error")
            self._close_upstream()
            return
        self._session.chunk(self._message, chunk, event.event)
        if self._message.reader.done:  # a family that ends with an event, not [DONE]
            self._stop()
            self._session.done(self._message)
            self._close_upstream()

    def _reported_error(self, chunk: Any) -> ApiError | None:
        """The error of an ``{"error": {...}}`` event LiteLLM sends when a provider fails."""
        if not isinstance(chunk, dict) or "error" not in chunk or "choices" in chunk:
            return None
        detail = chunk["error"]
        code = detail.get("code") if isinstance(detail, dict) else None
        try:
            status = int(code)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            status = 502
        if not 400 <= status < 500:
            status = 502
        body = json.dumps(chunk).encode("utf-8")
        settings = self._session.settings
        try:
            check_upstream_status(
                status,
                body,
                our_key=bool(settings.litellm_api_key),
                base_url=settings.masked()["litellm_base_url"],
            )
        except ApiError as problem:
            return problem
        return ApiError(status, phrase(status), error_message(body))

    def _timed_out(self) -> None:
        self._fail(gateway_timeout(f"LiteLLM sent nothing for {self._idle_timeout:g} s"), "timeout")
        self._close_upstream()

    def _fail(self, problem: ApiError, outcome: str) -> None:
        self._stop()
        self._session.fail(self._message, problem, outcome)

    def _stop(self) -> None:
        self.over = True
        self._stop_timer()


__all__ = ["UpstreamStream"]
