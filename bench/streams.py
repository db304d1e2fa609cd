"""Streaming benchmark: what MPC-API adds to an SSE stream, and 1,000 open streams on one worker.

Starts `bench/stream_standin.py` (a streaming stand-in LiteLLM whose chunks carry their send
time) and MPC-API (`twistd -n --pidfile= mpcapi`, one worker) in front of it, then, from this
process (Twisted Agent, one TCP connection per stream):

1. latency: rounds of `--concurrency` streams of `--events` events every `--interval-ms`,
   alternately straight to the stand-in and through MPC-API; for each event, receive time minus
   the chunk's `sent_at`, and each stream's time to first byte;
2. open streams: `--open-streams` streams through MPC-API at once (long enough to all be open
   together), counting the streams open at the client and the connections at the stand-in,
   sampling MPC-API's memory and file descriptors while they are all open.

Prints a table and writes `bench/results/<timestamp>-streams.json`. Its process handling is
bench/common.py's. Run: `.venv/bin/python bench/streams.py` (or `bench/run --streams`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import treq
from common import (
    STOP_SIGNALS,
    BenchError,
    Proc,
    RunFailed,
    Supervisor,
    cpu_seconds,
    exit_text,
    fd_count,
    fmt_mib,
    guarded,
    log_problems_only,
    mpcapi_log_summary,
    nofile_of,
    print_rows,
    proc_status,
    raise_nofile_limit,
    save,
    start_mpcapi,
    start_standin,
)
from twisted.copyright import version as twisted_version
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from mpcapi.upstream.http import BytesProducer

reactor: Any = _reactor

NOFILE_WANTED = 65536
RSS_TARGET_BYTES = 150 * 1000 * 1000  # 150 MB
ADDED_P99_TARGET_S = 0.001  # 1 ms per event
JSON_HEADERS = {b"content-type": [b"application/json"]}


# --------------------------------------------------------------------------- client side


@dataclass
class Stream:
    """What one client stream saw. Times are `time.time()` seconds."""

    target: str
    expected_events: int
    sent: float = 0.0
    status: int | None = None
    first_byte: float | None = None
    events: int = 0
    latencies: list[float] = field(default_factory=list)
    received: list[float] = field(default_factory=list)
    done: bool = False
    error: str | None = None
    counted_open: bool = False

    @property
    def ttfb(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.sent

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why


class OpenCounter:
    """Streams that received their first event and have not ended yet, and when all were."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.open = 0
        self.peak = 0
        self.closed = 0
        self.all_open_at: float | None = None
        self.first_close_after_all_open: float | None = None
        self.on_all_open: Callable[[], None] | None = None

    def opened(self, stream: Stream) -> None:
        stream.counted_open = True
        self.open += 1
        self.peak = max(self.peak, self.open)
        if self.open == self.total and self.all_open_at is None:
            self.all_open_at = time.time()
            if self.on_all_open is not None:
                self.on_all_open()

    def ended(self, stream: Stream) -> None:
        if not stream.counted_open:
            return
        stream.counted_open = False
        self.open -= 1
        self.closed += 1
        if self.all_open_at is not None and self.first_close_after_all_open is None:
            self.first_close_after_all_open = time.time()


class EventReader(Protocol):
    """Splits the SSE body into events and times each against its `sent_at`."""

    def __init__(self, stream: Stream, counter: OpenCounter | None) -> None:
        self.stream = stream
        self.counter = counter
        self.finished: Deferred[None] = Deferred()
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        now = time.time()
        if self.stream.first_byte is None:
            self.stream.first_byte = now
        *complete, self._buffer = (self._buffer + data).split(b"\n\n")
        for raw in complete:
            self._event(raw, now)

    def _event(self, raw: bytes, now: float) -> None:
        stream = self.stream
        if not raw.startswith(b"data: "):
            stream.fail(f"not an SSE data event: {raw[:80]!r}")
            return
        payload = raw[6:]
        if payload == b"[DONE]":
            stream.done = True
            if stream.events != stream.expected_events:
                stream.fail(f"{stream.events} events before [DONE], not {stream.expected_events}")
            if self.counter is not None:
                self.counter.ended(stream)
            return
        try:
            document = json.loads(payload)
            sent_at, seq = float(document["sent_at"]), int(document["seq"])
        except (ValueError, KeyError, TypeError):
            stream.fail(f"unexpected event: {payload[:200]!r}")
            return
        stream.latencies.append(now - sent_at)
        stream.received.append(now)
        if seq != stream.events:
            stream.fail(f"event {seq} arrived as number {stream.events}")
        stream.events += 1
        if stream.events == 1 and self.counter is not None:
            self.counter.opened(stream)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self._buffer.strip():
            self.stream.fail(f"unterminated event at the end: {self._buffer[:80]!r}")
        if not self.stream.done:
            self.stream.fail(f"ended without [DONE]: {describe(reason.value)}")
        elif not reason.check(ResponseDone):
            self.stream.fail(f"body ended badly: {describe(reason.value)}")
        if self.counter is not None:
            self.counter.ended(self.stream)
        self.finished.callback(None)

    def abort(self, why: str) -> None:
        self.stream.fail(why)
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()


