"""The ``teams`` table (migration 5, see ``database.MIGRATIONS``): ``Team`` rows and their SQL,
as functions of a ``database.Cursor``.

A team groups client keys: its own RPM/TPM (None or 0: no team limit), budget (with an
optional period, see ``mpcapi.ledger.periods``) and model list (None: every model). A request
of a key in a team must pass the key's and the team's limits, budgets and model lists.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import attrs

from mpcapi.storage.database import Cursor, utc_now

TEAM_ID_PREFIX = "team_"

TEAM_COLUMNS = "id, name, rpm, tpm, budget_usd, budget_period, models, metadata, created_at"


def models_of(text: str | None) -> tuple[str, ...] | None:
    """A stored model list (JSON text) as a tuple; None (NULL): every model."""
    if text is None:
        return None
    return tuple(str(model) for model in json.loads(text))


def models_text(models: tuple[str, ...] | list[str] | None) -> str | None:
    return None if models is None else json.dumps(list(models))


def metadata_text(metadata: dict[str, Any] | None) -> str | None:
    return None if not metadata else json.dumps(metadata, sort_keys=True)


@attrs.frozen
class Team:
    """One row of ``teams``. ``metadata_json`` is the stored JSON text (kept as text so that
    the row stays hashable); ``metadata`` parses it."""

    id: str
    name: str
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    budget_period: str | None = None
    models: tuple[str, ...] | None = None
    metadata_json: str | None = None
    created_at: str = ""

    @property
    def metadata(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.metadata_json) if self.metadata_json else {}
        return value

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Team:
        team_id, name, rpm, tpm, budget, period, models, metadata, created_at = row
        return cls(
            id=team_id,
            name=name,
            rpm=rpm,
            tpm=tpm,
            budget_usd=None if budget is None else float(budget),
            budget_period=period,
            models=models_of(models),
            metadata_json=metadata,
            created_at=created_at,
        )


def new_team_id() -> str:
    return TEAM_ID_PREFIX + secrets.token_hex(4)


def team_by_id(cursor: Cursor, team_id: str) -> Team | None:
    row = cursor.execute(f"SELECT {TEAM_COLUMNS} FROM teams WHERE id = ?", (team_id,)).fetchone()
    return None if row is None else Team.from_row(row)


def team_by_name(cursor: Cursor, name: str) -> Team | None:
    row = cursor.execute(f"SELECT {TEAM_COLUMNS} FROM teams WHERE name = ?", (name,)).fetchone()
    return None if row is None else Team.from_row(row)


def insert_team(cursor: Cursor, team: Team) -> Team:
    """Store ``team`` under a fresh id (its own is replaced); return the stored row."""
    team = attrs.evolve(team, id=new_team_id(), created_at=utc_now())
    for _ in range(5):  # ids are short: retry on the rare collision
        if team_by_id(cursor, team.id) is None:
            break
        team = attrs.evolve(team, id=new_team_id())
    cursor.execute(
        f"INSERT INTO teams ({TEAM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            team.id,
            team.name,
            team.rpm,
            team.tpm,
            team.budget_usd,
            team.budget_period,
            models_text(team.models),
            team.metadata_json,
            team.created_at,
        ),
    )
    return team


def update_team(cursor: Cursor, team: Team) -> Team:
    """Write every changeable column of ``team`` (by its id)."""
    cursor.execute(
        "UPDATE teams SET name = ?, rpm = ?, tpm = ?, budget_usd = ?, budget_period = ?, "
        "models = ?, metadata = ? WHERE id = ?",
        (
            team.name,
            team.rpm,
            team.tpm,
            team.budget_usd,
            team.budget_period,
            models_text(team.models),
            team.metadata_json,
            team.id,
        ),
    )
    return team


def list_teams(cursor: Cursor, limit: int | None = None, offset: int = 0) -> list[Team]:
    sql = f"SELECT {TEAM_COLUMNS} FROM teams ORDER BY created_at, id"
    params: list[Any] = []
    if limit is not None:
        sql += " LIMIT ? OFFSET ?"
        params += [limit, offset]
    return [Team.from_row(row) for row in cursor.execute(sql, params).fetchall()]


def delete_team(cursor: Cursor, team_id: str) -> None:
    cursor.execute("DELETE FROM teams WHERE id = ?", (team_id,))


def active_keys_of_team(cursor: Cursor, team_id: str) -> int:
    row = cursor.execute(
        "SELECT COUNT(*) FROM client_keys WHERE team_id = ? AND revoked_at IS NULL", (team_id,)
    ).fetchone()
    return int(row[0]) if row is not None else 0


__all__ = [
    "Team",
    "active_keys_of_team",
    "delete_team",
    "insert_team",
    "list_teams",
    "metadata_text",
    "models_of",
    "models_text",
    "team_by_id",
    "team_by_name",
    "update_team",
]
