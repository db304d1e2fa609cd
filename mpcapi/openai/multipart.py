"""What a ``multipart/form-data`` upload holds, read without holding it.

An upload (an audio file to transcribe, a file for a batch) can be as large as
``MPCAPI_MAX_BODY_BYTES``. ``scan_form`` reads it from its file in chunks and keeps only
each part's name, whether it is a file, and the first bytes of the fields that are not
files (``model``, ``purpose``): enough to check the required fields before the upload is
streamed on. Pure wire format, no Twisted.
"""

from __future__ import annotations

import re
from email.message import Message
from typing import BinaryIO

import attrs

CHUNK = 64 * 1024
FIELD_LIMIT = 1024  # bytes of a field's value kept (model names, purposes)
_HEADERS_LIMIT = 16 * 1024
_DISPOSITION_NAME = re.compile(r"""(?:^|;)\s*name\s*=\s*"?([^";]*)"?""", re.IGNORECASE)


class FormError(ValueError):
    """The body is not the multipart form its Content-Type says."""


@attrs.frozen
class Form:
    """The parts of an upload: the values of its fields, the names of its files."""

    fields: dict[str, str]
    files: frozenset[str]

    def __contains__(self, name: object) -> bool:
        return name in self.fields or name in self.files


def boundary_of(content_type: bytes | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; ``FormError`` otherwise."""
    if not content_type:
        raise FormError("Content-Type must be multipart/form-data")
    message = Message()
    message["content-type"] = content_type.decode("latin-1")
    if message.get_content_type() != "multipart/form-data":
        raise FormError("Content-Type must be multipart/form-data")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 70:
        raise FormError("Content-Type multipart/form-data needs a boundary")
    return boundary.encode("latin-1")


def scan_form(body: BinaryIO, boundary: bytes) -> Form:
    """The parts of the multipart body in ``body`` (read from where it stands)."""
    delimiter = b"\r\n--" + boundary
    fields: dict[str, str] = {}
    files: set[str] = set()
    # The body's first delimiter has no CRLF before it: lend it one.
    buffer = b"\r\n" + body.read(CHUNK)
    start = buffer.find(delimiter)
    if start < 0:
        raise FormError("the multipart body has no part")
    buffer = buffer[start + len(delimiter) :]
    while True:
        while len(buffer) < 2:
            more = body.read(CHUNK)
            if not more:
                raise FormError("the multipart body ends before its closing boundary")
            buffer += more
        if buffer.startswith(b"--"):  # the closing delimiter
            return Form(fields, frozenset(files))
        # One part: its headers, then its content up to the next delimiter.
        while b"\r\n\r\n" not in buffer:
            more = body.read(CHUNK)
            if not more or len(buffer) > _HEADERS_LIMIT:
                raise FormError("a part of the multipart body has no end to its headers")
            buffer += more
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        name, is_file = _part_header(head)
        kept = b""
        while True:
            end = buffer.find(delimiter)
            if end >= 0:
                if len(kept) < FIELD_LIMIT:
                    kept += buffer[: min(end, FIELD_LIMIT - len(kept))]
                buffer = buffer[end + len(delimiter) :]
                break
            # Keep a delimiter's length back: it may be split across chunks.
            usable = max(0, len(buffer) - len(delimiter))
            if len(kept) < FIELD_LIMIT:
                kept += buffer[: min(usable, FIELD_LIMIT - len(kept))]
            buffer = buffer[usable:]
            more = body.read(CHUNK)
            if not more:
                raise FormError("the multipart body ends before its closing boundary")
            buffer += more
        if name is not None:
            if is_file:
                files.add(name)
            else:
                fields[name] = kept.decode("utf-8", "replace")


def _part_header(head: bytes) -> tuple[str | None, bool]:
    """A part's field name and whether it is a file (its disposition has a filename)."""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition":
            disposition = value.decode("utf-8", "replace")
            match = _DISPOSITION_NAME.search(disposition)
            return (match.group(1) if match else None), "filename" in disposition.lower()
    return None, False


__all__ = ["Form", "FormError", "boundary_of", "scan_form"]
