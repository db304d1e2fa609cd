"""``mpcapi-admin``: manage client keys and teams in the daemon's database.

    mpcapi-admin keys create --user NAME [--rpm N] [--tpm N] [--budget USD]
                             [--budget-period day|week|month] [--team ID] [--models LIST]
                             [--expires-in 30d | --expires-at WHEN] [--alias A]
                             [--metadata JSON] [--json]
    mpcapi-admin keys list [--user NAME] [--team ID] [--json]
    mpcapi-admin keys show ID
    mpcapi-admin keys update ID [the options of create; "none" clears one]
    mpcapi-admin keys revoke ID
    mpcapi-admin keys rotate ID [--grace 1h]
    mpcapi-admin teams create --name NAME [--rpm N] [--tpm N] [--budget USD]
                              [--budget-period P] [--models LIST] [--metadata JSON] [--json]
    mpcapi-admin teams list [--json] | show ID | update ID [...] | delete ID
    mpcapi-admin usage [--group-by model|user|key|day] [--since WHEN] [--until WHEN] [--json]

Every keys and teams command runs the operation the admin HTTP API runs
(``mpcapi.policy.tenancy``), so both check the same fields and give the same documents
(``show`` prints the JSON of ``GET /admin/keys/{id}``).

The database is the daemon's: the same sources (``--config``/``MPCAPI_CONFIG``, ``.env``,
the environment, ``--database-url``) give the same ``MPCAPI_DATABASE_URL``. A running
daemon accepts a new key at once and refuses a revoked one within 5 seconds.

Exit status: 0 done; 1 the command failed (unknown id, duplicate alias or name, database
unavailable); 2 bad usage, a bad value or configuration (one line naming the key).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from mpcapi.config.settings import CONFIG_ENV, ConfigError, load_settings
from mpcapi.ledger.periods import PERIODS
from mpcapi.ledger.report import summary_document, summary_query, usage_table
from mpcapi.policy import tenancy
from mpcapi.storage.database import DatabaseError, SyncDatabase, driver_errors
from mpcapi.storage.keys import ClientKey, key_by_id, list_keys
from mpcapi.storage.usage import GROUPS, usage_summary

PROG = "mpcapi-admin"


def _count(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{raw!r} must be 0 or more")
    return value


def _dollars(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an amount of US dollars") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{raw!r} must be 0 or more")
    return value


def _user(raw: str) -> str:
    text = raw.strip()
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


NONE = "none"  # clears a value in `update`


def _or_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse``, or ``NONE`` itself for "none" (told apart from an option not given)."""

    def parsed(raw: str) -> Any:
        return NONE if raw == NONE else parse(raw)

    parsed.__name__ = parse.__name__
    return parsed


def _duration(raw: str) -> float:
    try:
        return tenancy.parse_duration(raw, "duration")
    except tenancy.InvalidInputError:
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not a duration such as 30m, 12h, 30d or 3600"
        ) from None


def _models(raw: str) -> list[str]:
    return [name.strip() for name in raw.split(",") if name.strip()]


def _metadata(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not JSON") from None


def _limit_options(command: argparse.ArgumentParser, team: bool = False) -> None:
    """The options that keys and teams share."""
    whose = "the team's (none: no team limit)" if team else "default: MPCAPI_DEFAULT_RPM"
    command.add_argument(
        "--rpm", type=_or_none(_count), help=f"requests per minute ({whose}; 0: no limit)"
    )
    whose = "the team's (none: no team limit)" if team else "default: MPCAPI_DEFAULT_TPM"
    command.add_argument(
        "--tpm", type=_or_none(_count), help=f"tokens per minute ({whose}; 0: no limit)"
    )
    command.add_argument(
        "--budget", type=_or_none(_dollars), help="spending limit in USD (default: none)"
    )
    command.add_argument(
        "--budget-period",
        choices=[*PERIODS, NONE],
        help="the budget resets every day, week (from Monday) or month, UTC (default: never)",
    )
    command.add_argument(
        "--models",
        type=_or_none(_models),
        help="allowed models, comma-separated: names, prefix/* or * (default: every model)",
    )
    command.add_argument("--metadata", type=_or_none(_metadata), help="a JSON object kept with it")


def _key_options(command: argparse.ArgumentParser) -> None:
    _limit_options(command)
    command.add_argument("--team", type=_or_none(str), help="the team (its id, team_…)")
    command.add_argument("--alias", type=_or_none(str), help="a unique name for the key")
    expiry = command.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires-in", type=_or_none(_duration), help="expire after 30d, 12h, 90m, 3600 …"
    )
    expiry.add_argument(
        "--expires-at", type=_or_none(str), help="expire at this ISO-8601 time (Z for UTC)"
    )


