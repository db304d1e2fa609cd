"""The JSON lines log observer: one flat, parseable object per event, whatever its values."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mpcapi.logs import JsonLinesObserver, encode_record, event_as_record


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_an_event_is_one_flat_json_line_with_its_fields_and_worker() -> None:
    out = io.StringIO()
    log = Logger(namespace="mpcapi.request", observer=JsonLinesObserver(out, worker="2"))
    log.info("{method} {status}", method="POST", status=200, model=None, ratio=0.5)
    (record,) = _lines(out)
    assert record["message"] == "POST 200"
    assert record["level"] == "info"
    assert record["namespace"] == "mpcapi.request"
    assert record["worker"] == "2"
    assert (record["method"], record["status"], record["model"], record["ratio"]) == (
        "POST",
        200,
        None,
        0.5,
    )
    assert not any(str(key).startswith("log_") for key in record)


def test_the_time_is_utc_with_milliseconds() -> None:
    event = {"log_time": 1_700_000_000.25, "log_level": LogLevel.warn, "log_format": "x"}
    record = event_as_record(event)
    assert record["time"] == "2023-11-14T22:13:20.250Z"
    assert record["level"] == "warn"
    again = event_as_record({**event, "log_time": 1_700_000_001.999})
    assert again["time"] == "2023-11-14T22:13:21.999Z"
    assert datetime.fromisoformat(str(again["time"])).tzinfo == UTC


def test_values_json_cannot_hold_become_text() -> None:
    class Thing:
        def __str__(self) -> str:
            return "a thing"

    line = encode_record({"thing": Thing(), "raw": b"bytes", "pair": (1, 2), "keys": {3: "x"}})
    assert json.loads(line) == {
        "thing": "a thing",
        "raw": "b'bytes'",
        "pair": [1, 2],
        "keys": {"3": "x"},
    }


def test_a_cycle_or_a_huge_integer_still_gives_a_line() -> None:
    cycle: list[object] = []
    cycle.append(cycle)
    assert json.loads(encode_record({"n": 2**70}))["n"] == 2**70
    assert "cycle" in json.loads(encode_record({"cycle": cycle}))


def test_a_failure_carries_its_traceback() -> None:
    out = io.StringIO()
    log = Logger(namespace="mpcapi.app", observer=JsonLinesObserver(out))
    try:
        raise ValueError("boom")
    except ValueError:
        log.failure("it broke", Failure())
    (record,) = _lines(out)
    assert record["level"] == "critical"
    assert "ValueError: boom" in str(record["traceback"])
    assert record["message"] == "it broke"
