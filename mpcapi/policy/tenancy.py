"""Tenancy: the operations on client keys and teams that the admin HTTP API
(``mpcapi.http.adminapi``) and ``mpcapi-admin`` share.

Each operation is a function of a ``database.Cursor`` (run by ``Database.run`` in the daemon,
``SyncDatabase.run`` in the CLI), takes the request as a JSON-like document and the current
time (epoch seconds: the daemon's clock, or the CLI's), checks every field, and returns the
JSON document of the answer. Nothing here knows HTTP or Twisted: a bad input raises
``InvalidInputError`` (400, naming the field), an unknown id ``UnknownIdError`` (404), a
duplicate alias or team name or a forbidden change ``ConflictError`` (409).

Fields of a key: ``user`` (required to create), ``alias`` (unique), ``team_id``, ``rpm``,
``tpm`` (None: the daemon's defaults; 0: unlimited), ``budget_usd``, ``budget_period``
(``day``, ``week``, ``month``: UTC calendar boundaries; None: never resets), ``models``
(exact names, ``prefix/*``, ``*``; None: every model), ``expires_at`` (ISO-8601 with an
offset) or ``expires_in`` (``30d``, ``12h``, ``90m``, ``3600s``, or seconds), ``metadata``
(a JSON object). A team has ``name`` (required, unique) and ``rpm``, ``tpm``, ``budget_usd``,
``budget_period``, ``models``, ``metadata``; its limits apply on top of its keys' own.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs

from mpcapi.ledger.periods import PERIODS, bounds_of, iso_of
from mpcapi.policy.access import valid_pattern
from mpcapi.storage import keys as key_rows
from mpcapi.storage import teams as team_rows
from mpcapi.storage.database import Cursor
from mpcapi.storage.keys import ClientKey
from mpcapi.storage.teams import Team, metadata_text
from mpcapi.storage.usage import spend_of_key, spend_of_team
from mpcapi.timestamps import epoch_of

MAX_PAGE = 500
DEFAULT_PAGE = 100
MAX_METADATA_BYTES = 8192
MAX_MODELS = 1000
MAX_GRACE_SECONDS = 30 * 86400  # a rotated key's old secret works 30 days at most

KEY_FIELDS = (
    "user",
    "alias",
    "team_id",
    "rpm",
    "tpm",
    "budget_usd",
    "budget_period",
    "models",
    "expires_at",
    "expires_in",
    "metadata",
)
TEAM_FIELDS = ("name", "rpm", "tpm", "budget_usd", "budget_period", "models", "metadata")

_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TenancyError(Exception):
    """A refused operation: ``status`` is the HTTP status it is answered with."""

    status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInputError(TenancyError):
    status = 400


class UnknownIdError(TenancyError):
    status = 404


class ConflictError(TenancyError):
    status = 409


# --- fields -------------------------------------------------------------------------------------


def parse_duration(raw: str | float, field: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w`` or a number of seconds; > 0."""
    if isinstance(raw, bool):
        raise InvalidInputError(f"{field} must be a duration such as 30d, 12h or 3600", field)
    if isinstance(raw, int | float):
        seconds = float(raw)
    elif isinstance(raw, str) and (match := _DURATION.match(raw.strip())):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise InvalidInputError(f"{field} must be a duration such as 30d, 12h or 3600", field)
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidInputError(f"{field} must be more than 0 seconds", field)
    return seconds


def _text(field: str, value: Any, limit: int = 200) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"{field} must be a non-empty string", field)
    if len(value) > limit:
        raise InvalidInputError(f"{field} must be at most {limit} characters", field)
    return value.strip()


def _count(field: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"{field} must be a whole number, 0 or more (0: no limit)", field)
    return value


def _dollars(field: str, value: Any) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise InvalidInputError(f"{field} must be an amount of US dollars, 0 or more", field)
    return float(value)


def _period(field: str, value: Any) -> str | None:
    if value is None:
        return None
    if value not in PERIODS:
        raise InvalidInputError(f"{field} must be one of {', '.join(PERIODS)} or null", field)
    return str(value)


