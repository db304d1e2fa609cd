"""Stored bodies (``MPCAPI_LOG_BODIES``): credential-like fields and key-like strings
redacted, long bodies cut."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_BODY_CHARS = 65_536  # stored bodies are cut there

_SECRET_NAME = re.compile(
    r"^(x-)?(api[_-]?key|apikey|authorization|password|passwd|secret|client[_-]?secret|"
    r"access[_-]?token|refresh[_-]?token|id[_-]?token|auth[_-]?token|bearer|private[_-]?key)$",
    re.IGNORECASE,
)
_SECRET_TEXT = re.compile(r"\b(sk-[A-Za-z0-9_-]{8,}|Bearer\s+\S+)", re.IGNORECASE)
REDACTED = "[redacted]"


def redact(value: Any) -> Any:
    """A JSON value with credential-like fields and key-like strings replaced."""
    if isinstance(value, dict):
        return {
            name: REDACTED if _SECRET_NAME.match(str(name)) else redact(item)
            for name, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return _SECRET_TEXT.sub(REDACTED, value)
    return value


def stored_body(raw: bytes | None) -> str | None:
    """A body as stored: JSON re-serialised with credentials redacted, else redacted text;
    cut at ``MAX_BODY_CHARS``."""
    if raw is None:
        return None
    try:
        text = json.dumps(redact(json.loads(raw)), separators=(",", ":"))
    except ValueError:
        text = _SECRET_TEXT.sub(REDACTED, raw.decode("utf-8", "replace"))
    if len(text) > MAX_BODY_CHARS:
        text = text[:MAX_BODY_CHARS] + "…[truncated]"
    return text
