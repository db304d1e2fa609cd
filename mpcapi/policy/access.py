"""Model access: which models a client key may call, from its own list and its team's.

A list holds exact model names (``gpt-4o-mini``), ``prefix/*`` patterns (``openai/*``: every
model whose name starts with ``openai/``) and ``*`` (every model). A key with no list (None)
may call every model its team allows; a team with no list allows every model. A request
names one model, or several separated by commas (LiteLLM answers each): each must be
allowed. The answers are cached per (list, model): the hot path does no matching twice.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpcapi.storage.keys import ClientKey


def valid_pattern(pattern: str) -> bool:
    """Whether ``pattern`` is an exact name, ``*`` or ``prefix/*`` (no other wildcard)."""
    if not pattern or pattern != pattern.strip():
        return False
    if pattern == "*":
        return True
    head = pattern[:-2] if pattern.endswith("/*") else pattern
    return bool(head) and "*" not in head


@functools.lru_cache(maxsize=65_536)
def allows(patterns: tuple[str, ...] | None, model: str) -> bool:
    """Whether the list ``patterns`` (None: no list) allows the model name ``model``."""
    if patterns is None:
        return True
    for pattern in patterns:
        if pattern == model or pattern == "*":
            return True
        if pattern.endswith("/*") and model.startswith(pattern[:-1]):
            return True
    return False


def refusal_of(key: ClientKey, model: str) -> str | None:
    """Why ``key`` may not call ``model`` (``"client key key_…"`` or ``"team …"``), or None."""
    for name in model.split(","):
        name = name.strip()
        if not allows(key.models, name):
            return f"client key {key.id}"
        team = key.team
        if team is not None and not allows(team.models, name):
            return f"team {team.id} ({team.name})"
    return None


def may_call(key: ClientKey | None, model: str) -> bool:
    return key is None or refusal_of(key, model) is None


def visible_models(answer: bytes, key: ClientKey | None) -> bytes:
    """LiteLLM's ``GET /models`` answer with only the models ``key`` may call (the answer
    unchanged when every model is allowed, or when it is not the list it should be)."""
    if key is None or (key.models is None and (key.team is None or key.team.models is None)):
        return answer
    try:
        document: Any = json.loads(answer)
    except ValueError:
        return answer
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        return answer
    document["data"] = [
        model
        for model in document["data"]
        if isinstance(model, dict)
        and isinstance(model.get("id"), str)
        and refusal_of(key, model["id"]) is None
    ]
    return json.dumps(document).encode("utf-8")


__all__ = ["allows", "may_call", "refusal_of", "valid_pattern", "visible_models"]
