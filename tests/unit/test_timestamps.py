"""Times as text: ISO-8601 UTC, milliseconds, Z; exact at every millisecond and second."""

from __future__ import annotations

from datetime import UTC, datetime

from mpcapi.timestamps import iso_millis


def test_milliseconds_are_exact_and_the_second_turns_over() -> None:
    assert iso_millis(1_700_000_000.123) == "2023-11-14T22:13:20.123Z"
    assert iso_millis(1_700_000_000.999) == "2023-11-14T22:13:20.999Z"
    assert iso_millis(1_700_000_001.0) == "2023-11-14T22:13:21.000Z"
    assert iso_millis(1_700_000_000.5) == "2023-11-14T22:13:20.500Z"


def test_it_agrees_with_datetime_over_many_moments() -> None:
    for step in range(0, 5_000_000, 7_919):
        seconds = 1_790_000_000 + step / 1000
        moment = datetime.fromtimestamp(seconds, tz=UTC)
        expected = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
        assert iso_millis(seconds) == expected
