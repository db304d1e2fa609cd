"""Client keys: who may call ``/api`` and ``/v1`` when ``MPCAPI_AUTH=keys``, and the admin key.

A client key is ``sk-mpc-`` + 43 URL-safe characters. Only its SHA-256 (hex) is stored, in the
``client_keys`` table (see ``database.MIGRATIONS``), next to a public id (``key_ab12cd34``),
its owner and its limits. The secret is shown once by ``mpcapi-admin keys create`` and never
logged.

- ``ClientKey`` and the SQL (``create_key``, ``list_keys``, ``revoke_key``, ``key_by_hash``)
  live in ``mpcapi.storage.keys``, run by ``Database.run`` (daemon) or ``SyncDatabase.run``
  (``mpcapi-admin``).
- ``KeyAuthenticator``: the daemon's check of ``Authorization: Bearer <key>``, with a short
  cache so that the database stays off the hot path: a known key is trusted for
  ``FRESH_FOR`` seconds, then served while it is re-read in the background up to
  ``USABLE_FOR`` seconds, so a revoked key is refused within ``USABLE_FOR`` seconds (plus
  one query); so are changes to its team, read with it. An unknown key is remembered for
  ``UNKNOWN_FOR`` seconds, so that a flood of bad keys costs one query per key per second,
  and a new key works at once.
  A key past its ``expires_at`` (on the authenticator's clock) is refused at once, and so is
  the previous secret of a rotated key once its grace period is over.
- ``require_admin``: the guard of the admin surfaces (usage, metrics, dashboard).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import OrderedDict
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from mpcapi.config.settings import Settings
from mpcapi.errors import ApiError
from mpcapi.storage.database import Database
from mpcapi.storage.keys import ClientKey, hash_key, key_by_hash
from mpcapi.timestamps import epoch_of

log = Logger(namespace="mpcapi.keys")

# What a key can look like (token_urlsafe(32) is 43 characters); others are refused unseen.
_KEY_SHAPE = re.compile(r"^sk-mpc-[A-Za-z0-9_-]{16,128}$")
_BEARER = re.compile(r"^Bearer +(\S+) *$", re.IGNORECASE)

FRESH_FOR = 2.0  # seconds a looked-up key is trusted without asking the database
USABLE_FOR = 4.0  # ... and served while it is re-read in the background (< 5 s revocation)
UNKNOWN_FOR = 1.0  # seconds an unknown key is refused without asking the database again
MAX_CACHED = 10_000  # entries in each cache

# --- the daemon's check -------------------------------------------------------------------------


def unauthorized(message: str, code: str = "invalid_api_key") -> ApiError:
    return ApiError(
        401,
        "Unauthorized",
        message,
        headers={"WWW-Authenticate": "Bearer"},
        code=code,
    )


def bearer_token(authorization: bytes | str | None) -> str:
    """The token of ``Authorization: Bearer <token>``; 401 when missing or malformed."""
    if authorization is None or not authorization.strip():
        raise unauthorized("missing client key: send Authorization: Bearer <key>")
    if isinstance(authorization, bytes):
        authorization = authorization.decode("latin-1")
    match = _BEARER.match(authorization.strip())
    if match is None:
        raise unauthorized("malformed Authorization header: expected Bearer <key>")
    return match.group(1)


@attrs.define
class _Cached:
    key: ClientKey
    fetched_at: float


class KeyAuthenticator:
    """Checks client keys against the database, through a short cache (see the module doc)."""

    def __init__(self, database: Database, clock: IReactorTime) -> None:
        self.database = database
        self.clock = clock
        self._known: OrderedDict[str, _Cached] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()  # hash -> when it expires
        self._in_flight: dict[str, list[defer.Deferred[ClientKey | None]]] = {}

    async def authenticate(self, authorization: bytes | str | None) -> ClientKey:
        """The key of an ``Authorization`` header, or the 401 ``ApiError`` that refuses it."""
        token = bearer_token(authorization)
        if not _KEY_SHAPE.match(token):
            raise unauthorized("invalid client key")
        key_hash = hash_key(token)
        key = await self._lookup(key_hash)
        if key is None:
            raise unauthorized("invalid client key")
        # The row was found by its hash; compare anyway, in constant time.
        if not hmac.compare_digest(key.key_hash, key_hash):
            # The previous secret of a rotated key, which works for its grace period only.
            previous = key.previous_hash
            if previous is None or not hmac.compare_digest(previous, key_hash):
                raise unauthorized("invalid client key")
            until = key.previous_until
            if until is None or epoch_of(until) <= self.clock.seconds():
                raise unauthorized(
                    f"client key {key.id} has been rotated: this secret is no longer valid",
                    code="key_rotated",
                )
        if key.revoked:
            raise unauthorized(f"client key {key.id} has been revoked")
        expires = key.expires_at
        if expires is not None and epoch_of(expires) <= self.clock.seconds():
            raise unauthorized(f"client key {key.id} expired at {expires}", code="key_expired")
        return key

    def forget(self) -> None:
        """Drop every cached key (a configuration reload): the next use reads the database."""
        self._known.clear()
        self._unknown.clear()

    def forget_key(self, key_id: str) -> None:
        """Drop one key from the cache (changed through this process's admin API): this
        process sees the change at once, the others within ``USABLE_FOR`` seconds."""
        for key_hash in [h for h, c in self._known.items() if c.key.id == key_id]:
            del self._known[key_hash]
        self._unknown.clear()  # a rotated key's new secret may have been tried already

    def forget_team(self, team_id: str) -> None:
        """Drop the cached keys of one team (its limits, budget or models changed)."""
        for key_hash in [h for h, c in self._known.items() if c.key.team_id == team_id]:
            del self._known[key_hash]

    async def _lookup(self, key_hash: str) -> ClientKey | None:
        now = self.clock.seconds()
        cached = self._known.get(key_hash)
        if cached is not None:
            age = now - cached.fetched_at
            if age < FRESH_FOR:
                return cached.key
            if age < USABLE_FOR:
                self._refresh_in_background(key_hash)
                return cached.key
            del self._known[key_hash]
        expires = self._unknown.get(key_hash)
        if expires is not None:
            if now < expires:
                return None
            del self._unknown[key_hash]
        return await self._fetch(key_hash)

    def _refresh_in_background(self, key_hash: str) -> None:
        if key_hash in self._in_flight:
            return
        # A failure is logged by _fetched; the cached row stays usable until USABLE_FOR.
        self._fetch(key_hash).addErrback(lambda _: None)

    def _fetch(self, key_hash: str) -> defer.Deferred[ClientKey | None]:
        """Read one key from the database; concurrent reads of the same key share one query."""
        waiter: defer.Deferred[ClientKey | None] = defer.Deferred()
        waiters = self._in_flight.get(key_hash)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._in_flight[key_hash] = [waiter]
        query = defer.ensureDeferred(self.database.run(key_by_hash, key_hash))
        query.addBoth(self._fetched, key_hash)
        return waiter

    def _fetched(self, result: Any, key_hash: str) -> None:
        waiters = self._in_flight.pop(key_hash, [])
        if isinstance(result, ClientKey):
            self._remember(self._known, key_hash, _Cached(result, self.clock.seconds()))
            self._unknown.pop(key_hash, None)
        elif result is None:
            self._known.pop(key_hash, None)
            self._remember(self._unknown, key_hash, self.clock.seconds() + UNKNOWN_FOR)
        else:  # a Failure: the database is unavailable
            log.failure("looking up a client key failed", result)
            error = ApiError(
                503, "Service Unavailable", "client keys cannot be checked right now; retry"
            )
            for waiter in waiters:
                waiter.errback(error)
            return
        for waiter in waiters:
            waiter.callback(result)

    @staticmethod
    def _remember(cache: OrderedDict[str, Any], key_hash: str, value: Any) -> None:
        cache[key_hash] = value
        cache.move_to_end(key_hash)
        while len(cache) > MAX_CACHED:
            cache.popitem(last=False)


def open_authenticator(settings: Settings, reactor: Any, clock: IReactorTime) -> KeyAuthenticator:
    """The authenticator of ``settings.database_url``: the database's threads run on
    ``reactor``, the cache's time is ``clock``."""
    return KeyAuthenticator(Database(settings.database_url, reactor), clock)


# --- the admin key ------------------------------------------------------------------------------


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def admin_key_matches(candidate: str, settings: Settings) -> bool:
    """Whether ``candidate`` is the admin key (constant time; False when none is set)."""
    if not settings.admin_key:
        return False
    return hmac.compare_digest(_digest(candidate), _digest(settings.admin_key))


def require_admin(request: IRequest, settings: Settings) -> None:
    """Guard of the admin surfaces: ``Authorization: Bearer <MPCAPI_ADMIN_KEY>``.

    403 when no admin key is configured (the surfaces are closed); 401 (with
    ``WWW-Authenticate: Bearer``) when the header is missing, malformed or wrong.
    """
    if not settings.admin_key:
        raise ApiError(
            403, "Forbidden", "admin surfaces are closed: MPCAPI_ADMIN_KEY is not configured"
        )
    header = request.getHeader(b"authorization")
    if header is None:
        raise unauthorized("missing admin key: send Authorization: Bearer <admin key>")
    token = bearer_token(header)
    if not admin_key_matches(token, settings):
        raise unauthorized("invalid admin key")
