"""``mpcapi-admin``: manage client keys in the daemon's database.

    mpcapi-admin keys create --user NAME [--rpm N] [--tpm N] [--budget USD]
    mpcapi-admin keys list
    mpcapi-admin keys revoke ID
    mpcapi-admin usage [--group-by model|user|key|day] [--since WHEN] [--until WHEN] [--json]

The database is the daemon's: the same sources (``--config``/``MPCAPI_CONFIG``, ``.env``,
the environment, ``--database-url``) give the same ``MPCAPI_DATABASE_URL``. A running
daemon accepts a new key at once and refuses a revoked one within 5 seconds.

Exit status: 0 done; 1 the command failed (unknown id, database unavailable); 2 bad usage
or configuration (one line naming the key).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from typing import TextIO

from mpcapi.config.settings import CONFIG_ENV, ConfigError, load_settings
from mpcapi.ledger.report import summary_document, summary_query, usage_table
from mpcapi.storage.database import DatabaseError, SyncDatabase, driver_errors
from mpcapi.storage.keys import ClientKey, create_key, list_keys, revoke_key
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
        prog=PROG, description="Manage MPC-API client keys.", parents=[common]
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keys = commands.add_parser("keys", help="create, list or revoke client keys", parents=[common])
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser("create", help="create a key and print it (once)", parents=[common])
    create.add_argument("--user", required=True, type=_user, help="who the key is for")
    create.add_argument(
        "--rpm", type=_count, help="requests per minute (default: MPCAPI_DEFAULT_RPM; 0: no limit)"
    )
    create.add_argument(
        "--tpm", type=_count, help="tokens per minute (default: MPCAPI_DEFAULT_TPM; 0: no limit)"
    )
    create.add_argument("--budget", type=_dollars, help="spending limit in USD (default: none)")

    actions.add_parser("list", help="one line per key (never the key itself)", parents=[common])

    revoke = actions.add_parser("revoke", help="revoke a key by its id", parents=[common])
    revoke.add_argument("id", help="the key's id (key_…), as `keys list` shows it")

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


def describe(key: ClientKey) -> str:
    """One line of ``keys list``: the id first, then owner, limits, budget and state."""
    budget = "none" if key.budget_usd is None else f"{key.budget_usd:g}"
    state = f"revoked {key.revoked_at}" if key.revoked else "active"
    return (
        f"{key.id}  user={shlex.quote(key.user)}  rpm={_limit(key.rpm)}  tpm={_limit(key.tpm)}"
        f"  budget_usd={budget}  {state}  created {key.created_at}"
    )


def run(args: argparse.Namespace, database: SyncDatabase, out: TextIO, err: TextIO) -> int:
    if args.command == "usage":
        return print_usage(args, database, out, err)
    if args.action == "create":
        key, secret = database.run(create_key, args.user, args.rpm, args.tpm, args.budget)
        out.write(f"created {describe(key)}\n")
        out.write(f"{secret}\n")
        err.write(
            "This key is shown only once: store it now. "
            "Clients send it as Authorization: Bearer <key>.\n"
        )
        return 0
    if args.action == "list":
        keys = database.run(list_keys)
        for key in keys:
            out.write(describe(key) + "\n")
        if not keys:
            err.write("no keys yet: create one with mpcapi-admin keys create --user NAME\n")
        return 0
    # revoke
    revoked = database.run(revoke_key, args.id)
    if revoked is None:
        err.write(f"{PROG}: no key with id {args.id!r} (see mpcapi-admin keys list)\n")
        return 1
    out.write(
        f"revoked {revoked.id} (user {shlex.quote(revoked.user)}) at {revoked.revoked_at}; "
        "running daemons refuse it within 5 seconds\n"
    )
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