def describe(error: BaseException | None) -> str:
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(f"{type(r.value).__name__}: {r.value}" for r in reasons)
    return f"{type(error).__name__}: {error}"


def chat_body(events: int, interval_ms: float) -> bytes:
    document = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hello!"}],
        "stream": True,
        "stand_in": {"events": events, "interval_ms": interval_ms},
    }
    return json.dumps(document).encode()


class Client:
    """Opens streams with a Twisted Agent, one new TCP connection per stream."""

    def __init__(self, connect_timeout: float = 10.0) -> None:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, connectTimeout=connect_timeout, pool=pool)
        self.control = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=True))

    async def stream(
        self,
        target: str,
        url: bytes,
        events: int,
        interval_ms: float,
        counter: OpenCounter | None = None,
        delay: float = 0.0,
    ) -> Stream:
        if delay > 0:
            await deferLater(reactor, delay, lambda: None)
        stream = Stream(target, events)
        timeout = 15.0 + events * interval_ms / 1000
        body = BytesProducer(chat_body(events, interval_ms))
        stream.sent = time.time()
        d = self.agent.request(b"POST", url, Headers(JSON_HEADERS), body)
        timer = reactor.callLater(timeout, d.cancel)
        try:
            response: IResponse = await d
        except Exception as err:
            stream.fail(f"no response: {describe(err)}")
            return stream
        finally:
            if timer.active():
                timer.cancel()
        stream.status = response.code
        if response.code != 200:
            answer = await treq.content(response)
            stream.fail(f"HTTP {response.code}: {answer[:200]!r}")
            return stream
        reader = EventReader(stream, counter)
        response.deliverBody(reader)
        timer = reactor.callLater(timeout, reader.abort, f"not over after {timeout:g} s")
        await reader.finished
        if timer.active():
            timer.cancel()
        return stream

    async def json(self, method: bytes, url: bytes) -> Any:
        response = await self.control.request(method, url)
        return json.loads(await treq.content(response))


async def gather(coroutines: list[Coroutine[Any, Any, Stream]]) -> list[Stream]:
    deferreds = [Deferred.fromCoroutine(c) for c in coroutines]
    results: list[Stream] = await gatherResults(deferreds, consumeErrors=True)
    return results


# --------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of `values` (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary_ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "p50_ms": percentile(ordered, 50) * 1000,
        "p90_ms": percentile(ordered, 90) * 1000,
        "p99_ms": percentile(ordered, 99) * 1000,
        "max_ms": ordered[-1] * 1000,
        "mean_ms": sum(ordered) / len(ordered) * 1000,
    }


def stream_errors(streams: list[Stream]) -> list[str]:
    return [f"{s.target}: {s.error}" for s in streams if s.error is not None]


def fmt_ms(value: float | None, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:+.3f}ms" if sign else f"{value:.3f}ms"


# --------------------------------------------------------------------------- the measurements


@dataclass
class Targets:
    direct: bytes
    mpcapi: bytes
    control: bytes
    mpcapi_pid: int
    mpcapi_port: int


async def smoke(client: Client, targets: Targets) -> None:
    """One short stream each way: a target that does not stream is not benchmarked."""
    for name, url in (("direct", targets.direct), ("mpcapi", targets.mpcapi)):
        stream = await client.stream(name, url, 3, 10.0)
        if stream.error is not None or not stream.done:
            raise BenchError(f"streaming smoke test failed on {url.decode()}: {stream.error}")


