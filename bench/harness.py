"""The engine behind `bench/run`: starts the stand-in LiteLLM (nginx), the reference Twisted proxy
and MPC-API, drives each with wrk and reports throughput, latency and peak memory.

Standard library only; bench/run installs nginx, wrk and the project venv before calling this.
The process handling it shares with bench/streams.py and bench/soak.py is in bench/common.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import (
    BENCH,
    CHAT_LUA,
    VENV_BIN,
    BenchError,
    Proc,
    Supervisor,
    cpu_seconds,
    error_count,
    exit_text,
    fmt_mib,
    free_port,
    guarded,
    http_status,
    run_wrk,
    save,
    smoke_test,
    start_mpcapi,
    wait_ready,
)

CHAT_UNIQUE_LUA = BENCH / "chat_unique.lua"  # a new question every request: cache misses
NGINX = "/usr/sbin/nginx"
TARGETS = ("floor", "reference", "framework", "portkey", "mpcapi")
TARGET_PATHS = {
    "floor": "/chat/completions",
    "reference": "/api/chat/completions",
    "framework": "/api/chat/completions",
    "portkey": "/v1/chat/completions",
    "mpcapi": "/api/chat/completions",
}
PORTKEY_VERSION = "1.15.2"  # bench/peers/package.json
LABELS = {
    "floor": "floor (nginx)",
    "reference": "reference proxy",
    "framework": "Klein + treq proxy",
    "portkey": f"Portkey {PORTKEY_VERSION}",
    "mpcapi": "MPC-API",
}
PEERS = BENCH / "peers"
PORTKEY_SERVER = PEERS / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
# The two minimal proxies: plain Twisted, and Klein + treq (the frameworks MPC-API is built on).
PROXY_SCRIPTS = {"reference": "reference_proxy.py", "framework": "framework_proxy.py"}


# --------------------------------------------------------------------------- the three targets


def start_floor(sup: Supervisor) -> Proc:
    prefix = sup.tmp / "nginx"
    for sub in ("", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = (BENCH / "nginx.conf").read_text()
    conf = conf.replace("@PREFIX@", str(prefix)).replace("@PORT@", str(port))
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    proc = sup.start("nginx", [NGINX, "-p", str(prefix), "-c", str(conf_path)], port)
    wait_ready(proc, f"http://127.0.0.1:{port}/models")
    smoke_test(proc, f"http://127.0.0.1:{port}/chat/completions")
    return proc


def start_proxy(
    sup: Supervisor,
    upstream: int,
    wrapper: Sequence[str] = (),
    ready_timeout: float = 30.0,
    target: str = "reference",
) -> Proc:
    """One of the minimal proxies (``PROXY_SCRIPTS``) in front of the upstream on ``upstream``."""
    port = free_port()
    argv = [
        *wrapper,
        str(VENV_BIN / "python"),
        str(BENCH / PROXY_SCRIPTS[target]),
        f"--port={port}",
        f"--upstream=http://127.0.0.1:{upstream}",
    ]
    proc = sup.start(target, argv, port)
    wait_ready(proc, f"http://127.0.0.1:{port}/api/models", ready_timeout)
    smoke_test(proc, f"http://127.0.0.1:{port}/api/chat/completions")
    return proc


def start_portkey(sup: Supervisor, upstream: int) -> Proc | None:
    """The Portkey AI gateway (Node), the fastest open-source peer we know, in front of the
    same upstream: installed into bench/peers with npm on first use. None, with a note, when
    Node.js or npm is missing or the install fails: the other targets still run."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        print("note: no node/npm here: the Portkey target is left out", flush=True)
        return None
    if not PORTKEY_SERVER.is_file():
        print(f"installing the Portkey gateway {PORTKEY_VERSION} into bench/peers ...", flush=True)
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=PEERS,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0 or not PORTKEY_SERVER.is_file():
            print(f"note: npm install failed, Portkey left out: {done.stderr[-500:]}", flush=True)
            return None
    port = free_port()
    argv = [node, str(PORTKEY_SERVER), f"--port={port}", "--headless"]
    env = {**os.environ, "NODE_ENV": "production"}
    proc = sup.start("portkey", argv, port, env)
    proc.wrk_env = {"BENCH_PORTKEY_HOST": f"http://127.0.0.1:{upstream}"}
    wait_ready(proc, f"http://127.0.0.1:{port}/")
    headers = {
        "x-portkey-provider": "openai",
        "x-portkey-custom-host": proc.wrk_env["BENCH_PORTKEY_HOST"],
        "Authorization": "Bearer sk-bench",
    }
    smoke_test(proc, f"http://127.0.0.1:{port}{TARGET_PATHS['portkey']}", headers)
    return proc


