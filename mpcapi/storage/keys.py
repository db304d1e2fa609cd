"""The ``client_keys`` table (see ``database.MIGRATIONS``): ``ClientKey`` rows and their SQL,
as functions of a ``database.Cursor``. Only a key's SHA-256 is stored, never the key.

Since migration 5 a key may also have an alias (unique), a team (``mpcapi.storage.teams``),
a model list, an expiry, a budget period, metadata, and, after a rotation with a grace
period, the hash of its previous secret and until when that one still works. The daemon's
lookup (``key_by_hash``) reads the key together with its team, so that one cached row holds
everything the hot path checks.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

import attrs

from mpcapi.storage.database import Cursor, utc_now
from mpcapi.storage.teams import TEAM_COLUMNS, Team, models_of, models_text

SECRET_PREFIX = "sk-mpc-"
ID_PREFIX = "key_"

_COLUMNS = (
    'id, key_hash, "user", rpm, tpm, budget_usd, created_at, revoked_at, alias, team_id, '
    "models, expires_at, budget_period, metadata, previous_hash, previous_until"
)
_K_COLUMNS = ", ".join(f"k.{column.strip()}" for column in _COLUMNS.split(","))
_T_COLUMNS = ", ".join(f"t.{column.strip()}" for column in TEAM_COLUMNS.split(","))


@attrs.frozen
class ClientKey:
    """One row of ``client_keys`` (the hash, not the key). ``rpm``/``tpm`` None: the daemon's
    defaults apply; 0: unlimited. ``budget_usd`` None: no budget; ``budget_period`` None: the
    budget never resets. ``models`` None: every model. ``team``: the key's team, when it has
    one and it was read with it (``key_by_hash``, ``key_by_id``)."""

    id: str
    key_hash: str = attrs.field(repr=False)
    user: str
    rpm: int | None
    tpm: int | None
    budget_usd: float | None
    created_at: str
    revoked_at: str | None = None
    alias: str | None = None
    team_id: str | None = None
    models: tuple[str, ...] | None = None
    expires_at: str | None = None
    budget_period: str | None = None
    metadata_json: str | None = None
    previous_hash: str | None = attrs.field(default=None, repr=False)
    previous_until: str | None = None
    team: Team | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def state(self) -> str:
        return "revoked" if self.revoked else "active"

    @property
    def metadata(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.metadata_json) if self.metadata_json else {}
        return value

    @classmethod
    def from_row(cls, row: tuple[Any, ...], team: Team | None = None) -> ClientKey:
        (
            key_id,
            key_hash,
            user,
            rpm,
            tpm,
            budget,
            created_at,
            revoked_at,
            alias,
            team_id,
            models,
            expires_at,
            period,
            metadata,
            previous_hash,
            previous_until,
        ) = row[:16]
        return cls(
            id=key_id,
            key_hash=key_hash,
            user=user,
            rpm=rpm,
            tpm=tpm,
            budget_usd=None if budget is None else float(budget),
            created_at=created_at,
            revoked_at=revoked_at,
            alias=alias,
            team_id=team_id,
            models=models_of(models),
            expires_at=expires_at,
            budget_period=period,
            metadata_json=metadata,
            previous_hash=previous_hash,
            previous_until=previous_until,
            team=team,
        )


def hash_key(secret: str) -> str:
    """The stored form of a key: SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return ID_PREFIX + secrets.token_hex(4)


def _values(key: ClientKey) -> tuple[Any, ...]:
    return (
        key.id,
        key.key_hash,
        key.user,
        key.rpm,
        key.tpm,
        key.budget_usd,
        key.created_at,
        key.revoked_at,
        key.alias,
        key.team_id,
        models_text(key.models),
        key.expires_at,
        key.budget_period,
        key.metadata_json,
        key.previous_hash,
        key.previous_until,
    )


