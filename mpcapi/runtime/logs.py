"""Log output: JSON lines for production, Twisted's text format for development.

Our events carry their fields as keys (see ``requestlog``); the JSON observer writes
them as one flat object per line, next to the time, level, namespace and message.
"""

from __future__ import annotations

import json
from typing import IO, Any, Protocol, cast

import orjson
from twisted.logger import ILogObserver, LogEvent, formatEvent, textFileLogObserver
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

from mpcapi.timestamps import iso_millis

# Keys of legacy twisted.python.log events that are not fields of ours.
_LEGACY_KEYS = frozenset({"message", "format", "isError", "system", "time", "why", "failure"})


# Anything JSON cannot hold becomes its str().
_OPTIONS = orjson.OPT_NON_STR_KEYS


def _message(event: LogEvent) -> str:
    """The event's text: plain ``str.format`` when it suffices (fast), else Twisted's."""
    text = event.get("log_format")
    if isinstance(text, str):
        try:
            return text.format(**event)
        except (KeyError, IndexError, AttributeError, ValueError):
            pass
    return formatEvent(event)


def event_as_record(event: LogEvent) -> dict[str, Any]:
    """One log event as a flat dict (its values as they are; ``encode_record`` writes it)."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": iso_millis(event.get("log_time", 0)),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace") or event.get("system"),
        "message": _message(event),
    }
    for key, value in event.items():
        if key[:4] != "log_" and key not in _LEGACY_KEYS:
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return record


def encode_record(record: dict[str, Any]) -> str:
    """A record as one line of JSON (orjson: this runs once per request); values JSON cannot
    hold become their text."""
    try:
        return orjson.dumps(record, default=str, option=_OPTIONS).decode("utf-8")
    except (TypeError, orjson.JSONEncodeError):  # e.g. a cycle, an integer past 64 bits
        return json.dumps({key: _plain(value) for key, value in record.items()})


def _plain(value: Any) -> Any:
    """``value`` if the standard json module can write it, else its text."""
    try:
        json.dumps(value, default=str)
    except (TypeError, ValueError, RecursionError):
        return str(value)
    return value


class TextOutput(Protocol):
    """Where log lines go: a text file, or ``TurnFlushedOutput`` in front of one."""

    def write(self, text: str, /) -> object: ...

    def flush(self) -> None: ...


class TurnFlushedOutput:
    """A text stream for log lines that leave once per reactor turn: a turn that answers
    thirty requests writes their thirty lines with one system call, not thirty (one each
    costs a few percent of a request). Lines from other threads, or when the reactor is
    not running (start-up, shut-down), are written at once, after any that wait."""

    def __init__(self, out: IO[str], reactor: Any) -> None:
        self._out = out
        self._reactor = reactor
        self._waiting: list[str] = []
        reactor.addSystemEventTrigger("after", "shutdown", self._write_waiting)

    def write(self, text: str) -> None:
        if self._reactor.running and isInIOThread():
            if not self._waiting:
                self._reactor.callLater(0, self._write_waiting)
            self._waiting.append(text)
        else:
            self._write_waiting()
            self._out.write(text)
            self._out.flush()

    def flush(self) -> None:
        """Nothing to do now: waiting lines go out at the end of the turn."""

    def _write_waiting(self) -> None:
        if self._waiting:
            text = "".join(self._waiting)
            self._waiting.clear()
            self._out.write(text)
            self._out.flush()


@implementer(ILogObserver)
class JsonLinesObserver:
    """Writes each event as one JSON object per line (naming its worker, if any)."""

    def __init__(self, out: TextOutput, worker: str | None = None) -> None:
        self._out = out
        self._worker = worker

    def __call__(self, event: LogEvent) -> None:
        record = event_as_record(event)
        if self._worker is not None:
            record["worker"] = self._worker
        self._out.write(encode_record(record) + "\n")
        self._out.flush()


@implementer(ILogObserver)
class WorkerTextObserver:
    """Twisted's text format, with the worker in the system column: ``[worker 2]``."""

    def __init__(self, out: TextOutput, worker: str) -> None:
        self._text = textFileLogObserver(cast(IO[str], out))
        self._system = worker if worker == "supervisor" else f"worker {worker}"

    def __call__(self, event: LogEvent) -> None:
        self._text({**event, "log_system": self._system})


def observer_for(log_format: str, worker: str | None, out: TextOutput) -> ILogObserver | None:
    """The observer the daemon installs; ``None`` leaves twistd's own text observer."""
    if log_format == "json":
        return JsonLinesObserver(out, worker)
    if worker is not None:
        return WorkerTextObserver(out, worker)
    return None


@implementer(ILogObserver)
class LogSwitch:
    """The daemon's log observer, whose format a configuration reload can change.

    Text in one process is what ``twistd -n`` itself writes (Twisted's format on stdout).
    """

    def __init__(self, log_format: str, worker: str | None, out: TextOutput) -> None:
        self._worker = worker
        self._out = out
        self.log_format = ""
        self._observer: ILogObserver = textFileLogObserver(cast(IO[str], out))
        self.use(log_format)

    def use(self, log_format: str) -> None:
        """Write every event in ``log_format`` from now on."""
        if log_format != self.log_format:
            observer = observer_for(log_format, self._worker, self._out)
            self._observer = observer or textFileLogObserver(cast(IO[str], self._out))
            self.log_format = log_format

    def __call__(self, event: LogEvent) -> None:
        self._observer(event)
