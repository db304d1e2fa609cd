"""The usage table's reads (functions of a ``database.Cursor``): a key's spend, and requests,
errors, tokens and cost per group. Its inserts are in ``mpcapi.storage.usagerows``."""

from __future__ import annotations

from typing import Any

from mpcapi.storage.database import Cursor


def spend_of_key(cursor: Cursor, key_id: str, since: str | None = None) -> float:
    """The key's spend, from ``since`` (stored-time text, inclusive) when given."""
    return _spend(cursor, "key_id", key_id, since)


def spend_of_team(cursor: Cursor, team_id: str, since: str | None = None) -> float:
    """The team's spend (the rows its keys made while in it), from ``since`` when given."""
    return _spend(cursor, "team_id", team_id, since)


def spend_of(cursor: Cursor, account: str, since: str | None = None) -> float:
    """The spend of an account as the ledger names it: ``key:<id>`` or ``team:<id>``."""
    kind, _, name = account.partition(":")
    return _spend(cursor, "team_id" if kind == "team" else "key_id", name, since)


def _spend(cursor: Cursor, column: str, value: str, since: str | None) -> float:
    sql = f"SELECT COALESCE(SUM(cost_usd), 0) FROM usage WHERE {column} = ?"
    params = [value]
    if since is not None:
        sql += " AND created_at >= ?"
        params.append(since)
    row = cursor.execute(sql, params).fetchone()
    return float(row[0]) if row is not None else 0.0


GROUPS = {
    "model": "model",
    "user": '"user"',
    "key": "key_id",
    "day": "SUBSTR(created_at, 1, 10)",
}


def usage_summary(
    cursor: Cursor, group_by: str, since: str | None = None, until: str | None = None
) -> list[dict[str, Any]]:
    """Requests, errors (status 400 and up), tokens and cost per group, between ``since``
    (inclusive) and ``until`` (exclusive), stored-time text."""
    expression = GROUPS[group_by]
    where, params = [], []
    if since:
        where.append("created_at >= ?")
        params.append(since)
    if until:
        where.append("created_at < ?")
        params.append(until)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = cursor.execute(
        f"SELECT {expression}, COUNT(*), "
        "COALESCE(SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
        f"COALESCE(SUM(cost_usd), 0) FROM usage {clause} GROUP BY {expression}",
        params,
    ).fetchall()
    groups = [
        {
            "group": row[0],
            "requests": int(row[1]),
            "errors": int(row[2]),
            "prompt_tokens": int(row[3]),
            "completion_tokens": int(row[4]),
            "cost_usd": round(float(row[5]), 10),
        }
        for row in rows
    ]
    return sorted(groups, key=lambda g: (g["group"] is None, str(g["group"] or "")))
