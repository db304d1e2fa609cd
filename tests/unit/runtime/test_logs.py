"""The JSON lines log observer: one flat, parseable object per event, whatever its values."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mpcapi.runtime.logs import JsonLinesObserver, TurnFlushedOutput, encode_record, event_as_record


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


class _Reactor(Clock):
    """A clock that can say whether it runs and keeps its shutdown triggers."""

    def __init__(self) -> None:
        super().__init__()
        self.running = True
        self.triggers: list[Callable[[], None]] = []

    def addSystemEventTrigger(self, phase: str, event: str, fn: Callable[[], None]) -> None:
        assert (phase, event) == ("after", "shutdown")
        self.triggers.append(fn)


class _CountingFile(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def test_a_turns_lines_leave_together_at_its_end() -> None:
    reactor, out = _Reactor(), _CountingFile()
    batched = TurnFlushedOutput(out, reactor)
    log = Logger(namespace="mpcapi.request", observer=JsonLinesObserver(batched))
    for status in (200, 404, 502):
        log.info("{status}", status=status)
    assert out.getvalue() == ""  # the turn is not over
    reactor.advance(0)
    assert [line["status"] for line in _lines(out)] == [200, 404, 502]
    assert out.flushes == 1
    log.info("{status}", status=201)
    reactor.advance(0)
    assert [line["status"] for line in _lines(out)] == [200, 404, 502, 201]
    assert out.flushes == 2


def test_lines_waiting_at_shutdown_are_written_and_later_ones_at_once() -> None:
    reactor, out = _Reactor(), _CountingFile()
    batched = TurnFlushedOutput(out, reactor)
    batched.write("waiting\n")
    reactor.running = False  # the reactor stopped before the turn's call ran
    for trigger in reactor.triggers:
        trigger()
    assert out.getvalue() == "waiting\n"
    batched.write("after the loop\n")
    assert out.getvalue() == "waiting\nafter the loop\n"


def test_a_line_from_another_thread_is_written_at_once_after_those_waiting() -> None:
    reactor, out = _Reactor(), _CountingFile()
    batched = TurnFlushedOutput(out, reactor)
    batched.write("first\n")
    thread = threading.Thread(target=batched.write, args=("from a thread\n",))
    thread.start()
    thread.join()
    assert out.getvalue() == "first\nfrom a thread\n"