# --------------------------------------------------------------------------- wrk


# --------------------------------------------------------------------------- reports


def fmt_us(us: float) -> str:
    return f"{us / 1000:.2f}ms" if abs(us) >= 1000 else f"{us:.0f}us"


def print_table(rows: list[dict[str, Any]], ratios: dict[str, dict[str, float]]) -> None:
    header = ("target", "conns", "req/s", "p50", "p99", "+p50", "+p99", "peak RSS", "errors")
    lines = [header]
    for r in rows:
        lines.append(
            (
                LABELS[r["target"]],
                str(r["connections"]),
                f"{r['rps']:,.0f}",
                fmt_us(r["p50_us"]),
                fmt_us(r["p99_us"]),
                "-" if r["target"] == "floor" else fmt_us(r["added_p50_us"]),
                "-" if r["target"] == "floor" else fmt_us(r["added_p99_us"]),
                fmt_mib(r["peak_rss_kib"]),
                str(r["error_count"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        pairs = enumerate(zip(line, widths, strict=True))
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        print("  ".join(cells))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print("\n+p50/+p99: latency added over the floor at the same connection count.")
    print("peak RSS: the process's high-water mark (children included) over the whole run.")
    if ratios:
        print()
        for name, by_conns in ratios.items():
            joined = ", ".join(f"{c} conns: {v:.2f}" for c, v in by_conns.items())
            print(f"{name}: {joined}")


def environment(args: argparse.Namespace) -> dict[str, Any]:
    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "?"
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "?"

    python = str(VENV_BIN / "python")
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": version([python, "--version"]),
        "twisted": version([python, "-c", "import twisted; print(twisted.__version__)"]),
        "nginx": version([NGINX, "-v"]),
        "wrk": version(["wrk", "--version"]),
        "workers": args.workers,
    }


# --------------------------------------------------------------------------- modes


def throughput(args: argparse.Namespace, sup: Supervisor) -> int:
    floor = start_floor(sup)
    procs = {"floor": floor}
    for proxy in PROXY_SCRIPTS:
        if proxy in args.targets:
            procs[proxy] = start_proxy(sup, floor.port, target=proxy)
    if "portkey" in args.targets and (portkey := start_portkey(sup, floor.port)) is not None:
        procs["portkey"] = portkey
    if "mpcapi" in args.targets:
        procs["mpcapi"] = start_mpcapi(sup, floor.port, args.workers, args.env)

    rows: list[dict[str, Any]] = []
    for target in [t for t in TARGETS if t in procs]:
        proc = procs[target]
        url = f"http://127.0.0.1:{proc.port}{TARGET_PATHS[target]}"
        print(f"== {LABELS[target]}: {url}", flush=True)
        run_wrk(url, 32, args.warmup, api_key=proc.api_key, env=proc.wrk_env)  # warm-up
        for conns in args.connections:
            cpu_before = cpu_seconds(proc.popen.pid)
            result = run_wrk(url, conns, args.duration, api_key=proc.api_key, env=proc.wrk_env)
            cpu = cpu_seconds(proc.popen.pid) - cpu_before
            result.update(target=target, connections=conns, url=url)
            result["cpu_us_per_request"] = cpu / max(result["requests"], 1) * 1e6
            result["error_count"] = error_count(result)
            rows.append(result)
            print(
                f"   {conns:>4} conns: {result['rps']:>10,.0f} req/s"
                f"  p50 {fmt_us(result['p50_us'])}  p99 {fmt_us(result['p99_us'])}"
                f"  cpu {result['cpu_us_per_request']:,.0f} us/req"
                f"  errors {result['error_count']}",
                flush=True,
            )
            if proc.popen.poll() is not None:
                raise BenchError(f"{proc.name} died during the run: {exit_text(proc)}", proc)

    floor_by_conns = {r["connections"]: r for r in rows if r["target"] == "floor"}
    peaks = {target: proc.peak_kib() for target, proc in procs.items()}
    for r in rows:
        base = floor_by_conns[r["connections"]]
        r["added_p50_us"] = r["p50_us"] - base["p50_us"]
        r["added_p99_us"] = r["p99_us"] - base["p99_us"]
        r["peak_rss_kib"] = peaks[r["target"]]

    by = {(r["target"], r["connections"]): r for r in rows}
    ratios: dict[str, dict[str, float]] = {}
    pairs = [
        ("mpcapi", "reference"),
        ("mpcapi", "portkey"),
        ("mpcapi", "framework"),
        ("framework", "reference"),
        ("mpcapi", "floor"),
        ("reference", "floor"),
    ]
    for a, b in pairs:
        values = {
            str(c): by[(a, c)]["rps"] / by[(b, c)]["rps"]
            for c in args.connections
            if (a, c) in by and (b, c) in by and by[(b, c)]["rps"]
        }
        if values:
            ratios[f"req/s ratio {LABELS[a]} / {LABELS[b]}"] = values

    print()
    print_table(rows, ratios)
    data = {
        "kind": "throughput",
        "started": args.started,
        "duration_s": args.duration,
        "connections": args.connections,
        "environment": environment(args),
        "results": rows,
        "peak_rss_kib": peaks,
        "ratios": ratios,
    }
    print(f"\nresults: {save('throughput', data)}")
    failed = [r for r in rows if r["target"] != "floor" and r["error_count"]]
    for r in failed:
        print(f"warning: {LABELS[r['target']]} had {r['error_count']} errors at {r['connections']}")
    return 0


def memory(args: argparse.Namespace, sup: Supervisor) -> int:
    floor = start_floor(sup)
    proc = start_mpcapi(sup, floor.port, args.workers, args.env)
    url = f"http://127.0.0.1:{proc.port}/api/chat/completions"
    total = args.requests
    checkpoints = [total // 2, total]
    samples: list[dict[str, Any]] = [
        {"requests": 0, "rss_kib": proc.rss_kib(), "rss_kib_by_role": proc.rss_by_role()}
    ]
    print(f"== MPC-API memory: {total:,} requests at {args.memory_connections} connections, {url}")
    print(f"   idle: {fmt_mib(samples[0]['rss_kib'])}", flush=True)

    def by_role(sample: dict[str, Any]) -> str:
        roles = sample["rss_kib_by_role"]
        return ", ".join(f"{role} {fmt_mib(kib)}" for role, kib in sorted(roles.items()))

    sent, errors, rate = 0, 0, 0.0
    deadline = time.monotonic() + args.max_seconds
    while checkpoints:
        if time.monotonic() > deadline:
            raise BenchError(f"memory run passed {args.max_seconds}s at {sent:,} requests", proc)
        remaining = checkpoints[0] - sent
        seconds = args.slice if rate <= 0 else min(args.slice, max(1.0, remaining / rate))
        result = run_wrk(url, args.memory_connections, seconds, api_key=proc.api_key)
        sent += int(result["requests"])
        errors += error_count(result)
        rate = float(result["rps"])
        if proc.popen.poll() is not None:
            raise BenchError(f"mpcapi died during the memory run: {exit_text(proc)}", proc)
        if sent >= checkpoints[0]:
            checkpoints.pop(0)
            sample = {
                "requests": sent,
                "rss_kib": proc.rss_kib(),
                "rss_kib_by_role": proc.rss_by_role(),
                "errors": errors,
            }
            samples.append(sample)
            print(
                f"   after {sent:,} requests: {fmt_mib(sample['rss_kib'])} ({by_role(sample)})",
                flush=True,
            )
    half, full = samples[1]["rss_kib"], samples[2]["rss_kib"]
    growth = (full - half) / half * 100 if half else 0.0
    print()
    print(f"RSS at {samples[1]['requests']:,} requests: {fmt_mib(half)} ({by_role(samples[1])})")
    print(f"RSS at {samples[2]['requests']:,} requests: {fmt_mib(full)} ({by_role(samples[2])})")
    print(f"growth between them: {growth:+.1f}%")
    for role, kib in sorted(samples[2]["rss_kib_by_role"].items()):
        before = samples[1]["rss_kib_by_role"].get(role, 0)
        if before:
            print(f"  {role}: {(kib - before) / before * 100:+.1f}%")
    print(f"idle before load: {fmt_mib(samples[0]['rss_kib'])}")
    print(f"peak RSS: {fmt_mib(proc.peak_kib())}; errors: {errors}")
    data = {
        "kind": "memory",
        "started": args.started,
        "connections": args.memory_connections,
        "environment": environment(args),
        "samples": samples,
        "growth_percent": growth,
        "peak_rss_kib": proc.peak_kib(),
        "errors": errors,
    }
    print(f"\nresults: {save('memory', data)}")
    return 0


def policy_env(kind: str, redis_url: str) -> dict[str, str]:
    """Client keys, rate limits too high to refuse anything, and the response cache, in
    memory or Redis."""
    env = {
        "MPCAPI_AUTH": "keys",
        "MPCAPI_DEFAULT_RPM": "1000000000",
        "MPCAPI_DEFAULT_TPM": "1000000000",
        "MPCAPI_CACHE_TTL": "600",
    }
    if kind == "redis":
        env["MPCAPI_REDIS_URL"] = redis_url
        env["MPCAPI_REDIS_PREFIX"] = f"mpcapi-bench:{os.getpid()}-{time.time_ns()}:"
    return env


def clean_redis(redis_url: str, prefix: str) -> None:
    """Delete the keys a run left in Redis (best effort; they expire anyway)."""
    cli = shutil.which("redis-cli")
    if cli is None:
        return
    base = [cli, "-u", redis_url]
    found = subprocess.run(
        [*base, "--scan", "--pattern", prefix + "*"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    keys = found.stdout.split()
    for start in range(0, len(keys), 1000):
        subprocess.run(
            [*base, "del", *keys[start : start + 1000]],
            capture_output=True,
            timeout=60,
            check=False,
        )


# (label, daemon, wrk script): "off" is MPC-API without limits or cache; "memory"/"redis" have
# both on. With chat_unique.lua every request is a miss (limits checked, answer forwarded and
# stored); with chat.lua every request after the first is a cache hit.
POLICY_RUNS = (
    ("off: forwarded", "off", CHAT_UNIQUE_LUA),
    ("memory: forwarded (miss)", "memory", CHAT_UNIQUE_LUA),
    ("redis: forwarded (miss)", "redis", CHAT_UNIQUE_LUA),
    ("memory: cache hit", "memory", CHAT_LUA),
    ("redis: cache hit", "redis", CHAT_LUA),
)


def policy(args: argparse.Namespace, sup: Supervisor) -> int:
    """Rate limits and the response cache on (in memory, in Redis) against off, on the chat
    route; and a cache hit against a forwarded request."""
    envs = {"off": dict(args.env)}
    for kind in ("memory", "redis"):
        envs[kind] = {**args.env, **policy_env(kind, args.redis_url)}
    try:
        return compare(
            args,
            sup,
            "policy",
            envs,
            POLICY_RUNS,
            [
                ("memory: forwarded (miss)", "off: forwarded", "limits+cache in memory / off"),
                ("redis: forwarded (miss)", "off: forwarded", "limits+cache in Redis / off"),
                ("memory: cache hit", "memory: forwarded (miss)", "memory: hit / forwarded"),
                ("redis: cache hit", "redis: forwarded (miss)", "redis: hit / forwarded"),
                ("memory: cache hit", "off: forwarded", "memory hit / off forwarded"),
            ],
            target="limits+cache >= 0.85 of off; a cache hit costs less than a forwarded request",
        )
    finally:
        clean_redis(args.redis_url, envs["redis"]["MPCAPI_REDIS_PREFIX"])


# In an environment value of compare(): the floor's URL (nginx also takes OTLP posts).
FLOOR_URL = "@FLOOR_URL@"


def otel(args: argparse.Namespace, sup: Supervisor) -> int:
    """OpenTelemetry on (spans and metrics exported to nginx, which takes OTLP/HTTP posts)
    against off, on the chat route."""
    envs = {
        "off": dict(args.env),
        "otel": {
            **args.env,
            "MPCAPI_OTEL_ENDPOINT": FLOOR_URL,
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        },
    }
    return compare(
        args,
        sup,
        "otel",
        envs,
        [("off", "off", CHAT_LUA), ("tracing on", "otel", CHAT_LUA)],
        [("tracing on", "off", "tracing on / off")],
        target="tracing on keeps most of the speed of off (report the ratio)",
    )


def ledger(args: argparse.Namespace, sup: Supervisor) -> int:
    """The usage ledger on (SQLite, PostgreSQL) against off, on the chat route; the rows
    waiting for the database (``mpcapi_usage_queue_rows``) are sampled during every run."""
    scraped = {**args.env, "MPCAPI_METRICS_PUBLIC": "true"}  # for the queue sampler
    envs = {
        "off": {**scraped, "MPCAPI_USAGE_LEDGER": "false"},
        "sqlite": {**scraped, "MPCAPI_USAGE_LEDGER": "true"},
    }
    schema = f"mpcapi_bench_{os.getpid()}"
    postgres = postgres_schema(args.postgres_url, schema)
    if postgres is not None:
        envs["postgresql"] = {**scraped, "MPCAPI_DATABASE_URL": postgres}
    else:
        print(f"bench: no PostgreSQL at {args.postgres_url} (or no psql): SQLite only")
    runs = [(f"{kind}", kind, CHAT_UNIQUE_LUA) for kind in envs]
    comparisons = [(kind, "off", f"ledger in {kind} / off") for kind in envs if kind != "off"]
    try:
        return compare(
            args,
            sup,
            "ledger",
            envs,
            runs,
            comparisons,
            target="ledger on >= 0.85 of off, and a bounded queue",
            sample_queue=True,
        )
    finally:
        if postgres is not None:
            psql(args.postgres_url, f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def psql(url: str, sql: str) -> bool:
    cli = shutil.which("psql")
    if cli is None:
        return False
    done = subprocess.run(
        [cli, url, "-v", "ON_ERROR_STOP=1", "-qc", sql],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.returncode == 0


def postgres_schema(url: str, schema: str) -> str | None:
    """A fresh schema for this run's ledger, and the database URL that uses it (or None)."""
    if not psql(url, f"CREATE SCHEMA {schema}"):
        return None
    joiner = "&" if "?" in url else "?"
    return f"{url}{joiner}options=-csearch_path%3D{schema}"


class QueueSampler:
    """Reads a daemon's ``mpcapi_usage_queue_rows`` every half second, in a thread."""

    def __init__(self, port: int) -> None:
        self._url = f"http://127.0.0.1:{port}/metrics"
        self._stop = threading.Event()
        self.samples: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                _, body = http_status(self._url)
            except OSError:
                continue
            for line in body.decode("utf-8", "replace").splitlines():
                if line.startswith("mpcapi_usage_queue_rows"):
                    self.samples.append(float(line.split()[-1]))

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return max(self.samples) if self.samples else None


def compare(
    args: argparse.Namespace,
    sup: Supervisor,
    kind: str,
    envs: dict[str, dict[str, str]],
    runs: Sequence[tuple[str, str, Path]],
    comparisons: Sequence[tuple[str, str, str]],
    target: str,
    sample_queue: bool = False,
) -> int:
    """Daemons that differ only in ``envs``, measured in turns (``runs``: label, daemon, wrk
    script) for ``--rounds`` rounds so that noise from the shared CPU shows as spread; then
    the ratios of the best rounds (``comparisons``: label a, label b, name of a / b). Each
    run also records the daemon's CPU time per request, which other load disturbs less."""
    floor = start_floor(sup)
    floor_url = f"http://127.0.0.1:{floor.port}"
    procs = {
        name: start_mpcapi(
            sup,
            floor.port,
            args.workers,
            {key: value.replace(FLOOR_URL, floor_url) for key, value in env.items()},
            name=f"mpcapi-{name}",
        )
        for name, env in envs.items()
    }
    rows: list[dict[str, Any]] = []
    for proc in procs.values():
        url = f"http://127.0.0.1:{proc.port}/api/chat/completions"
        run_wrk(url, 32, args.warmup, CHAT_UNIQUE_LUA, api_key=proc.api_key)  # warm-up
    for round_ in range(args.rounds):
        for label, name, script in runs:
            proc = procs[name]
            url = f"http://127.0.0.1:{proc.port}/api/chat/completions"
            for conns in args.connections:
                sampler = QueueSampler(proc.port) if sample_queue else None
                cpu_before = cpu_seconds(proc.popen.pid)
                result = run_wrk(url, conns, args.duration, script, api_key=proc.api_key)
                cpu = cpu_seconds(proc.popen.pid) - cpu_before
                result.update(label=label, daemon=name, connections=conns, round=round_ + 1)
                result["cpu_us_per_request"] = cpu / max(result["requests"], 1) * 1e6
                result["error_count"] = error_count(result)
                queue = ""
                if sampler is not None:
                    result["max_queue_rows"] = sampler.stop()
                    queue = f"  queue max {result['max_queue_rows']}"
                rows.append(result)
                print(
                    f"   round {round_ + 1} {label:<26} {conns:>4} conns:"
                    f" {result['rps']:>9,.0f} req/s  p50 {fmt_us(result['p50_us'])}"
                    f"  p99 {fmt_us(result['p99_us'])}"
                    f"  cpu {result['cpu_us_per_request']:,.0f} us/req"
                    f"  errors {result['error_count']}{queue}",
                    flush=True,
                )
                if proc.popen.poll() is not None:
                    raise BenchError(f"{proc.name} died: {exit_text(proc)}", proc)

    def best(label: str, conns: int, key: str = "rps") -> float:
        values = [r[key] for r in rows if r["label"] == label and r["connections"] == conns]
        return max(values) if key == "rps" else min(values)

    print("\nbest of each (req/s, p50, CPU per request):")
    for label, _, _ in runs:
        cells = [
            f"{c} conns {best(label, c):>8,.0f} req/s {fmt_us(best(label, c, 'p50_us')):>8}"
            f" {best(label, c, 'cpu_us_per_request'):>6,.0f} us"
            for c in args.connections
        ]
        print(f"  {label:<26} " + " | ".join(cells))
    ratios: dict[str, dict[str, float]] = {}
    print(f"\nratios of the best rounds (target: {target}):")
    for a, b, name in comparisons:
        ratios[name] = {str(c): best(a, c) / best(b, c) for c in args.connections if best(b, c)}
        cpu_name = f"{name}, CPU per request (inverse)"
        ratios[cpu_name] = {
            str(c): best(b, c, "cpu_us_per_request") / best(a, c, "cpu_us_per_request")
            for c in args.connections
            if best(a, c, "cpu_us_per_request")
        }
        for shown in (name, cpu_name):
            joined = ", ".join(f"{c} conns: {v:.2f}" for c, v in ratios[shown].items())
            print(f"  {shown}: {joined}")
    data = {
        "kind": kind,
        "started": args.started,
        "duration_s": args.duration,
        "connections": args.connections,
        "rounds": args.rounds,
        "environment": environment(args),
        "daemon_env": envs,
        "results": rows,
        "ratios": ratios,
    }
    print(f"\nresults: {save(kind, data)}")
    for r in rows:
        if r["error_count"]:
            print(f"warning: {r['label']} had {r['error_count']} errors at {r['connections']}")
    return 0


def instructions(args: argparse.Namespace, sup: Supervisor) -> int:
    """Machine instructions per request, counted by valgrind's callgrind: the reference proxy,
    MPC-API with the ledger off, on, and (ledger off) with limits and cache in memory and in
    Redis, each driven by wrk after a warm-up, counters zeroed between the two. A count, not
    a time: the same for the same work however busy the machine is, so it shows what each
    layer costs where req/s only shows noise. (Under callgrind everything runs ~50 times
    slower, so more requests arrive per reactor turn than at full speed: compare the targets
    with each other, not with req/s.)"""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise BenchError("--instructions needs valgrind (apt-get install valgrind)")
    floor = start_floor(sup)
    off = {**args.env, "MPCAPI_USAGE_LEDGER": "false"}
    redis = {**off, **policy_env("redis", args.redis_url)}
    targets: list[tuple[str, str, dict[str, str] | None]] = [
        ("reference", "reference", None),
        ("framework", "framework", None),
        ("off", "mpcapi (ledger off)", off),
        ("mpcapi", "mpcapi", dict(args.env)),
        ("memory", "mpcapi (memory policy)", {**off, **policy_env("memory", args.redis_url)}),
        ("redis", "mpcapi (Redis policy)", redis),
    ]
    unknown = set(args.instruction_targets) - {key for key, _, _ in targets}
    if unknown:
        raise BenchError(f"unknown --instruction-targets: {', '.join(sorted(unknown))}")
    rows: list[dict[str, Any]] = []
    for key, label, env in targets:
        if key not in args.instruction_targets:
            continue
        dumps = sup.tmp / f"callgrind-{len(rows)}"
        wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={dumps}.%p"]
        if env is None:
            proc = start_proxy(sup, floor.port, wrapper, ready_timeout=180, target=label)
        else:
            name = f"mpcapi-{len(rows)}"
            proc = start_mpcapi(sup, floor.port, 1, env, name, wrapper, ready_timeout=180)
        url = f"http://127.0.0.1:{proc.port}{TARGET_PATHS['reference']}"
        run_wrk(url, 8, 5, CHAT_UNIQUE_LUA, api_key=proc.api_key)  # warm-up: imports, pools
        callgrind(proc, "-z")
        result = run_wrk(url, 8, args.duration, CHAT_UNIQUE_LUA, api_key=proc.api_key)
        callgrind(proc, "-d")
        total = sum(_summary(path) for path in sup.tmp.glob(f"{dumps.name}.*"))
        proc.popen.terminate()
        row = {
            "target": label,
            "requests": result["requests"],
            "instructions": total,
            "instructions_per_request": total / max(result["requests"], 1),
            "error_count": error_count(result),
        }
        rows.append(row)
        print(
            f"   {label:<22} {row['requests']:>6,} requests"
            f"  {row['instructions_per_request'] / 1e6:6.2f} M instructions per request",
            flush=True,
        )
    if "redis" in args.instruction_targets:
        clean_redis(args.redis_url, redis["MPCAPI_REDIS_PREFIX"])
    per_request = {row["target"]: row["instructions_per_request"] for row in rows}
    ratios: dict[str, float] = {}
    pairs = [("reference", row["target"]) for row in rows if row["target"] != "reference"]
    pairs += [("framework", "mpcapi (ledger off)"), ("framework", "mpcapi")]
    pairs += [
        ("mpcapi (ledger off)", name)
        for name in ("mpcapi", "mpcapi (memory policy)", "mpcapi (Redis policy)")
    ]
    for a, b in pairs:
        if a in per_request and b in per_request:
            ratios[f"{a} / {b}"] = per_request[a] / per_request[b]
    print("\ninstruction ratios (a / b: the share of a's speed that b keeps; 1.0 = as cheap):")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}")
    data = {
        "kind": "instructions",
        "started": args.started,
        "duration_s": args.duration,
        "environment": environment(args),
        "results": rows,
        "ratios": ratios,
    }
    print(f"\nresults: {save('instructions', data)}")
    return 0


def callgrind(proc: Proc, command: str) -> None:
    """``callgrind_control -z`` (zero the counters) or ``-d`` (dump them) for a process."""
    subprocess.run(
        ["callgrind_control", command, str(proc.popen.pid)],
        capture_output=True,
        timeout=120,
        check=True,
    )


def _summary(path: Path) -> int:
    """The instruction count of one callgrind dump made after the counters were zeroed."""
    if path.suffix.lstrip(".").isdigit() and "." not in path.name.split(".", 1)[1]:
        return 0  # the end-of-run dump (the whole life, start-up included): not counted
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Load benchmark: MPC-API vs a minimal Twisted proxy vs the nginx floor "
        "(see bench/README.md).",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    p.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up: a sanity check")
    p.add_argument("--connections", default="1,32,256", help="comma-separated (1,32,256)")
    p.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="subset of floor,reference,framework,portkey,mpcapi",
    )
    p.add_argument("--workers", type=int, help="passed to MPC-API as MPCAPI_WORKERS")
    p.add_argument("--memory", action="store_true", help="memory growth mode instead")
    p.add_argument("--requests", type=int, default=100_000, help="memory mode: total (100000)")
    p.add_argument("--memory-connections", type=int, default=32, help="memory mode: (32)")
    p.add_argument("--slice", type=float, default=5.0, help="memory mode: seconds per wrk slice")
    p.add_argument("--max-seconds", type=float, default=900.0, help="memory mode: give up after")
    p.add_argument("--keep-tmp", action="store_true", help="keep logs and nginx prefix dir")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the MPC-API daemon (repeatable)",
    )
    p.add_argument(
        "--policy",
        action="store_true",
        help="rate limits + response cache (memory, Redis) vs off, and cache hit vs forwarded",
    )
    p.add_argument(
        "--ledger",
        action="store_true",
        help="usage ledger (SQLite, PostgreSQL) vs off, with the queue of rows sampled",
    )
    p.add_argument(
        "--instructions",
        action="store_true",
        help="instructions per request under valgrind's callgrind: reference vs MPC-API",
    )
    p.add_argument(
        "--instruction-targets",
        default="reference,framework,off,mpcapi,memory,redis",
        help="instruction mode: which of reference,framework,off,mpcapi,memory,redis to count",
    )
    p.add_argument(
        "--otel",
        action="store_true",
        help="OpenTelemetry tracing on (exporting to the nginx stand-in) vs off",
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="policy, ledger and otel modes: rounds (2)"
    )
    p.add_argument(
        "--postgres-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="ledger mode: the PostgreSQL to use (a schema is made and dropped)",
    )
    p.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/0", help="policy mode: the Redis to use"
    )
    args = p.parse_args(argv)
    pairs = [item.split("=", 1) for item in args.env]
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        p.error("--env takes KEY=VALUE")
    args.env = dict(pairs)
    args.warmup = 2.0
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
    args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.instruction_targets = [t.strip() for t in args.instruction_targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    args.started = datetime.now(UTC).isoformat(timespec="seconds")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def run(sup: Supervisor) -> int:
        if args.policy:
            return policy(args, sup)
        if args.ledger:
            return ledger(args, sup)
        if args.otel:
            return otel(args, sup)
        if args.instructions:
            return instructions(args, sup)
        return memory(args, sup) if args.memory else throughput(args, sup)

    return guarded(run, args.keep_tmp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
