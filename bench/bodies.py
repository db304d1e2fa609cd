"""Large bodies: MPC-API's memory while it relays a 50 MB upload and a 50 MB speech answer.

Starts `bench/stream_standin.py` (whose `POST /audio/transcriptions` counts the bytes it
receives and whose `POST /audio/speech` writes as many bytes as `"input"` says, in chunks) and
MPC-API (`twistd -n --pidfile= mpcapi`, one worker, `MPCAPI_MAX_BODY_BYTES=200000000`, the
usage ledger on as shipped) in front of it. Then, from this process (Twisted Agent), for each
size of `--sizes`:

1. upload: `POST /v1/audio/transcriptions`, multipart with a `model` field and a `file` part of
   that size, made on the fly by a generator-based body producer (never one large bytes);
2. speech: `POST /v1/audio/speech` whose answer has that size, read by a protocol that counts
   the bytes and drops them;
3. speech, slow reader: the same, read at `--slow-read` MB/s (the client's transport paused
   and resumed), so that MPC-API must hold back the stand-in instead of buffering the answer.

During each transfer it samples the RSS of MPC-API's process tree (and the stand-in's) every
`--sample-interval` (20 ms) and reports the RSS before, the peak during, the growth (peak -
before) in MiB and as a fraction of the body, the duration and throughput, and whether every
byte arrived. Prints a table and writes `bench/results/<timestamp>-bodies.json`.
Run: `.venv/bin/python bench/bodies.py` (or `bench/run --bodies`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from itertools import pairwise
from typing import Any

import treq
from common import (
    BenchError,
    Proc,
    RunFailed,
    Supervisor,
    exit_text,
    fmt_mib,
    guarded,
    log_problems_only,
    mpcapi_log_summary,
    print_rows,
    proc_status,
    process_tree,
    save,
    start_mpcapi,
    start_standin,
)
from streams import environment, run_reactor, standin_log_problems
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import CooperativeTask, LoopingCall, TaskStopped, cooperate, deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

reactor: Any = _reactor

MB = 1000 * 1000
MAX_BODY_BYTES = 200_000_000
CHUNK = 64 * 1024
# One chunk of the file part, reused for every write: the upload is never in memory.
_FILE_BLOCK = bytes((i * 7 + 3) % 256 for i in range(CHUNK))
BOUNDARY = b"mpcapi-bench-bodies-7f3a9c"
REQUEST_TIMEOUT = 180.0


# --------------------------------------------------------------------------- client side


@implementer(IBodyProducer)
class MultipartUpload:
    """A `multipart/form-data` body with a `model` field and a `size`-byte `file` part,
    written chunk by chunk from a generator (a cooperative task, as FileBodyProducer does:
    paused while the connection's buffer is full)."""

    def __init__(self, size: int, model: str = "whisper-1") -> None:
        self.size = size
        self.head = (
            b"--" + BOUNDARY + b"\r\n"
            b'Content-Disposition: form-data; name="model"\r\n\r\n' + model.encode() + b"\r\n"
            b"--" + BOUNDARY + b"\r\n"
            b'Content-Disposition: form-data; name="file"; filename="bench.mp3"\r\n'
            b"Content-Type: audio/mpeg\r\n\r\n"
        )
        self.tail = b"\r\n--" + BOUNDARY + b"--\r\n"
        self.length = len(self.head) + size + len(self.tail)
        self.sent = 0
        self._task: CooperativeTask | None = None

    content_type = b"multipart/form-data; boundary=" + BOUNDARY

    def _chunks(self) -> Iterator[bytes]:
        yield self.head
        left = self.size
        while left > 0:
            n = min(CHUNK, left)
            left -= n
            yield _FILE_BLOCK if n == CHUNK else _FILE_BLOCK[:n]
        yield self.tail

    def _write_all(self, consumer: IConsumer) -> Iterator[None]:
        for chunk in self._chunks():
            consumer.write(chunk)
            self.sent += len(chunk)
            yield None  # back to the cooperator (and the reactor) after every chunk

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._task = cooperate(self._write_all(consumer))
        done: Deferred[Any] = self._task.whenDone()

        def stopped(reason: Failure) -> Deferred[None]:
            reason.trap(TaskStopped)
            return Deferred()  # stopProducing: the Agent expects no result any more

        done.addCallbacks(lambda _: None, stopped)
        return done

    def pauseProducing(self) -> None:
        if self._task is not None:
            self._task.pause()

    def resumeProducing(self) -> None:
        if self._task is not None:
            self._task.resume()

    def stopProducing(self) -> None:
        if self._task is not None:
            self._task.stop()


class CountingReader(Protocol):
    """Counts a body's bytes and drops them. With `rate` (bytes/s) it reads no faster: the
    transport is paused whenever the count runs ahead of the rate, like a slow client."""

    def __init__(self, rate: float = 0.0) -> None:
        self.received = 0
        self.rate = rate
        self.reason: Failure | None = None
        self.finished: Deferred[None] = Deferred()
        self._started = 0.0
        self._resume: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._started = time.monotonic()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.rate > 0 and self._resume is None:
            ahead = self.received / self.rate - (time.monotonic() - self._started)
            if ahead > 0.005:
                IPushProducer(self.transport).pauseProducing()
                self._resume = reactor.callLater(ahead, self._go_on)

    def _go_on(self) -> None:
        self._resume = None
        if self.transport is not None and not self.finished.called:
            IPushProducer(self.transport).resumeProducing()

    def abort(self) -> None:
        """Too slow: drop the connection (the body then ends short, not with ResponseDone)."""
        if self.transport is not None and not self.finished.called:
            IPushProducer(self.transport).stopProducing()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None
        self.reason = reason
        self.finished.callback(None)


# --------------------------------------------------------------------------- memory sampling


def tree_rss(root: int) -> dict[int, int]:
    """VmRSS (KiB) of each process of `root`'s tree."""
    return {pid: proc_status(pid).get("VmRSS", 0) for pid in process_tree(root)}


def tree_hwm(root: int) -> dict[int, int]:
    return {pid: proc_status(pid).get("VmHWM", 0) for pid in process_tree(root)}


@dataclass
class Sampler:
    """RSS of MPC-API's process tree and of the stand-in, every `interval` seconds."""

    mpcapi_pid: int
    standin_pid: int
    interval: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    _loop: LoopingCall | None = None

    def _sample(self) -> None:
        per_pid = tree_rss(self.mpcapi_pid)
        self.samples.append(
            {
                "t": time.monotonic(),
                "mpcapi_kib": sum(per_pid.values()),
                "mpcapi_by_pid": per_pid,
                "standin_kib": proc_status(self.standin_pid).get("VmRSS", 0),
            }
        )

    def start(self) -> None:
        self.samples = []
        self._loop = LoopingCall(self._sample)
        self._loop.start(self.interval, now=True)

    def stop(self) -> list[dict[str, Any]]:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._sample()  # one after the end, so that a short transfer has two at least
        return self.samples


# --------------------------------------------------------------------------- the transfers


@dataclass
class Targets:
    upload: bytes
    speech: bytes
    mpcapi: Proc
    standin_pid: int


class Client:
    def __init__(self) -> None:
        # A new connection per transfer: nothing left over from the one before.
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    async def _request(
        self, method: bytes, url: bytes, headers: dict[bytes, list[bytes]], body: IBodyProducer
    ) -> IResponse:
        d = self.agent.request(method, url, Headers(headers), body)
        timer = reactor.callLater(REQUEST_TIMEOUT, d.cancel)
        try:
            response: IResponse = await d
        finally:
            if timer.active():
                timer.cancel()
        return response

    async def upload(self, url: bytes, size: int) -> dict[str, Any]:
        """One transcription upload with a `size`-byte file; what the stand-in received."""
        body = MultipartUpload(size)
        headers = {b"content-type": [MultipartUpload.content_type]}
        response = await self._request(b"POST", url, headers, body)
        answer = await treq.content(response)
        out: dict[str, Any] = {
            "status": response.code,
            "body_bytes": body.length,
            "client_sent_bytes": body.sent,
        }
        try:
            text = json.loads(answer)["text"]
            out["standin_received_bytes"] = int(text.split()[1])  # "received N bytes"
        except (ValueError, KeyError, TypeError, IndexError):
            out["error"] = f"HTTP {response.code}: {answer[:300]!r}"
            return out
        out["complete"] = response.code == 200 and out["standin_received_bytes"] == body.length
        if not out["complete"]:
            out["error"] = f"the stand-in received {out['standin_received_bytes']} bytes"
        return out

    async def speech(self, url: bytes, size: int, rate: float = 0.0) -> dict[str, Any]:
        """One speech answer of `size` bytes, counted and dropped (at `rate` bytes/s)."""
        document = {"model": "tts-1", "input": str(size), "voice": "alloy"}
        body = FileBodyProducer(BytesIO(json.dumps(document).encode()))
        headers = {b"content-type": [b"application/json"]}
        response = await self._request(b"POST", url, headers, body)
        out: dict[str, Any] = {"status": response.code}
        if response.code != 200:
            answer = await treq.content(response)
            out["error"] = f"HTTP {response.code}: {answer[:300]!r}"
            return out
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
        out["content_type"] = content_type.decode("latin-1")
        reader = CountingReader(rate)
        response.deliverBody(reader)
        timer = reactor.callLater(REQUEST_TIMEOUT, reader.abort)
        await reader.finished
        if timer.active():
            timer.cancel()
        out["client_received_bytes"] = reader.received
        ended_well = reader.reason is not None and reader.reason.check(ResponseDone) is not None
        out["complete"] = ended_well and reader.received == size
        if not out["complete"]:
            why = reader.reason.value if reader.reason is not None else None
            out["error"] = f"{reader.received} of {size} bytes, ended by {why!r}"
        return out


async def measured(
    args: argparse.Namespace,
    targets: Targets,
    kind: str,
    size: int,
    run: Callable[[], Coroutine[Any, Any, dict[str, Any]]],
) -> dict[str, Any]:
    """One transfer (`run()`, a coroutine) with MPC-API's RSS sampled during it and for
    `--settle` seconds after it (the finish callbacks, the ledger's row, run after the
    answer's last byte)."""
    await deferLater(reactor, args.settle, lambda: None)  # let the last transfer's frees land
    before = tree_rss(targets.mpcapi.popen.pid)
    roles_before = targets.mpcapi.rss_by_role()
    hwm_before = tree_hwm(targets.mpcapi.popen.pid)
    standin_before = proc_status(targets.standin_pid).get("VmRSS", 0)
    sampler = Sampler(targets.mpcapi.popen.pid, targets.standin_pid, args.sample_interval)
    sampler.start()
    started = time.monotonic()
    result: dict[str, Any] = await Deferred.fromCoroutine(run())
    ended = time.monotonic()
    await deferLater(reactor, args.settle, lambda: None)
    samples = sampler.stop()
    hwm_after = tree_hwm(targets.mpcapi.popen.pid)
    roles_after = targets.mpcapi.rss_by_role()

    seconds = ended - started
    rss_before = sum(before.values())
    during = [s for s in samples if s["t"] <= ended] or samples[:1]
    peak = max(s["mpcapi_kib"] for s in samples)
    # A peak between two samples still shows in a process's VmHWM: when it rose during the
    # transfer, that process's peak is its new VmHWM (an upper bound for the tree's).
    peak_by_pid: dict[int, int] = {}
    for s in samples:
        for pid, kib in s["mpcapi_by_pid"].items():
            peak_by_pid[pid] = max(peak_by_pid.get(pid, 0), kib)
    for pid, hwm in hwm_after.items():
        if hwm > hwm_before.get(pid, 0):
            peak_by_pid[pid] = max(peak_by_pid.get(pid, 0), hwm)
    peak_hwm = sum(peak_by_pid.values())
    gaps = [b["t"] - a["t"] for a, b in pairwise(samples)]
    growth = peak - rss_before
    return {
        "kind": kind,
        "size_bytes": size,
        **result,
        "seconds": seconds,
        "mb_per_s": size / MB / seconds if seconds > 0 else None,
        "mpcapi_rss_before_kib": rss_before,
        "mpcapi_rss_peak_during_kib": max(s["mpcapi_kib"] for s in during),
        "mpcapi_rss_peak_kib": peak,  # during the transfer and the --settle seconds after
        "mpcapi_rss_peak_hwm_kib": peak_hwm,
        "mpcapi_rss_after_kib": samples[-1]["mpcapi_kib"],
        "mpcapi_growth_kib": growth,
        "mpcapi_growth_hwm_kib": peak_hwm - rss_before,
        "mpcapi_growth_per_body": growth * 1024 / size,
        "mpcapi_rss_by_role_before_kib": roles_before,
        "mpcapi_rss_by_role_after_kib": roles_after,
        "standin_rss_before_kib": standin_before,
        "standin_rss_peak_kib": max(s["standin_kib"] for s in samples),
        "samples": len(samples),
        "samples_during": len(during),
        "sample_gap_max_ms": max(gaps) * 1000 if gaps else None,
        "mpcapi_rss_samples_kib": [
            [round(s["t"] - started, 3), s["mpcapi_kib"], s["standin_kib"]] for s in samples
        ],
    }


async def measure(args: argparse.Namespace, targets: Targets) -> dict[str, Any]:
    client = Client()
    # Smoke, not measured: each route answers, whole, before anything is measured (and the
    # first request's one-off allocations are not counted as growth).
    for name, check in (
        ("upload", client.upload(targets.upload, 1000)),
        ("speech", client.speech(targets.speech, 1000)),
    ):
        result = await check
        if not result.get("complete"):
            raise BenchError(f"{name} smoke test failed: {result.get('error')}")
    # The ledger starts its row writer (a ~16 MiB process of the daemon's tree) with its
    # first rows, a moment after them: wait for it, so that it does not count as growth.
    deadline = time.monotonic() + 10.0
    while "row writer" not in targets.mpcapi.rss_by_role() and time.monotonic() < deadline:
        await deferLater(reactor, 0.1, lambda: None)
    transfers: list[dict[str, Any]] = []
    for size in args.sizes:

        def upload(size: int = size) -> Coroutine[Any, Any, dict[str, Any]]:
            return client.upload(targets.upload, size)

        def speech(size: int = size) -> Coroutine[Any, Any, dict[str, Any]]:
            return client.speech(targets.speech, size)

        def slow(size: int = size) -> Coroutine[Any, Any, dict[str, Any]]:
            return client.speech(targets.speech, size, args.slow_read * MB)

        kinds: list[tuple[str, Callable[[], Coroutine[Any, Any, dict[str, Any]]]]] = [
            ("upload", upload),
            ("speech", speech),
        ]
        if args.slow_read > 0:
            kinds.append((f"speech, reader {args.slow_read:g} MB/s", slow))
        for kind, run in kinds:
            row = await measured(args, targets, kind, size, run)
            transfers.append(row)
            print(
                f"   {kind} {size / MB:g} MB: {row['seconds']:.2f} s,"
                f" growth {fmt_mib(row['mpcapi_growth_kib'])},"
                f" complete {row.get('complete', False)}",
                flush=True,
            )
    return {"transfers": transfers}


# --------------------------------------------------------------------------- report


def print_report(data: dict[str, Any]) -> None:
    env = data["environment"]
    print(
        f"\nMPC-API (one worker, ledger on) relaying large bodies; client, stand-in and MPC-API"
        f" share {env['cpus']} CPU cores. RSS: MPC-API's process tree (VmRSS summed), sampled"
        f" every {data['config']['sample_interval_s'] * 1000:g} ms; growth = peak - before."
    )
    header = (
        "transfer",
        "size",
        "time",
        "MB/s",
        "RSS before",
        "peak",
        "growth",
        "growth/body",
        "peak (HWM)",
        "after",
        "complete",
        "stand-in peak",
    )
    rows = [header]
    for t in data["transfers"]:
        if t["kind"] == "upload":
            count = t.get("standin_received_bytes", "?")
            complete = f"{'yes' if t.get('complete') else 'NO'} ({count} B at stand-in)"
        else:
            count = t.get("client_received_bytes", "?")
            complete = f"{'yes' if t.get('complete') else 'NO'} ({count} B at client)"
        rows.append(
            (
                t["kind"],
                f"{t['size_bytes'] / MB:g} MB",
                f"{t['seconds']:.2f} s",
                f"{t['mb_per_s']:.1f}",
                fmt_mib(t["mpcapi_rss_before_kib"]),
                fmt_mib(t["mpcapi_rss_peak_kib"]),
                f"{t['mpcapi_growth_kib'] / 1024:.2f} MiB",  # finer than fmt_mib: it is small
                f"{t['mpcapi_growth_per_body'] * 100:.2f} %",
                fmt_mib(t["mpcapi_rss_peak_hwm_kib"]),
                fmt_mib(t["mpcapi_rss_after_kib"]),
                complete,
                fmt_mib(t["standin_rss_peak_kib"]),
            )
        )
    print_rows(rows)
    gaps = [t["sample_gap_max_ms"] for t in data["transfers"] if t["sample_gap_max_ms"]]
    if gaps:
        print(f"longest gap between two samples: {max(gaps):.0f} ms")
    print(
        "peak (HWM): each process's peak from its VmHWM when that rose during the transfer"
        " (catches a peak between two samples; summed, an upper bound)"
    )
    peaks = data["peak_rss_kib"]
    print(
        f"peak RSS over the whole run (VmHWM): MPC-API {fmt_mib(peaks['mpcapi'])},"
        f" stand-in {fmt_mib(peaks['standin'])}"
    )
    log = data["mpcapi_log"]
    print(
        f"MPC-API log: {log['lines']} lines, statuses {log['statuses']},"
        f" outcomes {log['outcomes']}, warnings/errors {log['problem_count']}"
    )
    for line in log["problems"][:5]:
        print(f"  {line}")
    print(f"errors: {len(data['errors'])}")
    for line in data["errors"][:10]:
        print(f"  {line}")


# --------------------------------------------------------------------------- main


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [round(float(x) * MB) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes in MB: {text!r}") from None
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_BODY_BYTES - 1000:
        raise argparse.ArgumentTypeError(f"sizes must be > 0 and < {MAX_BODY_BYTES // MB} MB")
    return sizes


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/bodies.py",
        description="MPC-API's memory while relaying large uploads and speech answers "
        "(see bench/README.md).",
    )
    p.add_argument(
        "--sizes", type=parse_sizes, default=[MB, 50 * MB], help="sizes in MB, comma-separated"
    )
    p.add_argument(
        "--slow-read",
        type=float,
        default=10.0,
        help="also read each speech answer at this many MB/s (10; 0: not)",
    )
    p.add_argument("--sample-interval", type=float, default=0.02, help="RSS sampling (0.02 s)")
    p.add_argument("--settle", type=float, default=0.5, help="pause around transfers (0.5 s)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="give up after (300)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra MPC-API environment (repeatable)",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the process logs")
    args = p.parse_args(argv)
    for item in args.env:
        if "=" not in item:
            p.error(f"--env wants KEY=VALUE, not {item!r}")
    args.started = datetime.now(UTC).isoformat(timespec="seconds")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    begun = time.monotonic()
    log_problems_only(sys.stderr)

    def run(sup: Supervisor) -> int:
        standin, _control = start_standin(sup)
        extra = {"MPCAPI_MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
        extra.update(item.split("=", 1) for item in args.env)
        mpcapi = start_mpcapi(sup, standin.port, None, extra)
        base = f"http://127.0.0.1:{mpcapi.port}/v1/audio"
        targets = Targets(
            upload=f"{base}/transcriptions".encode(),
            speech=f"{base}/speech".encode(),
            mpcapi=mpcapi,
            standin_pid=standin.popen.pid,
        )
        print(
            f"== stand-in on :{standin.port}, MPC-API on :{mpcapi.port} (pid"
            f" {mpcapi.popen.pid}); sizes {', '.join(f'{s / MB:g} MB' for s in args.sizes)}",
            flush=True,
        )
        budget = args.max_seconds - (time.monotonic() - begun)
        results = run_reactor(lambda: Deferred.fromCoroutine(measure(args, targets)), budget)
        procs: tuple[Proc, ...] = (standin, mpcapi)
        for proc in procs:
            if proc.popen.poll() is not None:
                raise BenchError(f"{proc.name} died during the run: {exit_text(proc)}", proc)
        data: dict[str, Any] = {
            "kind": "bodies",
            "started": args.started,
            "seconds": round(time.monotonic() - begun, 1),
            "environment": environment(),
            "config": {
                "sizes_bytes": args.sizes,
                "slow_read_mb_per_s": args.slow_read,
                "sample_interval_s": args.sample_interval,
                "settle_s": args.settle,
                "env": extra,
                "workers": 1,
                "mpcapi_command": "twistd -n --pidfile= mpcapi",
            },
            **results,
            "peak_rss_kib": {"standin": standin.peak_kib(), "mpcapi": mpcapi.peak_kib()},
            "mpcapi_log": mpcapi_log_summary(mpcapi),
            "standin_log_problems": standin_log_problems(standin),
        }
        errors = [
            f"{t['kind']} {t['size_bytes'] / MB:g} MB: {t['error']}"
            for t in results["transfers"]
            if "error" in t
        ]
        errors += [f"MPC-API log: {e}" for e in data["mpcapi_log"]["problems"]]
        errors += [f"stand-in log: {e}" for e in data["standin_log_problems"]]
        data["errors"] = errors
        print_report(data)
        print(f"\nresults: {save('bodies', data)} ({data['seconds']} s)")
        if errors:
            raise RunFailed()  # through `supervised`, which then keeps the process logs
        return 0

    return guarded(run, args.keep_tmp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
