"""``LiveSettings``: one reference that a reload swaps, and the parts that act on a change."""

from __future__ import annotations

import attrs

from mpcapi.config.live import LiveSettings
from mpcapi.config.settings import Settings


def test_replace_installs_the_new_settings_then_tells_each_subscriber_in_order() -> None:
    before = Settings(default_rpm=1)
    live = LiveSettings(before)
    heard: list[tuple[str, int]] = []
    live.subscribe(lambda new: heard.append(("first", new.default_rpm)))
    live.subscribe(lambda new: heard.append(("second", live.current.default_rpm)))
    after = attrs.evolve(before, default_rpm=9)
    live.replace(after)
    assert live.current is after
    assert heard == [("first", 9), ("second", 9)]