async def latency_phase(
    args: argparse.Namespace, client: Client, targets: Targets
) -> dict[str, Any]:
    urls = {"direct": targets.direct, "mpcapi": targets.mpcapi}
    streams: dict[str, list[Stream]] = {"direct": [], "mpcapi": []}
    round_p99: dict[str, list[float]] = {"direct": [], "mpcapi": []}
    stagger = args.interval_ms / 1000 / args.concurrency if args.stagger else 0.0

    async def one_round(target: str, events: int) -> list[Stream]:
        return await gather(
            [
                client.stream(target, urls[target], events, args.interval_ms, delay=i * stagger)
                for i in range(args.concurrency)
            ]
        )

    warmup: list[Stream] = []
    for target in urls:  # warm-up, not measured
        warmup.extend(await one_round(target, min(5, args.events)))
    for n in range(args.rounds):
        order = ("direct", "mpcapi") if n % 2 == 0 else ("mpcapi", "direct")
        for target in order:
            group = await one_round(target, args.events)
            streams[target].extend(group)
            round_p99[target].append(percentile([x for s in group for x in s.latencies], 99))
        print(f"   latency round {n + 1}/{args.rounds} done", flush=True)

    out: dict[str, Any] = {"warmup_errors": stream_errors(warmup)}
    for target, group in streams.items():
        latencies = [x for s in group for x in s.latencies]
        ttfbs = [t for s in group if (t := s.ttfb) is not None]
        out[target] = {
            "streams": len(group),
            "completed": sum(1 for s in group if s.done and s.error is None),
            "event_latency": summary_ms(latencies),
            "ttfb": summary_ms(ttfbs),
            "event_latency_p99_ms_per_round": [x * 1000 for x in round_p99[target]],
            "errors": stream_errors(group),
        }
    added: dict[str, float] = {}
    for key in ("event_latency", "ttfb"):
        for stat in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms"):
            a, b = out["mpcapi"][key].get(stat), out["direct"][key].get(stat)
            if a is not None and b is not None:
                added[f"{key}_{stat}"] = a - b
    out["added"] = added
    out["added_p99_per_event_ok"] = added.get("event_latency_p99_ms", math.inf) <= (
        ADDED_P99_TARGET_S * 1000
    )
    return out


def tcp_counters() -> dict[str, int]:
    """The kernel's listen-queue counters (this network namespace, every process)."""
    wanted = ("ListenOverflows", "ListenDrops", "SyncookiesSent", "TCPReqQFullDoCookies")
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {name: int(table[name]) for name in wanted if name in table}
    return {}


