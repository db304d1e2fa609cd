"""The ``stored_objects`` table (see ``database.MIGRATIONS``): who made each object that
LiteLLM stores for a client (a response, a file, a batch), as functions of a ``Cursor``."""

from __future__ import annotations

from collections.abc import Sequence

from mpcapi.storage.database import Cursor, utc_now


def claim(cursor: Cursor, kind: str, object_id: str, owner: str) -> str:
    """Record ``owner`` as the maker of an object (once: the first owner stays); return the
    object's owner."""
    cursor.execute(
        "INSERT INTO stored_objects (kind, id, owner, created_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        (kind, object_id, owner, utc_now()),
    )
    return owner_of(cursor, kind, object_id) or owner


def owner_of(cursor: Cursor, kind: str, object_id: str) -> str | None:
    row = cursor.execute(
        "SELECT owner FROM stored_objects WHERE kind = ? AND id = ?", (kind, object_id)
    ).fetchone()
    return None if row is None else str(row[0])


def owned_among(cursor: Cursor, kind: str, object_ids: Sequence[str], owner: str) -> set[str]:
    """Which of ``object_ids`` ``owner`` made."""
    if not object_ids:
        return set()
    marks = ", ".join("?" for _ in object_ids)
    rows = cursor.execute(
        f"SELECT id FROM stored_objects WHERE kind = ? AND owner = ? AND id IN ({marks})",
        (kind, owner, *object_ids),
    ).fetchall()
    return {str(row[0]) for row in rows}
