"""An incremental parser of server-sent events (the ``text/event-stream`` format).

Bytes go in as they arrive from the network, in chunks of any size; complete events come
out. Lines end with ``\\r\\n``, ``\\n`` or ``\\r``; a blank line ends an event; ``data:``
lines of one event are joined with ``\\n``; comment lines (``:`` first) are skipped; an
event without ``data`` is not dispatched, as in the HTML standard's EventSource.
"""

from __future__ import annotations

import re

import attrs

_LINE_END = re.compile(rb"\r\n|\r|\n")
DONE = "[DONE]"  # the data of the event that ends an OpenAI stream


@attrs.frozen
class SSEEvent:
    """One dispatched event: its data (lines joined with ``\\n``) and its type."""

    data: str
    event: str = "message"


class SSEParser:
    """Turns a byte stream into ``SSEEvent``s; ``feed`` returns the events it completed."""

    def __init__(self) -> None:
        self._buffer = b""
        self._raw = b""  # consumed bytes of the frame in progress
        self._data: list[bytes] = []
        self._event = b""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        return [event for _, event in self.feed_frames(chunk) if event is not None]

    def feed_frames(self, chunk: bytes) -> list[tuple[bytes, SSEEvent | None]]:
        """Like ``feed``, with each completed frame's raw bytes (everything up to and
        including the blank line that ends it); the event is None for a frame that
        dispatches nothing (comments only, no data)."""
        buffer = self._buffer + chunk
        frames: list[tuple[bytes, SSEEvent | None]] = []
        position = frame_start = 0
        while True:
            match = _LINE_END.search(buffer, position)
            if match is None:
                break
            if match.group() == b"\r" and match.end() == len(buffer):
                break  # maybe the first half of a "\r\n" split across chunks
            line = buffer[position : match.start()]
            position = match.end()
            event = self._line(line)
            if not line:
                frames.append((self._raw + buffer[frame_start:position], event))
                self._raw, frame_start = b"", position
        self._raw += buffer[frame_start:position]
        self._buffer = buffer[position:]
        return frames

    def rest(self) -> bytes:
        """The raw bytes of the unfinished frame (to pass on when the stream ends)."""
        return self._raw + self._buffer

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished event are waiting for the rest of it."""
        return bool(self._buffer or self._data or self._event)

    def _line(self, line: bytes) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            return None
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, kind = self._data, self._event
        self._data, self._event = [], b""
        if not data:
            return None
        text = b"\n".join(data).decode("utf-8", "replace")
        return SSEEvent(text, kind.decode("utf-8", "replace") or "message")
