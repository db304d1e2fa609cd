"""The ``client_keys`` table (see ``database.MIGRATIONS``): ``ClientKey`` rows and their SQL,
as functions of a ``database.Cursor``. Only a key's SHA-256 is stored, never the key."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import attrs

from mpcapi.storage.database import Cursor, utc_now

SECRET_PREFIX = "sk-mpc-"
ID_PREFIX = "key_"

_COLUMNS = 'id, key_hash, "user", rpm, tpm, budget_usd, created_at, revoked_at'


@attrs.frozen
class ClientKey:
    """One row of ``client_keys`` (the hash, not the key). ``rpm``/``tpm`` None: the daemon's
    defaults apply; 0: unlimited. ``budget_usd`` None: no budget."""

    id: str
    key_hash: str = attrs.field(repr=False)
    user: str
    rpm: int | None
    tpm: int | None
    budget_usd: float | None
    created_at: str
    revoked_at: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def state(self) -> str:
        return "revoked" if self.revoked else "active"

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> ClientKey:
        key_id, key_hash, user, rpm, tpm, budget, created_at, revoked_at = row
        return cls(
            id=key_id,
            key_hash=key_hash,
            user=user,
            rpm=rpm,
            tpm=tpm,
            budget_usd=None if budget is None else float(budget),
            created_at=created_at,
            revoked_at=revoked_at,
        )


def hash_key(secret: str) -> str:
    """The stored form of a key: SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return ID_PREFIX + secrets.token_hex(4)


def create_key(
    cursor: Cursor,
    user: str,
    rpm: int | None = None,
    tpm: int | None = None,
    budget_usd: float | None = None,
) -> tuple[ClientKey, str]:
    """Store a new key; return its row and the secret (which exists nowhere else)."""
    secret = new_secret()
    key = ClientKey(new_key_id(), hash_key(secret), user, rpm, tpm, budget_usd, utc_now())
    for _ in range(5):  # ids are short: retry on the rare collision
        if cursor.execute("SELECT 1 FROM client_keys WHERE id = ?", (key.id,)).fetchone() is None:
            break
        key = attrs.evolve(key, id=new_key_id())
    cursor.execute(
        f"INSERT INTO client_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (key.id, key.key_hash, key.user, rpm, tpm, budget_usd, key.created_at, None),
    )
    return key, secret


def list_keys(cursor: Cursor) -> list[ClientKey]:
    rows = cursor.execute(f"SELECT {_COLUMNS} FROM client_keys ORDER BY created_at, id").fetchall()
    return [ClientKey.from_row(row) for row in rows]


def key_by_id(cursor: Cursor, key_id: str) -> ClientKey | None:
    row = cursor.execute(f"SELECT {_COLUMNS} FROM client_keys WHERE id = ?", (key_id,)).fetchone()
    return None if row is None else ClientKey.from_row(row)


def key_by_hash(cursor: Cursor, key_hash: str) -> ClientKey | None:
    row = cursor.execute(
        f"SELECT {_COLUMNS} FROM client_keys WHERE key_hash = ?", (key_hash,)
    ).fetchone()
    return None if row is None else ClientKey.from_row(row)


def revoke_key(cursor: Cursor, key_id: str) -> ClientKey | None:
    """Revoke a key (once: a second revoke keeps the first time); None for an unknown id."""
    cursor.execute(
        "UPDATE client_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        (utc_now(), key_id),
    )
    return key_by_id(cursor, key_id)
