"""The ring of recent errors: a fixed-size memory-mapped file per process, so the dashboard
of any worker shows the errors of every worker."""

from __future__ import annotations

import glob
import json
import mmap
import os
import struct
from typing import Any


class ErrorRing:
    """The latest errors of one process, in fixed slots of a buffer (a bytearray, or a
    memory-mapped file in the multiprocess directory so that any worker can read them)."""

    SLOTS = 64
    SLOT_BYTES = 1024
    _HEADER = struct.Struct("<Q")  # the number of records ever written
    _LENGTH = struct.Struct("<I")
    SIZE = _HEADER.size + SLOTS * SLOT_BYTES

    def __init__(self, buffer: bytearray | mmap.mmap) -> None:
        self._buffer = buffer

    @classmethod
    def in_memory(cls) -> ErrorRing:
        return cls(bytearray(cls.SIZE))

    @classmethod
    def in_directory(cls, directory: str, pid: int) -> ErrorRing:
        path = os.path.join(directory, f"errors_{pid}.ring")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, cls.SIZE)
            return cls(mmap.mmap(fd, cls.SIZE))
        finally:
            os.close(fd)

    def append(self, record: dict[str, Any]) -> None:
        (written,) = self._HEADER.unpack_from(self._buffer, 0)
        record = {**record, "seq": written}  # orders the records of one process
        data = json.dumps(record, separators=(",", ":")).encode("utf-8")
        if len(data) > self.SLOT_BYTES - self._LENGTH.size:
            return  # every field is shortened before; nothing sane is this long
        offset = self._HEADER.size + (written % self.SLOTS) * self.SLOT_BYTES
        self._LENGTH.pack_into(self._buffer, offset, len(data))
        end = offset + self._LENGTH.size + len(data)
        self._buffer[offset + self._LENGTH.size : end] = data
        self._HEADER.pack_into(self._buffer, 0, written + 1)

    def records(self) -> list[dict[str, Any]]:
        return ring_records(bytes(self._buffer))

    @classmethod
    def read_directory(cls, directory: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for path in glob.glob(os.path.join(directory, "errors_*.ring")):
            try:
                with open(path, "rb") as handle:
                    found.extend(ring_records(handle.read(cls.SIZE)))
            except OSError:
                continue
        return found


def ring_records(raw: bytes) -> list[dict[str, Any]]:
    if len(raw) < ErrorRing.SIZE:
        return []
    (written,) = ErrorRing._HEADER.unpack_from(raw, 0)
    records = []
    for slot in range(min(written, ErrorRing.SLOTS)):
        offset = ErrorRing._HEADER.size + slot * ErrorRing.SLOT_BYTES
        (length,) = ErrorRing._LENGTH.unpack_from(raw, offset)
        start = offset + ErrorRing._LENGTH.size
        try:
            records.append(json.loads(raw[start : start + length]))
        except ValueError:
            continue  # a slot being written right now
    return records
