"""Soak test (`bench/run --soak`): MPC-API under a steady, mixed load for a long time (10 minutes
by default), its memory and open file descriptors sampled all along.

Starts bench/stream_standin.py as the LiteLLM (plain answers, SSE streams, and LiteLLM's 400
for a model it does not serve) and MPC-API in front of it (JSON logs, the usage ledger in a
SQLite file of the run's temp dir, /metrics public), then runs one wrk of `--duration` seconds
at `--connections` (64) with bench/soak.lua: per 10 requests 6 chats, 2 streams, 1 invalid
JSON body (MPC-API's 400), 1 unknown model (LiteLLM's 400, passed through). Every
`--sample-interval` seconds it reads MPC-API's VmRSS (/proc/<pid>/status) and open file
descriptors (/proc/<pid>/fd), summed over its processes, and the requests it has answered
(/metrics). Prints the samples, the drift between the first and the last minute (the first and
last third of a run shorter than 3 minutes) and the answers by kind and status, and writes
`bench/results/<timestamp>-soak.json`. Exit status 1 when an answer was not what its request
asks for, wrk counted socket errors, MPC-API logged a warning or an error, or a process died.

    .venv/bin/python bench/soak.py --duration 60      (bench/run --soak --duration 60)
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import threading
import time
import urllib.error
from datetime import UTC, datetime
from typing import Any

from common import (
    BENCH,
    BenchError,
    Proc,
    RunFailed,
    Supervisor,
    exit_text,
    fd_count,
    fmt_mib,
    guarded,
    http_status,
    mpcapi_log_summary,
    print_rows,
    proc_status,
    process_tree,
    raise_nofile_limit,
    run_wrk,
    save,
    start_mpcapi,
    start_standin,
)

SOAK_LUA = BENCH / "soak.lua"
NOFILE_WANTED = 65536
# What each kind of request of soak.lua must get: "<kind>:<status>" as soak.lua counts them.
EXPECTED = {
    "chat": "chat:200",
    "stream": "stream:200",
    "invalid JSON": "mpcapi_error:400",
    "unknown model": "litellm_error:400",
}
SMOKE = {  # one request of each kind before the run, checked the same way
    "chat": b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}]}',
    "stream": b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}],'
    b'"stream":true,"stand_in":{"events":3,"interval_ms":10}}',
    "invalid JSON": b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":',
    "unknown model": b'{"model":"no-such-model","messages":[{"role":"user","content":"x"}]}',
}
RSS_DRIFT_TARGET = 0.10  # a steady daemon's RSS grows less than this between the two windows
_REQUESTS_LINE = re.compile(r"^mpcapi_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_STATUS_LABEL = re.compile(r'status="(\d+)"')


def kind_of(body: bytes) -> str:
    """The class soak.lua gives an answer (the same rules, for the smoke requests)."""
    if body.startswith(b"data: "):
        ok = b"data: [DONE]" in body and b'"error"' not in body
        return "stream" if ok else "stream_broken"
    if b'"chat.completion"' in body:
        return "chat"
    if re.search(rb'"error"\s*:\s*"', body):
        return "mpcapi_error"
    if re.search(rb'"error"\s*:\s*\{', body):
        return "litellm_error"
    return "other"


def answered(metrics_url: str) -> dict[str, int]:
    """Chat completions MPC-API has answered, by status (from its /metrics; empty if it does
    not answer)."""
    try:
        status, body = http_status(metrics_url, timeout=5.0)
    except (OSError, urllib.error.URLError):
        return {}
    if status != 200:
        return {}
    by_status: dict[str, int] = {}
    for line in body.decode("utf-8", "replace").splitlines():
        match = _REQUESTS_LINE.match(line)
        if match and 'route="/chat/completions"' in match["labels"]:
            code = _STATUS_LABEL.search(match["labels"])
            key = code.group(1) if code else "?"
            by_status[key] = by_status.get(key, 0) + int(float(match["value"]))
    return by_status


class Sampler:
    """Samples MPC-API's processes every `interval` seconds in a thread, from `start()`."""

    def __init__(self, proc: Proc, interval: float) -> None:
        self.proc = proc
        self.interval = interval
        self.metrics_url = f"http://127.0.0.1:{proc.port}/metrics"
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._started = 0.0

    def start(self) -> None:
        """The first sample (t = 0, before the load), then one every `interval` seconds."""
        self._started = time.monotonic()
        self.sample(at=0.0)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.sample()
        self.samples[-1]["after_load"] = True

    def sample(self, at: float | None = None) -> None:
        t = time.monotonic() - self._started if at is None else at
        processes = {}
        for pid in process_tree(self.proc.popen.pid):
            status = proc_status(pid)
            processes[str(pid)] = {"rss_kib": status.get("VmRSS", 0), "fds": fd_count(pid)}
        statuses = answered(self.metrics_url)
        self.samples.append(
            {
                "t": round(t, 1),
                "rss_kib": sum(p["rss_kib"] for p in processes.values()),
                "fds": sum(max(p["fds"], 0) for p in processes.values()),
                "answered": sum(statuses.values()),
                "statuses": statuses,
                "processes": processes,
            }
        )

    def _run(self) -> None:
        due = self.interval  # on a fixed schedule: a slow sample does not shift the next ones
        while not self._stop.wait(max(0.0, self._started + due - time.monotonic())):
            self.sample()
            due += self.interval