def _models(field: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidInputError(
            f"{field} must be a list of model names or patterns, or null", field
        )
    if len(value) > MAX_MODELS:
        raise InvalidInputError(f"{field} may hold at most {MAX_MODELS} entries", field)
    for item in value:
        if not isinstance(item, str) or not valid_pattern(item):
            raise InvalidInputError(
                f"{field}: {item!r} is not a model name, a prefix/* pattern or *", field
            )
    return tuple(dict.fromkeys(value))


def _metadata(field: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{field} must be a JSON object", field)
    text = metadata_text(value)
    if text is not None and len(text.encode("utf-8")) > MAX_METADATA_BYTES:
        raise InvalidInputError(
            f"{field} must be at most {MAX_METADATA_BYTES} bytes of JSON", field
        )
    return text


def _expiry(document: Mapping[str, Any], now: float) -> tuple[bool, str | None]:
    """Whether the document sets the expiry, and to what (stored-time text or None)."""
    if "expires_at" in document and "expires_in" in document:
        raise InvalidInputError("give expires_at or expires_in, not both", "expires_in")
    if "expires_in" in document:
        value = document["expires_in"]
        if value is None:
            return True, None
        return True, iso_of(now + parse_duration(value, "expires_in"))
    if "expires_at" not in document:
        return False, None
    value = document["expires_at"]
    if value is None:
        return True, None
    if not isinstance(value, str):
        raise InvalidInputError(
            "expires_at must be an ISO-8601 time such as 2027-01-31T00:00:00Z", "expires_at"
        )
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInputError(
            "expires_at must be an ISO-8601 time such as 2027-01-31T00:00:00Z", "expires_at"
        ) from None
    if moment.tzinfo is None:
        raise InvalidInputError("expires_at must say its offset (Z for UTC)", "expires_at")
    seconds = moment.astimezone(UTC).timestamp()
    if seconds <= now:
        raise InvalidInputError("expires_at must be in the future", "expires_at")
    return True, iso_of(seconds)


def _check_fields(document: Any, known: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(document, dict):
        raise InvalidInputError("the body must be a JSON object")
    for name in document:
        if name not in known:
            raise InvalidInputError(f"unknown field {name!r}; known: {', '.join(known)}", name)
    return document


def _key_changes(cursor: Cursor, document: Any, now: float, creating: bool) -> dict[str, Any]:
    """The columns of ``ClientKey`` that ``document`` sets, checked."""
    document = _check_fields(document, KEY_FIELDS)
    changes: dict[str, Any] = {}
    if "user" in document or creating:
        if "user" not in document:
            raise InvalidInputError("user is required", "user")
        changes["user"] = _text("user", document["user"])
    if "alias" in document:
        alias = document["alias"]
        if alias is not None and (not isinstance(alias, str) or not _ALIAS.match(alias)):
            raise InvalidInputError(
                "alias must be 1-64 characters of letters, digits and . _ : @ - "
                "(starting with a letter or digit), or null",
                "alias",
            )
        changes["alias"] = alias
    if "team_id" in document:
        team_id = document["team_id"]
        if team_id is not None:
            team_id = _text("team_id", team_id)
            if team_rows.team_by_id(cursor, team_id) is None:
                raise InvalidInputError(f"team_id: no team {team_id!r}", "team_id")
        changes["team_id"] = team_id
    changes.update(_limit_changes(document))
    sets_expiry, expires_at = _expiry(document, now)
    if sets_expiry:
        changes["expires_at"] = expires_at
    return changes


def _limit_changes(document: dict[str, Any]) -> dict[str, Any]:
    """What keys and teams both have, as ``document`` sets it, checked: limits, budget and
    its period, model list, metadata."""
    changes: dict[str, Any] = {}
    for name in ("rpm", "tpm"):
        if name in document:
            changes[name] = _count(name, document[name])
    if "budget_usd" in document:
        changes["budget_usd"] = _dollars("budget_usd", document["budget_usd"])
    if "budget_period" in document:
        changes["budget_period"] = _period("budget_period", document["budget_period"])
    if "models" in document:
        changes["models"] = _models("models", document["models"])
    if "metadata" in document:
        changes["metadata_json"] = _metadata("metadata", document["metadata"])
    return changes


def _team_changes(document: Any, creating: bool) -> dict[str, Any]:
    document = _check_fields(document, TEAM_FIELDS)
    changes: dict[str, Any] = {}
    if "name" in document or creating:
        if "name" not in document:
            raise InvalidInputError("name is required", "name")
        changes["name"] = _text("name", document["name"], 100)
    changes.update(_limit_changes(document))
    return changes


def _page(query: Mapping[str, str | None], known: tuple[str, ...]) -> tuple[int, int]:
    for name in query:
        if name not in known:
            raise InvalidInputError(
                f"unknown query parameter {name!r}; known: {', '.join(known)}", name
            )
    limit, offset = DEFAULT_PAGE, 0
    for name in ("limit", "offset"):
        raw = query.get(name)
        if raw is None:
            continue
        try:
            value = int(raw)
        except ValueError:
            raise InvalidInputError(f"{name} must be a whole number", name) from None
        if name == "limit" and not 1 <= value <= MAX_PAGE:
            raise InvalidInputError(f"limit must be between 1 and {MAX_PAGE}", name)
        if name == "offset" and value < 0:
            raise InvalidInputError("offset must be 0 or more", name)
        limit, offset = (value, offset) if name == "limit" else (limit, value)
    return limit, offset


def _page_document(items: list[dict[str, Any]], limit: int, offset: int) -> dict[str, Any]:
    more = len(items) > limit
    return {
        "object": "list",
        "data": items[:limit],
        "has_more": more,
        "next_offset": offset + limit if more else None,
    }


# --- documents ----------------------------------------------------------------------------------


def _spend_fields(
    spend: float, budget: float | None, period: str | None, now: float
) -> dict[str, Any]:
    bounds = bounds_of(period, now) if period is not None else None
    return {
        "spend_usd": round(spend, 10),
        "budget_remaining_usd": None if budget is None else round(max(0.0, budget - spend), 10),
        "budget_period_start": bounds.since if bounds else None,
        "budget_resets_at": bounds.resets_at if bounds else None,
    }


def key_state(key: ClientKey, now: float) -> str:
    if key.revoked:
        return "revoked"
    if key.expires_at is not None and epoch_of(key.expires_at) <= now:
        return "expired"
    return "active"


def key_document(cursor: Cursor, key: ClientKey, now: float) -> dict[str, Any]:
    """A key as the admin API shows it (never its secret or hash), with its current
    period's spend and when the budget resets."""
    period = key.budget_period
    since = bounds_of(period, now).since if period is not None else None
    spend = spend_of_key(cursor, key.id, since)
    previous = key.previous_until
    return {
        "object": "client_key",
        "id": key.id,
        "alias": key.alias,
        "user": key.user,
        "team_id": key.team_id,
        "team_name": key.team.name if key.team is not None else None,
        "rpm": key.rpm,
        "tpm": key.tpm,
        "budget_usd": key.budget_usd,
        "budget_period": period,
        "models": None if key.models is None else list(key.models),
        "expires_at": key.expires_at,
        "metadata": key.metadata,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "state": key_state(key, now),
        **_spend_fields(spend, key.budget_usd, period, now),
        "previous_secret_valid_until": (
            previous if previous is not None and epoch_of(previous) > now else None
        ),
    }


def team_document(cursor: Cursor, team: Team, now: float) -> dict[str, Any]:
    period = team.budget_period
    since = bounds_of(period, now).since if period is not None else None
    spend = spend_of_team(cursor, team.id, since)
    return {
        "object": "team",
        "id": team.id,
        "name": team.name,
        "rpm": team.rpm,
        "tpm": team.tpm,
        "budget_usd": team.budget_usd,
        "budget_period": period,
        "models": None if team.models is None else list(team.models),
        "metadata": team.metadata,
        "created_at": team.created_at,
        "active_keys": team_rows.active_keys_of_team(cursor, team.id),
        **_spend_fields(spend, team.budget_usd, period, now),
    }


# --- keys ---------------------------------------------------------------------------------------


def _key(cursor: Cursor, key_id: str) -> ClientKey:
    key = key_rows.key_by_id(cursor, key_id)
    if key is None:
        raise UnknownIdError(f"no key with id {key_id!r}")
    return key


def _free_alias(cursor: Cursor, alias: str | None, key_id: str | None = None) -> None:
    if alias is None:
        return
    holder = key_rows.key_by_alias(cursor, alias)
    if holder is not None and holder.id != key_id:
        raise ConflictError(f"alias {alias!r} is taken by client key {holder.id}", "alias")


def create_key(cursor: Cursor, document: Any, now: float) -> dict[str, Any]:
    """``POST /admin/keys``: the new key's document, with its ``secret`` (shown this once)."""
    changes = _key_changes(cursor, document, now, creating=True)
    _free_alias(cursor, changes.get("alias"))
    user = changes.pop("user")
    key, secret = key_rows.create_key(
        cursor,
        user,
        changes.pop("rpm", None),
        changes.pop("tpm", None),
        changes.pop("budget_usd", None),
        **changes,
    )
    return {**key_document(cursor, _key(cursor, key.id), now), "secret": secret}


def list_keys(cursor: Cursor, query: Mapping[str, str | None], now: float) -> dict[str, Any]:
    """``GET /admin/keys?user=&team_id=&limit=&offset=``: a page of keys, oldest first."""
    limit, offset = _page(query, ("user", "team_id", "limit", "offset"))
    found = key_rows.list_keys(
        cursor, query.get("user"), query.get("team_id"), limit=limit + 1, offset=offset
    )
    return _page_document([key_document(cursor, key, now) for key in found], limit, offset)


def get_key(cursor: Cursor, key_id: str, now: float) -> dict[str, Any]:
    return key_document(cursor, _key(cursor, key_id), now)


def update_key(cursor: Cursor, key_id: str, document: Any, now: float) -> dict[str, Any]:
    """``PATCH /admin/keys/{id}``: change the fields ``document`` names (null clears one)."""
    key = _key(cursor, key_id)
    changes = _key_changes(cursor, document, now, creating=False)
    if key.revoked and changes:
        raise ConflictError(f"client key {key_id} is revoked; make a new one")
    if "alias" in changes:
        _free_alias(cursor, changes["alias"], key_id)
    key_rows.update_key(cursor, attrs.evolve(key, **changes))
    return key_document(cursor, _key(cursor, key_id), now)


def revoke_key(cursor: Cursor, key_id: str, now: float) -> dict[str, Any]:
    """``DELETE /admin/keys/{id}``: revoke (the row stays, for the ledger and the audit)."""
    _key(cursor, key_id)
    key = key_rows.revoke_key(cursor, key_id)
    assert key is not None
    return key_document(cursor, key, now)


def rotate_key(cursor: Cursor, key_id: str, document: Any, now: float) -> dict[str, Any]:
    """``POST /admin/keys/{id}/rotate``: a new secret; the old one keeps working for
    ``grace_seconds`` (default 0: it stops at once, within the daemons' refresh delay)."""
    document = _check_fields({} if document is None else document, ("grace_seconds",))
    grace = document.get("grace_seconds", 0)
    if (
        isinstance(grace, bool)
        or not isinstance(grace, int | float)
        or not math.isfinite(grace)
        or not 0 <= grace <= MAX_GRACE_SECONDS
    ):
        raise InvalidInputError(
            f"grace_seconds must be a number of seconds from 0 to {MAX_GRACE_SECONDS}",
            "grace_seconds",
        )
    key = _key(cursor, key_id)
    if key.revoked:
        raise ConflictError(f"client key {key_id} is revoked; make a new one")
    until = iso_of(now + grace) if grace > 0 else None
    _, secret = key_rows.rotate_key(cursor, key, until)
    return {**key_document(cursor, _key(cursor, key_id), now), "secret": secret}


# --- teams --------------------------------------------------------------------------------------


def _team(cursor: Cursor, team_id: str) -> Team:
    team = team_rows.team_by_id(cursor, team_id)
    if team is None:
        raise UnknownIdError(f"no team with id {team_id!r}")
    return team


def _free_name(cursor: Cursor, name: str, team_id: str | None = None) -> None:
    holder = team_rows.team_by_name(cursor, name)
    if holder is not None and holder.id != team_id:
        raise ConflictError(f"team name {name!r} is taken by team {holder.id}", "name")


def create_team(cursor: Cursor, document: Any, now: float) -> dict[str, Any]:
    """``POST /admin/teams``."""
    changes = _team_changes(document, creating=True)
    _free_name(cursor, changes["name"])
    team = team_rows.insert_team(cursor, Team(id="", **changes))
    return team_document(cursor, team, now)


def list_teams(cursor: Cursor, query: Mapping[str, str | None], now: float) -> dict[str, Any]:
    """``GET /admin/teams?limit=&offset=``."""
    limit, offset = _page(query, ("limit", "offset"))
    found = team_rows.list_teams(cursor, limit + 1, offset)
    return _page_document([team_document(cursor, team, now) for team in found], limit, offset)


def get_team(cursor: Cursor, team_id: str, now: float) -> dict[str, Any]:
    return team_document(cursor, _team(cursor, team_id), now)


def update_team(cursor: Cursor, team_id: str, document: Any, now: float) -> dict[str, Any]:
    """``PATCH /admin/teams/{id}``."""
    team = _team(cursor, team_id)
    changes = _team_changes(document, creating=False)
    if "name" in changes:
        _free_name(cursor, changes["name"], team_id)
    team = team_rows.update_team(cursor, attrs.evolve(team, **changes))
    return team_document(cursor, team, now)


def delete_team(cursor: Cursor, team_id: str, now: float) -> dict[str, Any]:
    """``DELETE /admin/teams/{id}``: only a team without active keys (409 otherwise), so
    that no key silently loses its team's limits."""
    team = _team(cursor, team_id)
    active = team_rows.active_keys_of_team(cursor, team_id)
    if active:
        raise ConflictError(
            f"team {team_id} still has {active} active key(s); revoke them or move them "
            "to another team first"
        )
    cursor.execute("UPDATE client_keys SET team_id = NULL WHERE team_id = ?", (team_id,))
    team_rows.delete_team(cursor, team_id)
    return {"object": "team", "id": team.id, "name": team.name, "deleted": True}


def json_body(raw: bytes) -> Any:
    """A request body as JSON (an empty body is null); ``InvalidInputError`` when it is not."""
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise InvalidInputError("the body is not valid JSON") from None


__all__ = [
    "ConflictError",
    "InvalidInputError",
    "TenancyError",
    "UnknownIdError",
    "create_key",
    "create_team",
    "delete_team",
    "get_key",
    "get_team",
    "json_body",
    "key_document",
    "key_state",
    "list_keys",
    "list_teams",
    "parse_duration",
    "revoke_key",
    "rotate_key",
    "team_document",
    "update_key",
    "update_team",
]
