"""Budget periods: ``day``, ``week`` (from Monday) and ``month``, on UTC calendar boundaries.

A key's or a team's spend counts from the start of its current period; with no period
(``None``) it counts from the beginning. ``PeriodBounds`` is one period as the ledger needs
it: its start as epoch seconds and as stored-time text (what ``usage.created_at`` is compared
with), and its end, when the budget resets. ``Periods`` keeps the current bounds of each
period and computes them again only when the clock leaves them, so the hot path does no
calendar arithmetic.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import attrs

from mpcapi.timestamps import iso_millis

PERIODS = ("day", "week", "month")


@attrs.frozen
class PeriodBounds:
    """One budget period: ``[start, end)`` in epoch seconds, and its start as stored text."""

    period: str
    start: float
    end: float
    since: str  # ISO-8601 UTC with milliseconds and a Z, as usage rows are stored

    @property
    def resets_at(self) -> str:
        return iso_of(self.end)


def iso_of(seconds: float) -> str:
    """Epoch seconds as stored: ISO-8601 UTC with milliseconds and a Z."""
    return iso_millis(seconds)


def bounds_of(period: str, now: float) -> PeriodBounds:
    """The period ``period`` (one of ``PERIODS``) that holds the instant ``now``."""
    moment = datetime.fromtimestamp(now, tz=UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    elif period == "month":
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown budget period {period!r}; expected one of {', '.join(PERIODS)}")
    return PeriodBounds(period, start.timestamp(), end.timestamp(), iso_of(start.timestamp()))


class Periods:
    """The current bounds of each period, recomputed only when ``now`` leaves them."""

    def __init__(self) -> None:
        self._current: dict[str, PeriodBounds] = {}

    def bounds(self, period: str, now: float) -> PeriodBounds:
        known = self._current.get(period)
        if known is not None and known.start <= now < known.end:
            return known
        known = self._current[period] = bounds_of(period, now)
        return known


__all__ = ["PERIODS", "PeriodBounds", "Periods", "bounds_of", "iso_of"]
