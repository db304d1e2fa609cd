"""Usage reports: the query of ``GET /api/usage`` and ``mpcapi-admin usage`` checked, the
summary document with its totals, and the same as a text table."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from mpcapi.storage.usage import GROUPS
from mpcapi.timestamps import iso_millis


def parse_moment(text: str, name: str, end_of_day: bool = False) -> str:
    """A query's time bound as stored text: ISO-8601 (a date, or a date and time with an
    offset or Z; naive is UTC). A date alone as an upper bound means the end of that day.
    ``ValueError`` names the parameter."""
    raw = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", raw):
            moment = datetime.fromisoformat(raw).replace(tzinfo=UTC)
            if end_of_day:
                moment += timedelta(days=1)
        else:
            moment = datetime.fromisoformat(raw.replace("z", "Z"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(
            f"{name}: {text!r} is not an ISO-8601 date or time (2026-11-27, 2026-11-27T10:00:00Z)"
        ) from None
    return iso_millis(moment.timestamp())


def summary_document(
    groups: list[dict[str, Any]], group_by: str, since: str | None, until: str | None
) -> dict[str, Any]:
    totals = {
        name: sum(group[name] for group in groups)
        for name in ("requests", "errors", "prompt_tokens", "completion_tokens")
    }
    totals["cost_usd"] = round(sum(group["cost_usd"] for group in groups), 10)
    return {"group_by": group_by, "from": since, "to": until, "groups": groups, "totals": totals}


def usage_table(document: Mapping[str, Any]) -> str:
    """A summary as a text table (``mpcapi-admin usage``), with a total line."""
    header = (document["group_by"], "requests", "errors", "prompt", "completion", "cost_usd")
    lines = [
        (
            "-" if group["group"] is None else str(group["group"]),
            str(group["requests"]),
            str(group["errors"]),
            str(group["prompt_tokens"]),
            str(group["completion_tokens"]),
            f"{group['cost_usd']:.6f}",
        )
        for group in document["groups"]
    ]
    totals = document["totals"]
    lines.append(
        (
            "TOTAL",
            str(totals["requests"]),
            str(totals["errors"]),
            str(totals["prompt_tokens"]),
            str(totals["completion_tokens"]),
            f"{totals['cost_usd']:.6f}",
        )
    )
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        return "  ".join(
            [first, *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))]
        )

    return "\n".join(line(row) for row in [header, *lines]) + "\n"


def summary_query(arguments: Mapping[str, str | None]) -> tuple[str, str | None, str | None]:
    """``group_by``, ``from`` and ``to`` of a usage query, checked; ``ValueError`` otherwise."""
    group_by = (arguments.get("group_by") or "model").strip()
    if group_by not in GROUPS:
        raise ValueError(f"group_by: {group_by!r} is not one of: {', '.join(GROUPS)}")
    since_text, until_text = arguments.get("from"), arguments.get("to")
    since = parse_moment(since_text, "from") if since_text else None
    until = parse_moment(until_text, "to", end_of_day=True) if until_text else None
    if since and until and since >= until:
        raise ValueError("from must be earlier than to")
    return group_by, since, until