def create_key(
    cursor: Cursor,
    user: str,
    rpm: int | None = None,
    tpm: int | None = None,
    budget_usd: float | None = None,
    **more: Any,
) -> tuple[ClientKey, str]:
    """Store a new key; return its row and the secret (which exists nowhere else). ``more``:
    further columns of ``ClientKey`` (alias, team_id, models, expires_at, budget_period,
    metadata_json)."""
    secret = new_secret()
    key = ClientKey(
        new_key_id(), hash_key(secret), user, rpm, tpm, budget_usd, utc_now(), None, **more
    )
    for _ in range(5):  # ids are short: retry on the rare collision
        if cursor.execute("SELECT 1 FROM client_keys WHERE id = ?", (key.id,)).fetchone() is None:
            break
        key = attrs.evolve(key, id=new_key_id())
    placeholders = ", ".join("?" for _ in _values(key))
    cursor.execute(f"INSERT INTO client_keys ({_COLUMNS}) VALUES ({placeholders})", _values(key))
    return key, secret


def update_key(cursor: Cursor, key: ClientKey) -> ClientKey:
    """Write every column of ``key`` but its id and creation time (by its id)."""
    columns = [column.strip() for column in _COLUMNS.split(",")]
    values = _values(key)
    assignments = [
        (column, value)
        for column, value in zip(columns, values, strict=True)
        if column not in ("id", "created_at")
    ]
    cursor.execute(
        f"UPDATE client_keys SET {', '.join(f'{c} = ?' for c, _ in assignments)} WHERE id = ?",
        [value for _, value in assignments] + [key.id],
    )
    return key


def list_keys(
    cursor: Cursor,
    user: str | None = None,
    team_id: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[ClientKey]:
    """Keys in the order they were made, of ``user`` and/or ``team_id`` when given."""
    where: list[str] = []
    params: list[Any] = []
    if user is not None:
        where.append('k."user" = ?')
        params.append(user)
    if team_id is not None:
        where.append("k.team_id = ?")
        params.append(team_id)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    sql = (
        f"SELECT {_K_COLUMNS}, {_T_COLUMNS} FROM client_keys k "
        f"LEFT JOIN teams t ON t.id = k.team_id{clause} ORDER BY k.created_at, k.id"
    )
    if limit is not None:
        sql += " LIMIT ? OFFSET ?"
        params += [limit, offset]
    return [_with_team(row) for row in cursor.execute(sql, params).fetchall()]


def _with_team(row: tuple[Any, ...]) -> ClientKey:
    team = Team.from_row(row[16:]) if row[16] is not None else None
    return ClientKey.from_row(row, team)


def key_by_id(cursor: Cursor, key_id: str) -> ClientKey | None:
    row = cursor.execute(
        f"SELECT {_K_COLUMNS}, {_T_COLUMNS} FROM client_keys k "
        "LEFT JOIN teams t ON t.id = k.team_id WHERE k.id = ?",
        (key_id,),
    ).fetchone()
    return None if row is None else _with_team(row)


def key_by_alias(cursor: Cursor, alias: str) -> ClientKey | None:
    row = cursor.execute(f"SELECT {_COLUMNS} FROM client_keys WHERE alias = ?", (alias,)).fetchone()
    return None if row is None else ClientKey.from_row(row)


def key_by_hash(cursor: Cursor, key_hash: str) -> ClientKey | None:
    """The key whose secret, or previous secret (after a rotation), has this hash, with its
    team."""
    row = cursor.execute(
        f"SELECT {_K_COLUMNS}, {_T_COLUMNS} FROM client_keys k "
        "LEFT JOIN teams t ON t.id = k.team_id WHERE k.key_hash = ? "
        "UNION ALL "
        f"SELECT {_K_COLUMNS}, {_T_COLUMNS} FROM client_keys k "
        "LEFT JOIN teams t ON t.id = k.team_id WHERE k.previous_hash = ?",
        (key_hash, key_hash),
    ).fetchone()
    return None if row is None else _with_team(row)


def revoke_key(cursor: Cursor, key_id: str) -> ClientKey | None:
    """Revoke a key (once: a second revoke keeps the first time); None for an unknown id."""
    cursor.execute(
        "UPDATE client_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        (utc_now(), key_id),
    )
    return key_by_id(cursor, key_id)


def rotate_key(cursor: Cursor, key: ClientKey, previous_until: str | None) -> tuple[ClientKey, str]:
    """Give ``key`` a new secret; the old one keeps working until ``previous_until`` (None:
    not at all). Returns the new row and the new secret."""
    secret = new_secret()
    rotated = attrs.evolve(
        key,
        key_hash=hash_key(secret),
        previous_hash=key.key_hash if previous_until is not None else None,
        previous_until=previous_until,
    )
    update_key(cursor, rotated)
    return rotated, secret
