"""Times as text: ISO-8601 UTC with milliseconds and a Z, e.g. ``2026-11-27T10:00:00.123Z``.

The seed's ``/health`` shows this form; the usage ledger stores it (it sorts as text) and the
JSON logs print it. It is made once per request or more, so the part up to the second is
made once per second.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime


class _IsoMillis:
    def __init__(self) -> None:
        self._last: tuple[int, str] = (0, "1970-01-01T00:00:00")  # one tuple: thread-safe

    def __call__(self, seconds: float) -> str:
        # In whole microseconds first, as datetime rounds: .123 stays .123, not .122999.
        whole, micros = divmod(round(seconds * 1_000_000), 1_000_000)
        second, prefix = self._last
        if whole != second:
            prefix = datetime.fromtimestamp(whole, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._last = (whole, prefix)
        return f"{prefix}.{micros // 1000:03d}Z"


iso_millis = _IsoMillis()


@functools.lru_cache(maxsize=4096)
def epoch_of(text: str) -> float:
    """Stored-time text (or any ISO-8601 time with an offset) as epoch seconds; a time
    without an offset is UTC. Cached: the daemon compares the same expiry on every call."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