def drift(samples: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """Mean RSS and fds of the first and the last window of the load (a minute, or a third of
    a shorter run), and the difference. The sample at t = 0 (before the load) and the one
    after it are in neither."""
    window = min(60.0, duration / 3)
    loaded = [s for s in samples if s["t"] > 0 and not s.get("after_load")]
    first = [s for s in loaded if s["t"] <= window]
    last = [s for s in loaded if s["t"] >= duration - window]
    if not first or not last:
        return {"window_s": window, "samples_first": len(first), "samples_last": len(last)}

    def mean(group: list[dict[str, Any]], key: str) -> float:
        return sum(s[key] for s in group) / len(group)

    rss_first, rss_last = mean(first, "rss_kib"), mean(last, "rss_kib")
    return {
        "window_s": window,
        "samples_first": len(first),
        "samples_last": len(last),
        "rss_first_kib": rss_first,
        "rss_last_kib": rss_last,
        "rss_kib": rss_last - rss_first,
        "rss_percent": (rss_last - rss_first) / rss_first * 100 if rss_first else 0.0,
        "fds_first": mean(first, "fds"),
        "fds_last": mean(last, "fds"),
        "fds": mean(last, "fds") - mean(first, "fds"),
    }


def sample_rows(samples: list[dict[str, Any]], most: int = 40) -> list[tuple[str, ...]]:
    """The table of samples: at most `most` rows, evenly spread, the last one always in."""
    step = max(1, -(-len(samples) // most))
    chosen = samples[::step]
    if chosen[-1] is not samples[-1]:
        chosen.append(samples[-1])
    rows: list[tuple[str, ...]] = [("t (s)", "RSS", "fds", "answered", "req/s", "4xx", "5xx")]
    previous: dict[str, Any] | None = None
    for s in chosen:
        rate = "-"
        if previous is not None and s["t"] > previous["t"]:
            rate = f"{(s['answered'] - previous['answered']) / (s['t'] - previous['t']):,.0f}"
        statuses = s["statuses"]
        rows.append(
            (
                f"{s['t']:.0f}" + (" (after)" if s.get("after_load") else ""),
                fmt_mib(s["rss_kib"]),
                str(s["fds"]),
                f"{s['answered']:,}",
                rate,
                f"{sum(n for c, n in statuses.items() if c.startswith('4')):,}",
                f"{sum(n for c, n in statuses.items() if c.startswith('5')):,}",
            )
        )
        previous = s
    return rows


def smoke(proc: Proc) -> None:
    """One request of each kind: the run starts only if each gets what it asks for."""
    url = f"http://127.0.0.1:{proc.port}/api/chat/completions"
    for name, body in SMOKE.items():
        status, answer = http_status(url, body, timeout=10.0)
        got = f"{kind_of(answer)}:{status}"
        if got != EXPECTED[name]:
            raise BenchError(f"soak smoke test, {name}: {got}, not {EXPECTED[name]}", proc)


def soak(args: argparse.Namespace, sup: Supervisor) -> int:
    standin, _ = start_standin(sup, "--models=gpt-4o-mini")
    env = {
        "MPCAPI_METRICS_PUBLIC": "true",
        "MPCAPI_DATABASE_URL": f"sqlite:///{sup.tmp / 'usage.db'}",
        "MPCAPI_USAGE_SPOOL": str(sup.tmp / "usage.spool.jsonl"),
        **args.env,
    }
    mpcapi = start_mpcapi(sup, standin.port, args.workers, env)
    smoke(mpcapi)
    url = f"http://127.0.0.1:{mpcapi.port}/api/chat/completions"
    print(
        f"== soak: {args.duration:g} s at {args.connections} connections, {url}"
        f" (MPC-API pid {mpcapi.popen.pid}); samples every {args.sample_interval:g} s",
        flush=True,
    )
    sampler = Sampler(mpcapi, args.sample_interval)
    sampler.start()
    try:
        result = run_wrk(url, args.connections, args.duration, SOAK_LUA, timeout=30.0)
    finally:
        sampler.stop()
    for proc in (standin, mpcapi):
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} died during the soak: {exit_text(proc)}", proc)

    samples = sampler.samples
    moved = drift(samples, args.duration)
    answers: dict[str, int] = result.get("answers", {})
    expected = set(EXPECTED.values())
    unexpected = {key: n for key, n in answers.items() if key not in expected}
    socket_errors = {k: v for k, v in result["errors"].items() if k != "status" and v}
    log = mpcapi_log_summary(mpcapi)

    print()
    print_rows(sample_rows(samples))
    print(
        "\nRSS and fds: MPC-API's processes summed; answered, req/s, 4xx, 5xx: its chat"
        " completions (/metrics), cumulative but req/s."
    )
    if "rss_kib" in moved:
        sign = "+" if moved["rss_kib"] >= 0 else "-"
        print(
            f"drift, mean of the last {moved['window_s']:g} s - mean of the first"
            f" {moved['window_s']:g} s: RSS {sign}{fmt_mib(abs(moved['rss_kib']))}"
            f" ({moved['rss_percent']:+.1f}%: {fmt_mib(moved['rss_first_kib'])} ->"
            f" {fmt_mib(moved['rss_last_kib'])}), open fds {moved['fds']:+.1f}"
            f" ({moved['fds_first']:.1f} -> {moved['fds_last']:.1f})"
        )
        verdict = "met" if moved["rss_percent"] < RSS_DRIFT_TARGET * 100 else "NOT met"
        print(f"RSS drift target < {RSS_DRIFT_TARGET:.0%}: {verdict}")
    print(
        f"\nwrk: {result['requests']:,} answers, {result['rps']:,.0f} req/s,"
        f" p50 {result['p50_us'] / 1000:.2f}ms p99 {result['p99_us'] / 1000:.2f}ms"
        f" max {result['max_us'] / 1000:.0f}ms; socket errors {socket_errors or 'none'}"
    )
    for name, key in EXPECTED.items():
        print(f"  {name:<14} {key:<18} {answers.get(key, 0):>10,}")
    for key, n in sorted(unexpected.items()):
        print(f"  UNEXPECTED     {key:<18} {n:>10,}")
    print(
        f"MPC-API log: {log['lines']:,} lines, statuses {log['statuses']},"
        f" warnings/errors {log['problem_count']}"
    )
    for line in log["problems"][:5]:
        print(f"  {line}")

    errors = sum(unexpected.values()) + sum(socket_errors.values()) + log["problem_count"]
    data = {
        "kind": "soak",
        "started": args.started,
        "duration_s": args.duration,
        "connections": args.connections,
        "sample_interval_s": args.sample_interval,
        "environment": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "workers": args.workers,
            "daemon_env": env,
        },
        "wrk": result,
        "answers": answers,
        "unexpected": unexpected,
        "socket_errors": socket_errors,
        "drift": moved,
        "samples": samples,
        "peak_rss_kib": mpcapi.peak_kib(),
        "mpcapi_log": log,
        "error_count": errors,
    }
    print(f"\nerrors: {errors}\nresults: {save('soak', data)}")
    if errors:
        raise RunFailed()  # through `supervised`, which then keeps the process logs
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run --soak",
        description="Soak test: MPC-API under mixed load (chats, streams, errors) for a long"
        " time, RSS and open fds sampled (see bench/README.md).",
    )
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (600)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    p.add_argument("--sample-interval", type=float, default=5.0, help="seconds (5)")
    p.add_argument("--workers", type=int, help="passed to MPC-API as MPCAPI_WORKERS")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the MPC-API daemon (repeatable)",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the process logs")
    args = p.parse_args(argv)
    pairs = [item.split("=", 1) for item in args.env]
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        p.error("--env takes KEY=VALUE")
    if args.duration < 3 or args.connections < 1 or args.sample_interval <= 0:
        p.error("--duration must be at least 3, --connections and --sample-interval above 0")
    args.env = dict(pairs)
    args.started = datetime.now(UTC).isoformat(timespec="seconds")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    raise_nofile_limit(NOFILE_WANTED)
    return guarded(lambda sup: soak(args, sup), args.keep_tmp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