_DOCUMENT_FIELDS = {
    "user": "user",
    "name": "name",
    "rpm": "rpm",
    "tpm": "tpm",
    "budget": "budget_usd",
    "budget_period": "budget_period",
    "models": "models",
    "metadata": "metadata",
    "team": "team_id",
    "alias": "alias",
    "expires_in": "expires_in",
    "expires_at": "expires_at",
}


def _document(args: argparse.Namespace) -> dict[str, Any]:
    """The API document of the options given (those left out are not changed)."""
    document: dict[str, Any] = {}
    for option, field in _DOCUMENT_FIELDS.items():
        value = getattr(args, option, None)
        if value is None:
            continue
        document[field] = None if isinstance(value, str) and value == NONE else value
    return document


def parser() -> argparse.ArgumentParser:
    # The configuration options work before or after the command words.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        default=argparse.SUPPRESS,
        help=f"TOML configuration file [env {CONFIG_ENV}]",
    )
    common.add_argument(
        "--database-url",
        default=argparse.SUPPRESS,
        help="sqlite:///<path> or postgresql://… [env MPCAPI_DATABASE_URL; "
        "default sqlite:///mpcapi.db]",
    )
    top = argparse.ArgumentParser(
        prog=PROG, description="Manage MPC-API client keys and teams.", parents=[common]
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keys = commands.add_parser(
        "keys", help="create, list, show, update, revoke or rotate client keys", parents=[common]
    )
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser("create", help="create a key and print it (once)", parents=[common])
    create.add_argument("--user", required=True, type=_user, help="who the key is for")
    _key_options(create)
    create.add_argument("--json", action="store_true", help="print the key's JSON document")

    listing = actions.add_parser(
        "list", help="one line per key (never the key itself)", parents=[common]
    )
    listing.add_argument("--user", help="only the keys of this user")
    listing.add_argument("--team", help="only the keys of this team (its id)")
    listing.add_argument("--json", action="store_true", help="print GET /admin/keys's JSON")

    show = actions.add_parser(
        "show", help="a key's JSON: limits, spend in its period, reset time", parents=[common]
    )
    show.add_argument("id", help="the key's id (key_…)")

    update = actions.add_parser(
        "update", help="change a key ('none' clears a value)", parents=[common]
    )
    update.add_argument("id", help="the key's id (key_…)")
    update.add_argument("--user", type=_user, help="who the key is for")
    _key_options(update)

    revoke = actions.add_parser("revoke", help="revoke a key by its id", parents=[common])
    revoke.add_argument("id", help="the key's id (key_…), as `keys list` shows it")

    rotate = actions.add_parser(
        "rotate", help="give a key a new secret (printed once)", parents=[common]
    )
    rotate.add_argument("id", help="the key's id (key_…)")
    rotate.add_argument(
        "--grace",
        type=_duration,
        default=0.0,
        help="how long the old secret keeps working (30m, 1h, 7d; default 0: not at all)",
    )

    teams = commands.add_parser(
        "teams", help="create, list, show, update or delete teams", parents=[common]
    )
    team_actions = teams.add_subparsers(dest="action", required=True, metavar="ACTION")
    team_create = team_actions.add_parser("create", help="create a team", parents=[common])
    team_create.add_argument("--name", required=True, type=_user, help="the team's unique name")
    _limit_options(team_create, team=True)
    team_create.add_argument("--json", action="store_true", help="print the team's JSON")
    team_list = team_actions.add_parser("list", help="one line per team", parents=[common])
    team_list.add_argument("--json", action="store_true", help="print GET /admin/teams's JSON")
    team_show = team_actions.add_parser("show", help="a team's JSON", parents=[common])
    team_show.add_argument("id", help="the team's id (team_…)")
    team_update = team_actions.add_parser("update", help="change a team", parents=[common])
    team_update.add_argument("id", help="the team's id (team_…)")
    team_update.add_argument("--name", type=_user, help="the team's unique name")
    _limit_options(team_update, team=True)
    team_delete = team_actions.add_parser(
        "delete", help="delete a team without active keys", parents=[common]
    )
    team_delete.add_argument("id", help="the team's id (team_…)")

    usage = commands.add_parser(
        "usage", help="requests, errors, tokens and cost from the usage ledger", parents=[common]
    )
    usage.add_argument("--group-by", choices=list(GROUPS), default="model", help="default: model")
    usage.add_argument("--since", help="from this ISO-8601 date or time (UTC unless it says)")
    usage.add_argument("--until", help="before this time (a date alone: to the end of that day)")
    usage.add_argument("--json", action="store_true", help="print GET /api/usage's JSON")
    return top


def _limit(value: int | None) -> str:
    return "default" if value is None else ("unlimited" if value == 0 else str(value))


def describe(key: ClientKey, now: float | None = None) -> str:
    """One line of ``keys list``: the id first, then owner, limits, budget and state (and,
    when they are set, its budget period, team, models, alias and expiry)."""
    budget = "none" if key.budget_usd is None else f"{key.budget_usd:g}"
    state = tenancy.key_state(key, time.time() if now is None else now)
    if key.revoked:
        state = f"revoked {key.revoked_at}"
    extras = ""
    if key.budget_period is not None:
        extras += f"  budget_period={key.budget_period}"
    if key.team_id is not None:
        extras += f"  team={key.team_id}"
    if key.models is not None:
        extras += f"  models={shlex.quote(','.join(key.models))}"
    if key.alias is not None:
        extras += f"  alias={shlex.quote(key.alias)}"
    if key.expires_at is not None:
        extras += f"  expires {key.expires_at}"
    return (
        f"{key.id}  user={shlex.quote(key.user)}  rpm={_limit(key.rpm)}  tpm={_limit(key.tpm)}"
        f"  budget_usd={budget}  {state}  created {key.created_at}{extras}"
    )


def run(args: argparse.Namespace, database: SyncDatabase, out: TextIO, err: TextIO) -> int:
    if args.command == "usage":
        return print_usage(args, database, out, err)
    try:
        if args.command == "teams":
            return run_team(args, database, out, err)
        return run_key(args, database, out, err)
    except tenancy.TenancyError as error:
        hint = ""
        if isinstance(error, tenancy.UnknownIdError):
            hint = f" (see {PROG} {args.command} list)"
        err.write(f"{PROG}: {error.message}{hint}\n")
        return 2 if isinstance(error, tenancy.InvalidInputError) else 1


def _print_json(out: TextIO, document: Any) -> None:
    out.write(json.dumps(document, indent=1) + "\n")


def run_key(args: argparse.Namespace, database: SyncDatabase, out: TextIO, err: TextIO) -> int:
    """The ``keys`` commands, through ``mpcapi.policy.tenancy`` (as the admin API)."""
    now = time.time()
    if args.action == "create":
        made = database.run(tenancy.create_key, _document(args), now)
        key = database.run(key_by_id, made["id"])
        assert key is not None
        if args.json:
            _print_json(out, made)
        else:
            out.write(f"created {describe(key)}\n")
            out.write(f"{made['secret']}\n")
        err.write(
            "This key is shown only once: store it now. "
            "Clients send it as Authorization: Bearer <key>.\n"
        )
        return 0
    if args.action == "list":
        if args.json:
            query = {"user": args.user, "team_id": args.team, "limit": str(tenancy.MAX_PAGE)}
            _print_json(out, database.run(tenancy.list_keys, query, now))
            return 0
        keys = database.run(list_keys, args.user, args.team)
        for key in keys:
            out.write(describe(key) + "\n")
        if not keys:
            err.write("no keys yet: create one with mpcapi-admin keys create --user NAME\n")
        return 0
    if args.action == "show":
        _print_json(out, database.run(tenancy.get_key, args.id, now))
        return 0
    if args.action == "update":
        changed = database.run(tenancy.update_key, args.id, _document(args), now)
        key = database.run(key_by_id, changed["id"])
        assert key is not None
        out.write(f"updated {describe(key)}\n")
        return 0
    if args.action == "rotate":
        rotated = database.run(tenancy.rotate_key, args.id, {"grace_seconds": args.grace}, now)
        until = rotated["previous_secret_valid_until"]
        out.write(f"rotated {rotated['id']}\n{rotated['secret']}\n")
        err.write(
            "The new secret is shown only once: store it now. The old one "
            + (f"works until {until}.\n" if until else "stops working within 5 seconds.\n")
        )
        return 0
    # revoke
    revoked = database.run(tenancy.revoke_key, args.id, now)
    out.write(
        f"revoked {revoked['id']} (user {shlex.quote(revoked['user'])}) at "
        f"{revoked['revoked_at']}; running daemons refuse it within 5 seconds\n"
    )
    return 0


def describe_team(team: dict[str, Any]) -> str:
    budget = "none" if team["budget_usd"] is None else f"{team['budget_usd']:g}"
    models = "all" if team["models"] is None else ",".join(team["models"])
    return (
        f"{team['id']}  name={shlex.quote(team['name'])}  rpm={_limit(team['rpm'])}"
        f"  tpm={_limit(team['tpm'])}  budget_usd={budget}"
        f"  budget_period={team['budget_period'] or 'none'}  models={models}"
        f"  active_keys={team['active_keys']}  spend_usd={team['spend_usd']:g}"
    )


def run_team(args: argparse.Namespace, database: SyncDatabase, out: TextIO, err: TextIO) -> int:
    """The ``teams`` commands, through ``mpcapi.policy.tenancy`` (as the admin API)."""
    now = time.time()
    if args.action == "create":
        made = database.run(tenancy.create_team, _document(args), now)
        if args.json:
            _print_json(out, made)
        else:
            out.write(f"created {describe_team(made)}\n")
        return 0
    if args.action == "list":
        page = database.run(tenancy.list_teams, {"limit": str(tenancy.MAX_PAGE)}, now)
        if args.json:
            _print_json(out, page)
        for team in [] if args.json else page["data"]:
            out.write(describe_team(team) + "\n")
        if not page["data"] and not args.json:
            err.write("no teams yet: create one with mpcapi-admin teams create --name NAME\n")
        return 0
    if args.action == "show":
        _print_json(out, database.run(tenancy.get_team, args.id, now))
        return 0
    if args.action == "update":
        changed = database.run(tenancy.update_team, args.id, _document(args), now)
        out.write(f"updated {describe_team(changed)}\n")
        return 0
    # delete
    deleted = database.run(tenancy.delete_team, args.id, now)
    out.write(f"deleted {deleted['id']} (name {shlex.quote(deleted['name'])})\n")
    return 0


def print_usage(args: argparse.Namespace, database: SyncDatabase, out: TextIO, err: TextIO) -> int:
    """``usage``: the ledger's summary, as a table or as JSON."""
    query = {"group_by": args.group_by, "from": args.since, "to": args.until}
    try:
        group_by, since, until = summary_query(query)
    except ValueError as error:
        err.write(f"{PROG}: {error}\n")
        return 2
    groups = database.run(usage_summary, group_by, since, until)
    document = summary_document(groups, group_by, since, until)
    out.write(json.dumps(document, indent=1) + "\n" if args.json else usage_table(document))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    options = {
        "config": getattr(args, "config", None),
        "database_url": getattr(args, "database_url", None),
    }
    try:
        settings = load_settings(options, os.environ)
    except ConfigError as error:
        sys.stderr.write(f"{PROG}: configuration error: {error}\n")
        return 2
    try:
        database = SyncDatabase(settings.database_url)
    except DatabaseError as error:
        sys.stderr.write(f"{PROG}: configuration error: MPCAPI_DATABASE_URL: {error}\n")
        return 2
    try:
        database.migrate()
        return run(args, database, sys.stdout, sys.stderr)
    except driver_errors() as error:
        sys.stderr.write(f"{PROG}: database error: {database.dialect.describe(error)}\n")
        return 1
    finally:
        database.close()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