def listen_backlog(port: int) -> int | None:
    """The accept-queue limit of the socket listening on `port` (Send-Q in `ss -lnt`)."""
    try:
        out = subprocess.run(
            ["ss", "-Hlnt", f"sport = :{port}"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout
        return int(out.split()[2])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


async def open_phase(
    args: argparse.Namespace, client: Client, targets: Targets, target: str = "mpcapi"
) -> dict[str, Any]:
    """``args.open_streams`` streams open together, through MPC-API (``target`` "mpcapi") or
    straight to the stand-in ("direct": what the client and the stand-in cost at this scale
    by themselves, to subtract). MPC-API's memory and CPU are sampled either way."""
    n, pid = args.open_streams, targets.mpcapi_pid
    url = targets.mpcapi if target == "mpcapi" else targets.direct
    stats_url = targets.control + b"/stats"
    await client.json(b"POST", stats_url)  # peaks := now
    before = proc_status(pid)
    cpu_before = cpu_seconds(pid)
    kernel_before = tcp_counters()
    counter = OpenCounter(n)
    samples: list[dict[str, Any]] = []
    snapshots: list[Deferred[Any]] = []

    def on_all_open() -> None:
        snapshots.append(Deferred.fromCoroutine(client.json(b"GET", stats_url)))

    counter.on_all_open = on_all_open

    def sample() -> None:
        status = proc_status(pid)
        samples.append(
            {
                "t": time.time(),
                "open": counter.open,
                "rss_kib": status.get("VmRSS", 0),
                "hwm_kib": status.get("VmHWM", 0),
                "fds": fd_count(pid),
            }
        )

    sampler = LoopingCall(sample)
    sampler.start(args.sample_interval)
    batches = max(1, math.ceil(args.ramp / 0.05))
    per_batch = math.ceil(n / batches)
    started = time.time()
    streams = await gather(
        [
            client.stream(
                target,
                url,
                args.open_events,
                args.open_interval_ms,
                counter,
                delay=(i // per_batch) * args.ramp / batches,
            )
            for i in range(n)
        ]
    )
    sampler.stop()
    sample()
    after_stats = await client.json(b"GET", stats_url)
    during: dict[str, Any] | None = None
    if snapshots:
        during = await snapshots[0]

    cpu = cpu_seconds(pid) - cpu_before
    kernel_after = tcp_counters()
    all_open = [s for s in samples if s["open"] == n]
    latencies = [x for s in streams for x in s.latencies]
    rss_all_open = max((s["rss_kib"] for s in all_open), default=None)
    ttfbs = [t for s in streams if (t := s.ttfb) is not None]
    start, stop = counter.all_open_at, counter.first_close_after_all_open
    steady = [
        x
        for s in streams
        for x, at in zip(s.latencies, s.received, strict=True)
        if start is not None and stop is not None and start <= at < stop
    ]
    end = proc_status(pid)
    peak_rss_kib = max([end.get("VmHWM", 0)] + [s["hwm_kib"] for s in samples])
    window = None
    if counter.all_open_at is not None and counter.first_close_after_all_open is not None:
        window = counter.first_close_after_all_open - counter.all_open_at
    failed: list[str] = []
    if counter.peak < n:
        failed.append(f"only {counter.peak} of {n} streams were open at once at the client")
    for key, what in (("peak_connections", "connections"), ("peak_streams", "streams")):
        if int(after_stats.get(key, 0)) < n:
            failed.append(
                f"the stand-in saw at most {after_stats.get(key)} concurrent {what} from"
                f" {'MPC-API' if target == 'mpcapi' else 'the client'}, not {n}"
            )
    return {
        "target": target,
        "streams": n,
        "events": args.open_events,
        "interval_ms": args.open_interval_ms,
        "ramp_s": args.ramp,
        "wall_s": time.time() - started,
        "peak_open_at_client": counter.peak,
        "all_open": counter.peak == n,
        "all_open_window_s": window,
        "completed": sum(1 for s in streams if s.done and s.error is None),
        "errors": stream_errors(streams),
        "failed_checks": failed,
        "event_latency": summary_ms(latencies),
        "event_latency_all_open": summary_ms(steady),
        "ttfb": summary_ms(ttfbs),
        "ttfb_over_1s": sum(1 for t in ttfbs if t > 1.0),
        "mpcapi_listen_backlog": listen_backlog(targets.mpcapi_port),
        "kernel_listen_counters": {k: v - kernel_before.get(k, 0) for k, v in kernel_after.items()},
        "standin_while_all_open": during,
        "standin_after": after_stats,
        "upstream_peak_connections": after_stats.get("peak_connections"),
        "upstream_peak_streams": after_stats.get("peak_streams"),
        "mpcapi_rss_before_kib": before.get("VmRSS", 0),
        "mpcapi_rss_max_while_all_open_kib": rss_all_open,
        # What one open stream costs: the growth from before to all open, per stream.
        "mpcapi_kib_per_open_stream": (
            (rss_all_open - before.get("VmRSS", 0)) / n if rss_all_open is not None else None
        ),
        "events_relayed": len(latencies),
        "mpcapi_cpu_s": cpu,
        "mpcapi_cpu_ms_per_1000_events": cpu / max(len(latencies), 1) * 1e6,
        "mpcapi_rss_samples_while_all_open": len(all_open),
        "mpcapi_fds_max": max((s["fds"] for s in samples), default=None),
        "mpcapi_rss_after_kib": end.get("VmRSS", 0),
        "mpcapi_peak_rss_kib": peak_rss_kib,
        "peak_rss_ok": peak_rss_kib * 1024 < RSS_TARGET_BYTES,
        "samples": [
            {k: (round(v - started, 3) if k == "t" else v) for k, v in s.items()} for s in samples
        ],
    }


async def measure(args: argparse.Namespace, targets: Targets) -> dict[str, Any]:
    client = Client()
    await smoke(client, targets)
    result: dict[str, Any] = {}
    if args.rounds > 0:
        print(
            f"== latency: {args.rounds} rounds x {args.concurrency} streams x {args.events} events"
            f" every {args.interval_ms:g} ms, direct and through MPC-API in turn",
            flush=True,
        )
        result["latency"] = await latency_phase(args, client, targets)
    if args.open_streams > 0:
        if args.open_direct:
            print(
                f"== open streams: {args.open_streams} straight to the stand-in (the client's"
                f" and stand-in's own share), {args.open_events} events every"
                f" {args.open_interval_ms:g} ms, opened over {args.ramp:g} s",
                flush=True,
            )
            result["open_direct"] = await open_phase(args, client, targets, "direct")
            await deferLater(reactor, 2.0, lambda: None)  # let the sockets of the pass close
        print(
            f"== open streams: {args.open_streams} through MPC-API, {args.open_events} events"
            f" every {args.open_interval_ms:g} ms, opened over {args.ramp:g} s",
            flush=True,
        )
        result["open"] = await open_phase(args, client, targets)
        if "open_direct" in result:
            result["open_added"] = open_added(result["open_direct"], result["open"])
    return result


def open_added(direct: dict[str, Any], through: dict[str, Any]) -> dict[str, float]:
    """Per-event latency MPC-API added at scale: through MPC-API minus straight to the
    stand-in, the same streams, the whole phase and while all were open."""
    added: dict[str, float] = {}
    for phase in ("event_latency", "event_latency_all_open"):
        for q in ("p50_ms", "p99_ms"):
            a, b = through[phase].get(q), direct[phase].get(q)
            if a is not None and b is not None:
                added[f"{phase}_{q}"] = a - b
    return added


# --------------------------------------------------------------------------- processes


def standin_log_problems(proc: Proc) -> list[str]:
    """What the stand-in logged after its start-up line: only warnings and errors."""
    try:
        lines = proc.log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line[:300] for line in lines if line.strip() and not line.startswith("stream stand-in")]


def all_errors(data: dict[str, Any]) -> list[str]:
    """Every error of the run, one line each: streams, failed checks, the two processes' logs."""
    errors: list[str] = []
    latency = data.get("latency", {})
    errors += [f"warm-up: {e}" for e in latency.get("warmup_errors", [])]
    for target in ("direct", "mpcapi"):
        errors += [f"latency: {e}" for e in latency.get(target, {}).get("errors", [])]
    for key, what in (("open_direct", "open streams, direct"), ("open", "open streams")):
        opened = data.get(key, {})
        errors += [f"{what}: {e}" for e in opened.get("errors", [])]
        errors += [f"{what} check: {e}" for e in opened.get("failed_checks", [])]
    errors += [f"MPC-API log: {e}" for e in data["mpcapi_log"]["problems"]]
    errors += [f"stand-in log: {e}" for e in data["standin_log_problems"]]
    return errors


def run_reactor(work: Callable[[], Deferred[dict[str, Any]]], seconds: float) -> dict[str, Any]:
    """Run `work` on the reactor, at most `seconds`; its result, or BenchError."""
    outcome: list[Any] = []
    interrupted: list[int] = []

    def stop() -> None:
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()

    def finish(result: object) -> None:
        outcome.append(result)
        stop()

    def too_long() -> None:
        finish(BenchError(f"the measurements took more than {seconds:.0f} s (--max-seconds)"))

    def start() -> None:
        work().addBoth(finish)

    def on_signal(signum: int, frame: object) -> None:
        interrupted.append(signum)
        reactor.callFromThread(stop)

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    watchdog = reactor.callLater(seconds, too_long)
    reactor.callWhenRunning(start)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if watchdog.active():
        watchdog.cancel()
    if interrupted or not outcome:
        raise KeyboardInterrupt(f"signal {interrupted[0]}" if interrupted else "reactor stopped")
    result = outcome[0]
    if isinstance(result, Failure):
        if result.check(BenchError):
            result.raiseException()
        raise BenchError(f"measurement failed: {result.getTraceback()}")
    if isinstance(result, BenchError):
        raise result
    data: dict[str, Any] = result
    return data


# --------------------------------------------------------------------------- report


def print_report(data: dict[str, Any]) -> None:
    env = data["environment"]
    print()
    print(
        f"Client, stand-in and MPC-API share {env['cpus']} CPU cores on one machine "
        f"(affinity {env['affinity']}): absolute numbers include their contention; "
        "compare the two rows of one run."
    )
    latency = data.get("latency")
    if latency:
        cfg = data["config"]
        print(
            f"\nPer-event latency (client receive time - chunk sent_at) and TTFB (request sent ->"
            f" first body byte), {cfg['concurrency']} concurrent streams x {cfg['events']} events"
            f" every {cfg['interval_ms']:g} ms, {cfg['rounds']} rounds each, alternating:"
        )
        header = (
            "",
            "streams",
            "events",
            "p50",
            "p90",
            "p99",
            "max",
            "TTFB p50",
            "TTFB p99",
            "errors",
        )
        rows = [header]
        for key, label in (("direct", "direct to stand-in"), ("mpcapi", "through MPC-API")):
            r = latency[key]
            ev, tt = r["event_latency"], r["ttfb"]
            rows.append(
                (
                    label,
                    str(r["streams"]),
                    str(ev.get("count", 0)),
                    fmt_ms(ev.get("p50_ms")),
                    fmt_ms(ev.get("p90_ms")),
                    fmt_ms(ev.get("p99_ms")),
                    fmt_ms(ev.get("max_ms")),
                    fmt_ms(tt.get("p50_ms")),
                    fmt_ms(tt.get("p99_ms")),
                    str(len(r["errors"])),
                )
            )
        a = latency["added"]
        rows.append(
            (
                "added by MPC-API",
                "",
                "",
                fmt_ms(a.get("event_latency_p50_ms"), True),
                fmt_ms(a.get("event_latency_p90_ms"), True),
                fmt_ms(a.get("event_latency_p99_ms"), True),
                fmt_ms(a.get("event_latency_max_ms"), True),
                fmt_ms(a.get("ttfb_p50_ms"), True),
                fmt_ms(a.get("ttfb_p99_ms"), True),
                "",
            )
        )
        print_rows(rows)
        for key, label in (("direct", "direct"), ("mpcapi", "MPC-API")):
            per_round = " ".join(f"{x:.2f}" for x in latency[key]["event_latency_p99_ms_per_round"])
            print(f"per-event p99 of each round, {label} (ms): {per_round}")
        verdict = "met" if latency["added_p99_per_event_ok"] else "NOT met"
        print(
            f"added p99 per event: {fmt_ms(a.get('event_latency_p99_ms'), True)}"
            f" (target <= 1 ms: {verdict})"
        )
    opened = data.get("open")
    if opened:
        n = opened["streams"]
        print(
            f"\n{n:,} concurrent streams through ONE MPC-API worker ({opened['events']} events"
            f" every {opened['interval_ms']:g} ms each, opened over {opened['ramp_s']:g} s):"
        )
        window = opened["all_open_window_s"]
        window_text = f", all open together for {window:.1f} s" if window is not None else ""
        print(
            f"  open at once at the client (first event in, no [DONE] yet): peak "
            f"{opened['peak_open_at_client']:,} of {n:,}{window_text}"
        )
        print(
            f"  completed with [DONE]: {opened['completed']:,} of {n:,};"
            f" errors: {len(opened['errors'])}"
        )
        during = opened.get("standin_while_all_open") or {}
        print(
            f"  upstream at the stand-in: peak {opened['upstream_peak_connections']} concurrent"
            f" connections, {opened['upstream_peak_streams']} concurrent streams"
            f" (when all were open: {during.get('connections', '?')} connections,"
            f" {during.get('streams', '?')} streams); MPCAPI_POOL_SIZE={data['config']['pool']}"
        )
        fds = opened["mpcapi_fds_max"]
        print(
            f"  MPC-API resident memory: {fmt_mib(opened['mpcapi_rss_before_kib'])} before,"
            f" max {fmt_mib(opened['mpcapi_rss_max_while_all_open_kib'] or 0)} while all were open"
            f" ({opened['mpcapi_rss_samples_while_all_open']} samples),"
            f" {fmt_mib(opened['mpcapi_rss_after_kib'])} after; open fds max {fds}"
        )
        per_stream = opened["mpcapi_kib_per_open_stream"]
        per_stream_text = f"{per_stream:,.1f} KiB" if per_stream is not None else "?"
        print(
            f"  per open stream: {per_stream_text} of MPC-API's RSS (target <= 40 KiB);"
            f" CPU {opened['mpcapi_cpu_ms_per_1000_events']:,.1f} ms per 1,000 events"
            f" ({opened['events_relayed']:,} events, {opened['mpcapi_cpu_s']:.1f} s of CPU)"
        )
        for line in opened["failed_checks"]:
            print(f"  CHECK FAILED: {line}")
        verdict = "met" if opened["peak_rss_ok"] else "NOT met"
        print(
            f"  MPC-API peak RSS (VmHWM): {fmt_mib(opened['mpcapi_peak_rss_kib'])}"
            f" (target < 150 MB = {RSS_TARGET_BYTES / 2**20:.1f} MiB: {verdict})"
        )
        ev, st, tt = opened["event_latency"], opened["event_latency_all_open"], opened["ttfb"]
        print(
            f"  per-event latency through MPC-API, whole phase: p50 {fmt_ms(ev.get('p50_ms'))}"
            f" p99 {fmt_ms(ev.get('p99_ms'))} max {fmt_ms(ev.get('max_ms'))};"
            f" while all {n:,} were open: p50 {fmt_ms(st.get('p50_ms'))}"
            f" p99 {fmt_ms(st.get('p99_ms'))} max {fmt_ms(st.get('max_ms'))}"
        )
        direct, added = data.get("open_direct"), data.get("open_added")
        if direct is not None and added is not None:
            dev, dst = direct["event_latency"], direct["event_latency_all_open"]
            print(
                f"  the same {n:,} streams straight to the stand-in: whole phase p50"
                f" {fmt_ms(dev.get('p50_ms'))} p99 {fmt_ms(dev.get('p99_ms'))}; while all were"
                f" open: p50 {fmt_ms(dst.get('p50_ms'))} p99 {fmt_ms(dst.get('p99_ms'))}"
                f" ({direct['completed']:,} completed, peak {direct['peak_open_at_client']:,}"
                " open)"
            )
            added_p99 = added.get("event_latency_all_open_p99_ms")
            verdict = "met" if added_p99 is not None and added_p99 <= 5 else "NOT met"
            print(
                "  added by MPC-API per event: whole phase p50"
                f" {fmt_ms(added.get('event_latency_p50_ms'), True)} p99"
                f" {fmt_ms(added.get('event_latency_p99_ms'), True)}; while all were open: p50"
                f" {fmt_ms(added.get('event_latency_all_open_p50_ms'), True)} p99"
                f" {fmt_ms(added_p99, True)} (target <= 5 ms: {verdict})"
            )
        print(
            f"  TTFB while opening them: p50 {fmt_ms(tt.get('p50_ms'))}"
            f" p99 {fmt_ms(tt.get('p99_ms'))} max {fmt_ms(tt.get('max_ms'))};"
            f" {opened['ttfb_over_1s']} streams over 1 s (a dropped SYN is retried after 1 s)"
        )
        kernel = opened["kernel_listen_counters"]
        print(
            f"  MPC-API listen backlog {opened['mpcapi_listen_backlog']}; kernel listen-queue"
            f" counters during the phase (whole machine): {kernel}"
        )
    log = data["mpcapi_log"]
    print(
        f"\nMPC-API log: {log['lines']} lines, request outcomes {log['outcomes']},"
        f" statuses {log['statuses']}, warnings/errors {log['problem_count']}"
    )
    for line in log["problems"][:5]:
        print(f"  {line}")
    print(f"errors in total: {data['error_count']}")
    for line, count in Counter(data["errors"]).most_common(10):
        print(f"  {count} x {line}")


def environment() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted_version,
        "reactor": type(reactor).__name__,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/streams.py",
        description="Streaming benchmark of MPC-API: added latency per event and TTFB, and "
        "1,000 concurrent streams on one worker (see bench/README.md).",
    )
    p.add_argument("--quick", action="store_true", help="2 latency rounds, 8-event open streams")
    p.add_argument("--concurrency", type=int, default=20, help="latency: streams at once (20)")
    p.add_argument("--events", type=int, default=20, help="latency: events per stream (20)")
    p.add_argument("--interval-ms", type=float, default=100.0, help="latency: ms between (100)")
    p.add_argument("--rounds", type=int, default=8, help="latency: rounds per target (8; 0 skips)")
    p.add_argument(
        "--no-stagger",
        dest="stagger",
        action="store_false",
        help="latency: start a round's streams together (default: spread over one interval)",
    )
    p.add_argument("--open-streams", type=int, default=1000, help="open phase: streams (0 skips)")
    p.add_argument("--open-events", type=int, default=30, help="open phase: events each (30)")
    p.add_argument("--open-interval-ms", type=float, default=1000.0, help="open phase (1000)")
    p.add_argument("--ramp", type=float, default=2.0, help="open phase: seconds to open all (2)")
    p.add_argument(
        "--no-open-direct",
        dest="open_direct",
        action="store_false",
        help="open phase: skip the pass straight to the stand-in (what MPC-API added is then"
        " not measured)",
    )
    p.add_argument("--sample-interval", type=float, default=0.25, help="memory sampling (0.25 s)")
    p.add_argument("--max-seconds", type=float, default=240.0, help="give up after (240)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the process logs")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 2)
        args.open_events = min(args.open_events, 8)
    if args.concurrency < 1 or args.events < 1 or args.open_events < 1:
        p.error("--concurrency, --events and --open-events must be at least 1")
    args.started = datetime.now(UTC).isoformat(timespec="seconds")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    begun = time.monotonic()
    soft, _ = raise_nofile_limit(NOFILE_WANTED)
    needed = 2 * args.open_streams + 256  # MPC-API: one client and one upstream socket each
    if soft < needed:
        print(f"bench: RLIMIT_NOFILE is {soft}, {needed} needed; lower --open-streams")
        return 2
    log_problems_only(sys.stderr)

    def run(sup: Supervisor) -> int:
        standin, control = start_standin(
            sup, f"--events={args.events}", f"--interval-ms={args.interval_ms}"
        )
        mpcapi = start_mpcapi(sup, standin.port, None)
        pool = os.environ.get("MPCAPI_POOL_SIZE", "256 (default)")
        targets = Targets(
            direct=f"http://127.0.0.1:{standin.port}/chat/completions".encode(),
            mpcapi=f"http://127.0.0.1:{mpcapi.port}/api/chat/completions".encode(),
            control=f"http://127.0.0.1:{control}".encode(),
            mpcapi_pid=mpcapi.popen.pid,
            mpcapi_port=mpcapi.port,
        )
        limits = {
            "client": soft,
            "standin": nofile_of(standin.popen.pid),
            "mpcapi": nofile_of(mpcapi.popen.pid),
        }
        print(
            f"== stand-in on :{standin.port}, MPC-API on :{mpcapi.port} (pid"
            f" {mpcapi.popen.pid}); RLIMIT_NOFILE {limits}",
            flush=True,
        )
        budget = args.max_seconds - (time.monotonic() - begun)
        results = run_reactor(lambda: Deferred.fromCoroutine(measure(args, targets)), budget)
        for proc in (standin, mpcapi):
            if proc.popen.poll() is not None:
                raise BenchError(f"{proc.name} died during the run: {exit_text(proc)}", proc)
        data: dict[str, Any] = {
            "kind": "streams",
            "started": args.started,
            "seconds": round(time.monotonic() - begun, 1),
            "environment": environment(),
            "config": {
                "concurrency": args.concurrency,
                "events": args.events,
                "interval_ms": args.interval_ms,
                "rounds": args.rounds,
                "stagger": args.stagger,
                "open_streams": args.open_streams,
                "open_events": args.open_events,
                "open_interval_ms": args.open_interval_ms,
                "ramp_s": args.ramp,
                "pool": pool,
                "nofile": limits,
                "mpcapi_command": "twistd -n --pidfile= mpcapi",
            },
            **results,
            "peak_rss_kib": {"standin": standin.peak_kib(), "mpcapi": mpcapi.peak_kib()},
            "mpcapi_log": mpcapi_log_summary(mpcapi),
            "standin_log_problems": standin_log_problems(standin),
        }
        errors = all_errors(data)
        # (the MPC-API log keeps its first 20 problems; problem_count has them all)
        hidden = data["mpcapi_log"]["problem_count"] - len(data["mpcapi_log"]["problems"])
        data["error_count"] = len(errors) + hidden
        data["errors"] = errors[:200]
        print_report(data)
        print(f"\nresults: {save('streams', data)} ({data['seconds']} s)")
        if data["error_count"]:
            raise RunFailed()  # through `supervised`, which then keeps the process logs
        return 0

    return guarded(run, args.keep_tmp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
