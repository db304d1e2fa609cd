"""Log capture: the ``twisted.logger`` events of one namespace while a block runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.logger import globalLogPublisher


@contextmanager
def captured(
    namespace: str, keep: Callable[[dict[str, Any]], bool] = lambda event: True
) -> Iterator[list[dict[str, Any]]]:
    """The events of ``namespace`` (those ``keep`` keeps), as they are logged."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == namespace and keep(event):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)
