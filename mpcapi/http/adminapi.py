"""The admin HTTP API: client keys and teams, as JSON, behind the admin key.

    POST   /admin/keys                 create a key; the answer holds its secret, once
    GET    /admin/keys                 ?user=&team_id=&limit=&offset= (oldest first)
    GET    /admin/keys/{id}            the key, its current period's spend, its reset time
    PATCH  /admin/keys/{id}            change limits, budget, period, models, expiry, …
    DELETE /admin/keys/{id}            revoke
    POST   /admin/keys/{id}/rotate     a new secret; {"grace_seconds": N} keeps the old one
    POST   /admin/teams, GET /admin/teams, GET/PATCH/DELETE /admin/teams/{id}

The operations are ``mpcapi.policy.tenancy``'s, which ``mpcapi-admin`` runs too; here they run
in the database's thread (``Database.run``), on the daemon's clock. A change made here is seen
by this process at once (its cached key rows are dropped) and by every other process on the
database within ``mpcapi.policy.keys.USABLE_FOR`` seconds. Errors have the usual shape: 400
naming the field, 401/403 for the admin key, 404 unknown id, 409 duplicate alias or name.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from mpcapi.config.live import LiveSettings
from mpcapi.errors import JSON_CONTENT_TYPE, ApiError, set_status, with_length
from mpcapi.policy import tenancy
from mpcapi.policy.keys import require_admin
from mpcapi.storage.database import Database

if TYPE_CHECKING:
    from mpcapi.ledger.ledger import UsageLedger
    from mpcapi.policy.keys import KeyAuthenticator

_REASONS = {400: "Bad Request", 404: "Not Found", 409: "Conflict"}


def _query(request: Request) -> dict[str, str | None]:
    arguments: dict[str, str | None] = {}
    for name, values in (request.args or {}).items():
        try:
            arguments[name.decode("utf-8")] = values[-1].decode("utf-8") if values else None
        except UnicodeDecodeError:
            raise ApiError(400, "Bad Request", "query parameters must be UTF-8") from None
    return arguments


class AdminApi:
    """The operations behind the ``/admin`` routes (see the module doc)."""

    def __init__(
        self,
        live: LiveSettings,
        clock: IReactorTime,
        open_database: Callable[[], Database],
        keys: KeyAuthenticator | None = None,
        ledger: UsageLedger | None = None,
    ) -> None:
        self.live = live
        self.clock = clock
        # The keys' database, opened on first use: a daemon that never serves the admin API
        # opens none (without client keys or a ledger, it has no database otherwise).
        self._open_database = open_database
        self.keys = keys  # its cache forgets what changes here
        self.ledger = ledger  # its queued rows are stored before spend is read

    @functools.cached_property
    def database(self) -> Database:
        return self._open_database()

    async def run(
        self,
        request: Request,
        operation: Callable[..., dict[str, Any]],
        *args: Any,
        body: bool = False,
    ) -> bytes:
        """Check the admin key, run ``operation(cursor, *args[, body], now)`` in the
        database's thread, answer its document as JSON (201 for a creation)."""
        require_admin(request, self.live.current)
        if body:
            args = (*args, body_of(request))
        if self.ledger is not None and self.ledger.queue and self.ledger.database_up:
            await self.ledger.flush()  # spend includes this process's latest rows
        try:
            document = await self.database.run(operation, *args, self.clock.seconds())
        except tenancy.TenancyError as error:
            raise ApiError(
                error.status, _REASONS[error.status], error.message, param=error.field
            ) from None
        self._forget(document)
        status = 201 if operation in (tenancy.create_key, tenancy.create_team) else 200
        set_status(request, status)
        request.setHeader(b"content-type", JSON_CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return with_length(request, json.dumps(document).encode("utf-8"))

    def _forget(self, document: dict[str, Any]) -> None:
        if self.keys is None:
            return
        if document.get("object") == "client_key":
            self.keys.forget_key(document["id"])
        elif document.get("object") == "team":
            self.keys.forget_team(document["id"])


def body_of(request: Request) -> Any:
    raw = request.content.read() if request.content is not None else b""
    try:
        return tenancy.json_body(raw)
    except tenancy.InvalidInputError as error:
        raise ApiError(400, "Bad Request", error.message) from None


def add_routes(app: Klein, admin_of: Callable[[Any], AdminApi]) -> None:
    """Add the ``/admin`` routes to ``app`` (the Gateway's), each served by the AdminApi
    ``admin_of(self)`` of the app's instance."""

    def route(path: str, method: str, name: str) -> Callable[[Callable[..., Any]], Any]:
        def register(handler: Callable[..., Any]) -> Any:
            handler.__name__ = handler.__qualname__ = name
            return app.route(path, methods=[method], endpoint=name)(handler)

        return register

    @route("/admin/keys", "POST", "admin_create_key")
    async def create_key(self: Any, request: Request) -> bytes:
        return await admin_of(self).run(request, tenancy.create_key, body=True)

    @route("/admin/keys", "GET", "admin_list_keys")
    async def list_keys(self: Any, request: Request) -> bytes:
        return await admin_of(self).run(request, tenancy.list_keys, _query(request))

    @route("/admin/keys/<string:key_id>", "GET", "admin_get_key")
    async def get_key(self: Any, request: Request, key_id: str) -> bytes:
        return await admin_of(self).run(request, tenancy.get_key, key_id)

    @route("/admin/keys/<string:key_id>", "PATCH", "admin_update_key")
    async def update_key(self: Any, request: Request, key_id: str) -> bytes:
        return await admin_of(self).run(request, tenancy.update_key, key_id, body=True)

    @route("/admin/keys/<string:key_id>", "DELETE", "admin_revoke_key")
    async def revoke_key(self: Any, request: Request, key_id: str) -> bytes:
        return await admin_of(self).run(request, tenancy.revoke_key, key_id)

    @route("/admin/keys/<string:key_id>/rotate", "POST", "admin_rotate_key")
    async def rotate_key(self: Any, request: Request, key_id: str) -> bytes:
        return await admin_of(self).run(request, tenancy.rotate_key, key_id, body=True)

    @route("/admin/teams", "POST", "admin_create_team")
    async def create_team(self: Any, request: Request) -> bytes:
        return await admin_of(self).run(request, tenancy.create_team, body=True)

    @route("/admin/teams", "GET", "admin_list_teams")
    async def list_teams(self: Any, request: Request) -> bytes:
        return await admin_of(self).run(request, tenancy.list_teams, _query(request))

    @route("/admin/teams/<string:team_id>", "GET", "admin_get_team")
    async def get_team(self: Any, request: Request, team_id: str) -> bytes:
        return await admin_of(self).run(request, tenancy.get_team, team_id)

    @route("/admin/teams/<string:team_id>", "PATCH", "admin_update_team")
    async def update_team(self: Any, request: Request, team_id: str) -> bytes:
        return await admin_of(self).run(request, tenancy.update_team, team_id, body=True)

    @route("/admin/teams/<string:team_id>", "DELETE", "admin_delete_team")
    async def delete_team(self: Any, request: Request, team_id: str) -> bytes:
        return await admin_of(self).run(request, tenancy.delete_team, team_id)


__all__ = ["AdminApi", "add_routes", "body_of"]
