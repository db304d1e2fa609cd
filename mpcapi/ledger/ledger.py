"""The usage ledger: one database row per finished request, its cost, and key budgets.

- ``UsageLedger.observe`` is an exchange observer (see ``mpcapi.exchange``): it turns a
  finished call into a row and puts it on a bounded in-memory queue. Nothing
  else happens on the request's path.
- A flusher (every ``FLUSH_EVERY`` seconds, or at once when ``BATCH`` rows wait) inserts the
  queued rows through the writer process (``mpcapi.ledger.rowwriter``; without one, through
  ``Database``'s thread). When the database is unreachable the
  rows go to an append-only spool file (JSON lines, written in the thread pool) and are
  replayed into the database once it answers again; the insert ignores a request id that is
  already there, so a replay is idempotent. The outage is logged once, and once when it ends.
  A full queue also sends rows to the spool file: memory stays bounded. A row the database
  refuses while it answers (see ``mpcapi.storage.usagerows``) is not retried, which would hold
  back every later row: it is logged and kept in a file beside the spool (``ledger.spool``).
- Cost: LiteLLM's (``x-litellm-response-cost``, or ``usage.cost`` in a stream's usage chunk)
  when it gave one; otherwise tokens times the price table (``ledger.prices``; the daemon
  ships a copy as ``mpcapi/data/prices.toml``, ``MPCAPI_PRICES`` overrides it); a model that
  is not in the table costs 0 and is flagged ``unknown_model``. ``cost_source`` says which.
- Budgets: ``check_budget`` refuses (429) a key whose spend (the sum of its ledger rows,
  shared by every instance through the database, read at most every ``SPEND_FRESH_FOR``
  seconds, plus the rows of this process not stored yet) has reached its ``budget_usd``, and
  so for the key's team (its rows carry ``team_id``). With a ``budget_period`` (``day``,
  ``week``, ``month``: UTC calendar boundaries, see ``ledger.periods``) the spend counts from
  the period's start, on the ledger's clock; the 429 says when the budget resets. Rows of
  this process not stored yet count in the period they are read in (for a second or so past
  a boundary, at most).
- ``report``: requests, errors, tokens and cost per model, user, key or day (for
  ``GET /api/usage`` and ``mpcapi-admin usage``; the SQL is ``mpcapi.storage.usage``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mpcapi.errors import ApiError, bad_request
from mpcapi.ledger.bodies import stored_body
from mpcapi.ledger.periods import PeriodBounds, Periods
from mpcapi.ledger.prices import PriceTable, cost_of
from mpcapi.ledger.report import summary_document, summary_query
from mpcapi.ledger.rowwriter import RowWriter
from mpcapi.ledger.spool import append_lines, read_lines, refused_path_of, remove_file
from mpcapi.storage.database import Database
from mpcapi.storage.usage import spend_of, usage_summary
from mpcapi.storage.usagerows import insert_rows
from mpcapi.timestamps import iso_millis

if TYPE_CHECKING:
    from mpcapi.exchange import Exchange
    from mpcapi.storage.keys import ClientKey

log = Logger(namespace="mpcapi.ledger")

FLUSH_EVERY = 1.0  # seconds between flushes
BATCH = 1000  # rows per insert; a full batch is flushed at once
MAX_QUEUE = 10_000  # rows waiting in memory; past it they go to the spool file
REPLAY_BATCH = 500
RETRY_EVERY = 2.0  # seconds between attempts to reach a database that is down
SPEND_FRESH_FOR = 2.5  # a key's spend is read again after this long ...
SPEND_USABLE_FOR = 5.0  # ... in the background, and served stale at most this long
BUDGET_WARNING = 0.8  # share of a budget that logs a warning (once per key and process)

# --- the ledger ---------------------------------------------------------------------------------

InThread = Callable[..., "defer.Deferred[Any]"]
_ADJECTIVES = {"day": "daily", "week": "weekly", "month": "monthly"}


@attrs.define
class _Spend:
    value: float
    fetched_at: float
    flushed_marker: float
    since: str | None  # the period's start the value counts from (None: all time)


class UsageLedger(Service):
    """Rows in, batches out; see the module doc. A twistd service: it flushes while running
    and, when stopping, waits for the requests in flight (``idle``) and stores what is left."""

    def __init__(
        self,
        database: Database,
        clock: IReactorTime,
        prices: PriceTable,
        spool_path: str,
        in_thread: InThread,
        *,
        max_queue: int = MAX_QUEUE,
        batch: int = BATCH,
        idle: Callable[[], bool] | None = None,
        stop_wait: float = 30.0,
        writer: RowWriter | None = None,
        report_queue: Callable[[int], None] = lambda rows: None,
        report_refused: Callable[[int], None] = lambda rows: None,
    ) -> None:
        self.database = database
        # Inserts go to the writer process when there is one, else to the database's thread.
        self.writer = writer
        self.clock = clock
        self.prices = prices
        self.spool_path = spool_path
        self._in_thread = in_thread
        self.max_queue = max_queue
        self.batch = batch
        self._idle = idle  # whether no request is in flight (the last flush waits for it)
        self._stop_wait = stop_wait
        self.queue: list[dict[str, Any]] = []
        # Told the rows waiting every FLUSH_EVERY s (the mpcapi_usage_queue_rows gauge).
        self._report_queue = report_queue
        # Told each time rows are refused, how many (the mpcapi_usage_rows_refused counter).
        self._report_refused = report_refused
        self.database_up = True
        self.dropped = 0  # rows lost because neither the database nor the spool file took them
        self.refused_path = refused_path_of(spool_path)
        self.refused = 0  # rows the database refused, kept in refused_path
        self._flushing = False
        self._loop: task.LoopingCall | None = None
        self._last_attempt = -RETRY_EVERY
        # The spool file: one writer or reader at a time, rows waiting to be written.
        self._spool_lock = defer.DeferredLock()
        self._to_spool: list[dict[str, Any]] = []
        self._spool_writing = False
        self.spooled = os.path.exists(spool_path)  # rows of an earlier run wait there
        self._spool_failed = False
        # Budgets: this process's rows not in the database yet, per account ("key:<id>",
        # "team:<id>"), and the spend read.
        self._unstored: dict[str, tuple[tuple[str, ...], float]] = {}  # id -> accounts, cost
        self._unstored_by_key: dict[str, float] = {}
        self._stored_since: dict[str, float] = {}  # stored by us since the first read
        self._spend: dict[str, _Spend] = {}
        self._reading: dict[tuple[str, str | None], list[defer.Deferred[float]]] = {}
        self._warned: set[tuple[str, str | None]] = set()
        self._periods = Periods()

    # The request side

    def observe(self, exchange: Exchange) -> None:
        """Exchange observer: queue the finished call's row (or spool it if the queue is
        full). Only the OpenAI routes are usage: health probes, metrics scrapes and the
        dashboard's polls would only bury it."""
        if exchange.route is None:
            return
        row = self.row_of(exchange)
        key_id = row["key_id"]
        if key_id and row["cost_usd"]:
            cost = row["cost_usd"]
            accounts = ("key:" + key_id,) + (("team:" + row["team_id"],) if row["team_id"] else ())
            self._unstored[row["request_id"]] = (accounts, cost)
            for account in accounts:
                self._unstored_by_key[account] = self._unstored_by_key.get(account, 0.0) + cost
        if len(self.queue) >= self.max_queue:
            self._spool([row])
            return
        self.queue.append(row)
        if len(self.queue) >= self.batch and not self._flushing:
            self.flush()

    def row_of(self, exchange: Exchange) -> dict[str, Any]:
        cost, source, prompt, completion = cost_of(exchange, self.prices)
        usage = exchange.usage
        return {
            "request_id": exchange.request_id,
            "created_at": iso_millis(exchange.started),
            "key_id": exchange.key_id,
            "user": exchange.user,
            "client": exchange.client,
            "method": exchange.method,
            "route": exchange.route or exchange.path,
            "model": exchange.model,
            "status": exchange.status,
            "upstream_status": exchange.upstream_status,
            "latency_ms": exchange.duration_ms,
            "upstream_ms": exchange.upstream_ms,
            "ttfb_ms": exchange.ttfb_ms,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cost_usd": cost,
            "cost_source": source,
            "cache": exchange.cache,
            "outcome": exchange.outcome,
            # The exchange holds its bodies only with MPCAPI_LOG_BODIES (see http.forwarding).
            "request_body": stored_body(exchange.request_body),
            "response_body": stored_body(exchange.response_body),
            "trace_id": exchange.trace.trace_id_hex if exchange.trace is not None else None,
            "cache_read_tokens": usage.cache_read_tokens if usage is not None else 0,
            "cache_write_tokens": usage.cache_write_tokens if usage is not None else 0,
            "units": usage.units if usage is not None else None,
            "unit": usage.unit if usage is not None else None,
            "team_id": exchange.key.team_id if exchange.key is not None else None,
        }

    # Budgets

    async def check_budget(self, key: ClientKey | None) -> None:
        """Refuse (429) a key whose spend, or whose team's, has reached its budget in the
        current period; warn once per period at 80 %."""
        if key is None:
            return
        if key.budget_usd is not None:
            await self._check(
                "key:" + key.id, f"client key {key.id}", key.budget_usd, key.budget_period, key.user
            )
        team = key.team
        if team is not None and team.budget_usd is not None:
            await self._check(
                "team:" + team.id,
                f"team {team.id} ({team.name})",
                team.budget_usd,
                team.budget_period,
                key.user,
            )

    def bounds(self, period: str | None) -> PeriodBounds | None:
        """The current period ``period`` on the ledger's clock; None for no period."""
        return None if period is None else self._periods.bounds(period, self.clock.seconds())

    async def _check(
        self, account: str, whose: str, budget: float, period: str | None, user: str
    ) -> None:
        bounds = self.bounds(period)
        since = bounds.since if bounds is not None else None
        spend = await self.spend(account, since)
        if spend >= budget:
            headers: dict[str, str] = {}
            resets = ""
            if bounds is not None:
                wait = max(1, int(bounds.end - self.clock.seconds() + 0.999))
                headers["Retry-After"] = str(wait)
                resets = f"; it resets at {bounds.resets_at} ({_ADJECTIVES[bounds.period]} budget)"
            raise ApiError(
                429,
                "Too Many Requests",
                f"the budget of {whose} is spent: ${spend:.6f} of ${budget:g} used{resets}",
                code="insufficient_quota",
                kind="insufficient_quota",  # OpenAI's type for a spent quota
                headers=headers,
            )
        if spend >= BUDGET_WARNING * budget and (account, since) not in self._warned:
            self._warned.add((account, since))
            log.warn(
                "{whose} (user {user}) has spent {spend:.6f} of its budget of {budget} USD",
                whose=whose,
                user=user,
                spend=spend,
                budget=budget,
            )

    async def spend(self, account: str, since: str | None = None) -> float:
        """An account's spend (``key:<id>``, ``team:<id>``; a bare id is a key) from
        ``since``: the database's sum (read at most every ``SPEND_FRESH_FOR`` seconds; stale
        reads refresh in the background) plus this process's rows not in it."""
        if ":" not in account:
            account = "key:" + account
        now = self.clock.seconds()
        known = self._spend.get(account)
        if known is not None and known.since != since:  # a new period: read it now
            known = None
        if known is None or now - known.fetched_at >= SPEND_USABLE_FOR:
            await self._read_spend(account, since)
        elif now - known.fetched_at >= SPEND_FRESH_FOR and (account, since) not in self._reading:
            self._read_spend(account, since).addErrback(lambda _: None)
        return self._local_spend(account, since)

    def _local_spend(self, account: str, since: str | None) -> float:
        known = self._spend.get(account)
        if known is not None and known.since != since:
            known = None
        stored = known.value if known is not None else 0.0
        since_read = self._stored_since.get(account, 0.0) - (known.flushed_marker if known else 0.0)
        return stored + since_read + self._unstored_by_key.get(account, 0.0)

    def _read_spend(self, account: str, since: str | None) -> defer.Deferred[float]:
        waiter: defer.Deferred[float] = defer.Deferred()
        reading = (account, since)
        if reading in self._reading:
            self._reading[reading].append(waiter)
            return waiter
        self._reading[reading] = [waiter]
        marker = self._stored_since.get(account, 0.0)
        query = defer.ensureDeferred(self.database.run(spend_of, account, since))
        query.addBoth(self._spend_read, account, since, marker)
        return waiter

    def _spend_read(self, result: Any, account: str, since: str | None, marker: float) -> None:
        waiters = self._reading.pop((account, since), [])
        if isinstance(result, float):
            self._spend[account] = _Spend(result, self.clock.seconds(), marker, since)
        else:  # the database is down: keep what we knew (requests are not refused for it)
            self._database_down(result.value)
            known = self._spend.get(account)
            if known is not None:
                known.fetched_at = self.clock.seconds() - SPEND_FRESH_FOR
        for waiter in waiters:
            waiter.callback(self._local_spend(account, since))

    def _stored(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for row in rows:
            entry = self._unstored.pop(row["request_id"], None)
            if entry is None:
                continue
            accounts, cost = entry
            for account in accounts:
                left = self._unstored_by_key.get(account, 0.0) - cost
                if left <= 1e-12:
                    self._unstored_by_key.pop(account, None)
                else:
                    self._unstored_by_key[account] = left
                self._stored_since[account] = self._stored_since.get(account, 0.0) + cost

    # Flushing

    def flush(self) -> defer.Deferred[None]:
        """Store what is queued (and replay the spool file when the database answers)."""
        return defer.ensureDeferred(self._flush())

    async def _flush(self) -> None:
        if self._flushing:
            return
        self._flushing = True
        try:
            while self.queue:
                if not self.database_up and not self._may_retry():
                    rows, self.queue = self.queue, []
                    self._spool(rows)  # while it is down, between two attempts
                    break
                batch, self.queue = self.queue[: self.batch], self.queue[self.batch :]
                if not await self._insert(batch):
                    rest, self.queue = self.queue, []
                    self._spool(batch + rest)
                    break
            if self.spooled and (self.database_up or self._may_retry()):
                await self._replay()
        finally:
            self._flushing = False

    def _may_retry(self) -> bool:
        return self.clock.seconds() - self._last_attempt >= RETRY_EVERY

    async def _insert(self, rows: list[dict[str, Any]]) -> bool:
        self._last_attempt = self.clock.seconds()
        refused: list[tuple[dict[str, Any], str]] = []
        try:
            if self.writer is not None:
                refused = (await self.writer.insert(rows)).refused
            else:
                await self.database.run(insert_rows, rows)
        except Exception as error:
            self._database_down(error)
            return False
        self._database_back()
        self._stored(rows)
        if refused:
            self._set_aside(refused)
        return True

    def _set_aside(self, refused: list[tuple[dict[str, Any], str]]) -> None:
        """Keep rows the database refused in the refused file, with why (never retried)."""
        self.refused += len(refused)
        self._report_refused(len(refused))
        for row, reason in refused:
            log.error(
                "usage row {request_id} refused by the database ({reason}); kept in {path}",
                request_id=row.get("request_id"),
                reason=reason,
                path=self.refused_path,
            )
        rows = [{**row, "refused_because": reason} for row, reason in refused]
        defer.ensureDeferred(self._keep_refused(rows))

    async def _keep_refused(self, rows: list[dict[str, Any]]) -> None:
        error = await self._append(self.refused_path, rows)
        if error is not None:
            log.error(
                "cannot write refused usage rows to {path} ({error}); they are lost",
                path=self.refused_path,
                error=error,
            )

    def _database_down(self, error: BaseException) -> None:
        self._last_attempt = self.clock.seconds()
        if self.database_up:
            self.database_up = False
            log.error(
                "usage database unreachable ({error}); usage rows go to {spool} until it is back",
                error=" ".join(str(error).split()) or type(error).__name__,
                spool=self.spool_path,
            )

    def _database_back(self) -> None:
        if not self.database_up:
            self.database_up = True
            log.info("usage database is back; replaying {spool}", spool=self.spool_path)

    # The spool file

    def _spool(self, rows: list[dict[str, Any]]) -> None:
        self._to_spool.extend(rows)
        if not self._spool_writing:
            self._spool_writing = True
            defer.ensureDeferred(self._write_spool())

    async def _write_spool(self) -> None:
        try:
            while self._to_spool:
                rows, self._to_spool = self._to_spool, []
                error = await self._append(self.spool_path, rows)
                if error is None:
                    self.spooled = True
                    self._spool_failed = False
                elif not self._spool_failed:
                    self._spool_failed = True
                    log.error(
                        "cannot write usage rows to {spool} ({error}); they are lost",
                        spool=self.spool_path,
                        error=error,
                    )
        finally:
            self._spool_writing = False

    async def _append(self, path: str, rows: list[dict[str, Any]]) -> Exception | None:
        """Append rows to the spool or the refused file (one writer of these files at a
        time); on failure they count as dropped, and the error is returned."""
        await self._spool_lock.acquire()
        try:
            await self._in_thread(append_lines, path, rows)
        except Exception as error:
            self.dropped += len(rows)
            return error
        finally:
            self._spool_lock.release()
        return None

    async def _replay(self) -> None:
        """Insert the spool file's rows (an id already stored is skipped), then remove it."""
        await self._spool_lock.acquire()
        try:
            rows = await self._in_thread(read_lines, self.spool_path)
            for start in range(0, len(rows), REPLAY_BATCH):
                if not await self._insert(rows[start : start + REPLAY_BATCH]):
                    return
            await self._in_thread(remove_file, self.spool_path)
            self.spooled = False
            if rows:
                log.info(
                    "replayed {count} usage rows from {spool}",
                    count=len(rows),
                    spool=self.spool_path,
                )
        except Exception as error:
            log.error("replaying {spool} failed: {error}", spool=self.spool_path, error=error)
        finally:
            self._spool_lock.release()

    # Reading

    async def report(self, arguments: Mapping[str, str | None]) -> dict[str, Any]:
        """``GET /api/usage``: the summary of ``arguments`` (400 when they are bad), with this
        process's queued rows stored first."""
        try:
            group_by, since, until = summary_query(arguments)
        except ValueError as error:
            raise bad_request(str(error)) from None
        if self.queue and self.database_up:
            await self.flush()
        try:
            groups = await self.database.run(usage_summary, group_by, since, until)
        except Exception as error:
            self._database_down(error)
            raise ApiError(
                503, "Service Unavailable", "the usage database is unreachable; retry"
            ) from None
        return summary_document(groups, group_by, since, until)

    # The service

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(FLUSH_EVERY, now=False).addErrback(
            lambda failure: log.failure("the usage flusher stopped", failure)
        )

    def _tick(self) -> None:
        self._report_queue(len(self.queue) + len(self._to_spool))
        if self.queue or self.spooled:
            self.flush()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._close())

    async def _close(self) -> None:
        deadline = self.clock.seconds() + self._stop_wait
        while self._idle is not None and not self._idle() and self.clock.seconds() < deadline:
            await task.deferLater(self.clock, 0.1, lambda: None)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        while self._flushing:
            await task.deferLater(self.clock, 0.05, lambda: None)
        self._last_attempt = -RETRY_EVERY  # one last try, even if the database was down
        await self.flush()
        while self._to_spool or self._spool_writing:
            await task.deferLater(self.clock, 0.05, lambda: None)
        if self.writer is not None:
            await self.writer.close()
        if self.dropped:
            log.error("{count} usage rows could not be stored", count=self.dropped)


def open_ledger(
    settings: Any,
    reactor: Any,
    database: Database | None = None,
    worker: str | None = None,
    idle: Callable[[], bool] | None = None,
    report_queue: Callable[[int], None] = lambda rows: None,
    report_refused: Callable[[int], None] = lambda rows: None,
    clock: IReactorTime | None = None,
) -> UsageLedger:
    """The daemon's ledger: its database (shared with client keys when given), the price
    table, a spool file per worker, inserts in a writer process (see mpcapi.ledger.rowwriter) and
    the rest in the reactor's thread pool."""
    from twisted.internet import threads

    def in_thread(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)

    spool = settings.usage_spool + (f".{worker}" if worker else "")
    return UsageLedger(
        database or Database(settings.database_url, reactor),
        clock or reactor,
        PriceTable.load(settings.prices),
        spool,
        in_thread,
        idle=idle,
        stop_wait=settings.drain_seconds + 1,
        writer=RowWriter(reactor, settings.database_url),
        report_queue=report_queue,
        report_refused=report_refused,
    )
