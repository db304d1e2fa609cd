"""``LiveSettings``: the settings in force, shared by every part that reads one a reload changes.

Parts that read a live setting (the LiteLLM client's timeout and key, the admin key, the
log format…) hold this one object and read ``current`` when they need a value, so a
reload (``mpcapi.runtime.reload``) swaps one reference instead of chasing attributes
through the object graph. Parts that must act on a change (the balancer's instances, the
probe's interval, the key cache) ``subscribe``; the composition root wires them.
"""

from __future__ import annotations

from collections.abc import Callable

from mpcapi.config.settings import Settings


class LiveSettings:
    """One process's settings in force; ``replace`` installs a reloaded configuration."""

    def __init__(self, settings: Settings) -> None:
        self.current = settings
        self._subscribers: list[Callable[[Settings], None]] = []

    def subscribe(self, changed: Callable[[Settings], None]) -> None:
        """Call ``changed`` with every configuration ``replace`` installs."""
        self._subscribers.append(changed)

    def replace(self, settings: Settings) -> None:
        self.current = settings
        for changed in self._subscribers:
            changed(settings)


__all__ = ["LiveSettings"]
