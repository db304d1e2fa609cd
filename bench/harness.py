"""The engine behind `bench/run`: starts the stand-in LiteLLM (nginx), the reference Twisted proxy
and MPC-API, drives each with wrk and reports throughput, latency and peak memory.

Standard library only; bench/run installs nginx, wrk and the project venv before calling this.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = ROOT / ".venv" / "bin"
RESULTS = BENCH / "results"
CHAT_LUA = BENCH / "chat.lua"
CHAT_UNIQUE_LUA = BENCH / "chat_unique.lua"  # a new question every request: cache misses
CHAT_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}]}'
NGINX = "/usr/sbin/nginx"
TARGETS = ("floor", "reference", "mpcapi")
TARGET_PATHS = {
    "floor": "/chat/completions",
    "reference": "/api/chat/completions",
    "mpcapi": "/api/chat/completions",
}
LABELS = {"floor": "floor (nginx)", "reference": "reference proxy", "mpcapi": "MPC-API"}


# --------------------------------------------------------------------------- processes & memory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of one process, in KiB (empty if it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def process_tree(root: int) -> list[int]:
    """`root` and all of its descendants, found through /proc/<pid>/stat parent ids."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int
    hwm_kib: dict[int, int] = field(default_factory=dict)  # pid -> highest VmHWM seen

    def rss_kib(self) -> int:
        """Current resident memory of the process and its children."""
        return sum(proc_status(pid).get("VmRSS", 0) for pid in process_tree(self.popen.pid))

    def sample_peak(self) -> None:
        for pid in process_tree(self.popen.pid):
            hwm = proc_status(pid).get("VmHWM", 0)
            if hwm > self.hwm_kib.get(pid, 0):
                self.hwm_kib[pid] = hwm

    def peak_kib(self) -> int:
        """Peak resident memory: each process's own high-water mark, summed over the tree."""
        self.sample_peak()
        return sum(self.hwm_kib.values())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Supervisor:
    """Starts processes in their own sessions, polls their memory, and ends them all on exit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    def start(
        self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None
    ) -> Proc:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )
        proc = Proc(name, popen, log, port)
        self.procs.append(proc)
        return proc

    def _poll(self) -> None:
        while not self._stop.wait(0.25):
            for proc in list(self.procs):
                if proc.popen.poll() is None:
                    proc.sample_peak()

    def stop_all(self) -> None:
        self._stop.set()
        for proc in reversed(self.procs):
            stop_process(proc.popen)
        self.procs.clear()


def stop_process(popen: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group we created for `popen`, then SIGKILL whatever is left."""
    pgid = popen.pid  # start_new_session=True: the child leads its own group
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        try:
            popen.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):  # stragglers (e.g. nginx workers)
            os.killpg(pgid, signal.SIGKILL)
        return


def exit_text(proc: Proc) -> str:
    code = proc.popen.returncode
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def http_status(url: str, body: bytes | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as err:
        return int(err.code), bytes(err.read())


def wait_ready(proc: Proc, url: str, timeout: float = 30.0) -> None:
    """Wait until `url` answers 200; fail with the process log if it dies or never does."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} did not start: {exit_text(proc)}", proc)
        try:
            status, body = http_status(url, timeout=1.0)
            if status == 200:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        except (OSError, urllib.error.URLError) as err:
            last = str(err)
        time.sleep(0.1)
    raise BenchError(f"{proc.name} not ready at {url} after {timeout:.0f}s ({last})", proc)


def smoke_test(proc: Proc, url: str) -> None:
    """One real chat request before measuring: a target that answers errors is not benchmarked."""
    try:
        status, body = http_status(url, CHAT_BODY, timeout=10.0)
    except OSError as err:
        raise BenchError(f"{proc.name}: POST {url} failed: {err}", proc) from err
    if status != 200 or b'"choices"' not in body:
        raise BenchError(f"{proc.name}: POST {url} -> HTTP {status}: {body[:300]!r}", proc)


class BenchError(Exception):
    def __init__(self, message: str, proc: Proc | None = None) -> None:
        super().__init__(message)
        self.proc = proc


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


def start_reference(sup: Supervisor, upstream: int) -> Proc:
    port = free_port()
    argv = [
        str(VENV_BIN / "python"),
        str(BENCH / "reference_proxy.py"),
        f"--port={port}",
        f"--upstream=http://127.0.0.1:{upstream}",
    ]
    proc = sup.start("reference", argv, port)
    wait_ready(proc, f"http://127.0.0.1:{port}/api/models")
    smoke_test(proc, f"http://127.0.0.1:{port}/api/chat/completions")
    return proc


def start_mpcapi(
    sup: Supervisor,
    upstream: int,
    workers: int | None,
    extra_env: dict[str, str] | None = None,
    name: str = "mpcapi",
) -> Proc:
    port = free_port()
    env = dict(os.environ)
    env.update(
        PORT=str(port),
        LITELLM_BASE_URL=f"http://127.0.0.1:{upstream}",
        MPCAPI_ENV="production",
        MPCAPI_LOG_FORMAT="json",
    )
    env.update(extra_env or {})  # --env KEY=VALUE, --policy presets
    # The working tree's code and plugin, whatever the kind of (editable) install in .venv.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if workers is not None:
        env["MPCAPI_WORKERS"] = str(workers)
    argv = [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "mpcapi"]
    proc = sup.start(name, argv, port, env)
    wait_ready(proc, f"http://127.0.0.1:{port}/health")
    smoke_test(proc, f"http://127.0.0.1:{port}/api/chat/completions")
    return proc


# --------------------------------------------------------------------------- wrk


def run_wrk(url: str, connections: int, seconds: float, script: Path = CHAT_LUA) -> dict[str, Any]:
    threads = 1 if connections < 2 else 2
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout=10s",
        "--latency",
        f"--script={script}",
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    result["non_2xx"] = int(match.group(1)) if match else 0
    result["threads"] = threads
    return result


def error_count(result: dict[str, Any]) -> int:
    socket_errors = sum(v for k, v in result["errors"].items() if k != "status")
    return int(result["non_2xx"]) + int(socket_errors)


# --------------------------------------------------------------------------- reports


def fmt_us(us: float) -> str:
    return f"{us / 1000:.2f}ms" if abs(us) >= 1000 else f"{us:.0f}us"


def fmt_mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


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


def save(kind: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{stamp}{'' if kind == 'throughput' else '-' + kind}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


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
    if "reference" in args.targets:
        procs["reference"] = start_reference(sup, floor.port)
    if "mpcapi" in args.targets:
        procs["mpcapi"] = start_mpcapi(sup, floor.port, args.workers, args.env)

    rows: list[dict[str, Any]] = []
    for target in [t for t in TARGETS if t in procs]:
        proc = procs[target]
        url = f"http://127.0.0.1:{proc.port}{TARGET_PATHS[target]}"
        print(f"== {LABELS[target]}: {url}", flush=True)
        run_wrk(url, 32, args.warmup)  # warm-up, not recorded
        for conns in args.connections:
            result = run_wrk(url, conns, args.duration)
            result.update(target=target, connections=conns, url=url)
            result["error_count"] = error_count(result)
            rows.append(result)
            print(
                f"   {conns:>4} conns: {result['rps']:>10,.0f} req/s"
                f"  p50 {fmt_us(result['p50_us'])}  p99 {fmt_us(result['p99_us'])}"
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
    pairs = [("mpcapi", "reference"), ("mpcapi", "floor"), ("reference", "floor")]
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
    samples: list[dict[str, Any]] = [{"requests": 0, "rss_kib": proc.rss_kib()}]
    print(f"== MPC-API memory: {total:,} requests at {args.memory_connections} connections, {url}")
    print(f"   idle: {fmt_mib(samples[0]['rss_kib'])}", flush=True)
    sent, errors, rate = 0, 0, 0.0
    deadline = time.monotonic() + args.max_seconds
    while checkpoints:
        if time.monotonic() > deadline:
            raise BenchError(f"memory run passed {args.max_seconds}s at {sent:,} requests", proc)
        remaining = checkpoints[0] - sent
        seconds = args.slice if rate <= 0 else min(args.slice, max(1.0, remaining / rate))
        result = run_wrk(url, args.memory_connections, seconds)
        sent += int(result["requests"])
        errors += error_count(result)
        rate = float(result["rps"])
        if proc.popen.poll() is not None:
            raise BenchError(f"mpcapi died during the memory run: {exit_text(proc)}", proc)
        if sent >= checkpoints[0]:
            checkpoints.pop(0)
            sample = {"requests": sent, "rss_kib": proc.rss_kib(), "errors": errors}
            samples.append(sample)
            print(f"   after {sent:,} requests: {fmt_mib(sample['rss_kib'])}", flush=True)
    half, full = samples[1]["rss_kib"], samples[2]["rss_kib"]
    growth = (full - half) / half * 100 if half else 0.0
    print()
    print(f"RSS at {samples[1]['requests']:,} requests: {fmt_mib(half)}")
    print(f"RSS at {samples[2]['requests']:,} requests: {fmt_mib(full)}")
    print(f"growth between them: {growth:+.1f}%")
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
    """Rate limits too high to refuse anything, and the response cache, in memory or Redis."""
    env = {
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
    route; and a cache hit against a forwarded request. Repeated ``--rounds`` times, the
    targets alternating, so that noise from the shared CPU shows as spread."""
    floor = start_floor(sup)
    envs = {"off": dict(args.env)}
    for kind in ("memory", "redis"):
        envs[kind] = {**args.env, **policy_env(kind, args.redis_url)}
    procs = {
        kind: start_mpcapi(sup, floor.port, args.workers, env, name=f"mpcapi-{kind}")
        for kind, env in envs.items()
    }
    rows: list[dict[str, Any]] = []
    try:
        for proc in procs.values():
            url = f"http://127.0.0.1:{proc.port}/api/chat/completions"
            run_wrk(url, 32, args.warmup, CHAT_UNIQUE_LUA)  # warm-up, not recorded
        for round_ in range(args.rounds):
            for label, kind, script in POLICY_RUNS:
                proc = procs[kind]
                url = f"http://127.0.0.1:{proc.port}/api/chat/completions"
                for conns in args.connections:
                    result = run_wrk(url, conns, args.duration, script)
                    result.update(label=label, kind=kind, connections=conns, round=round_ + 1)
                    result["error_count"] = error_count(result)
                    rows.append(result)
                    print(
                        f"   round {round_ + 1} {label:<26} {conns:>4} conns:"
                        f" {result['rps']:>9,.0f} req/s  p50 {fmt_us(result['p50_us'])}"
                        f"  p99 {fmt_us(result['p99_us'])}  errors {result['error_count']}",
                        flush=True,
                    )
                    if proc.popen.poll() is not None:
                        raise BenchError(f"{proc.name} died: {exit_text(proc)}", proc)
    finally:
        clean_redis(args.redis_url, envs["redis"]["MPCAPI_REDIS_PREFIX"])

    def best(label: str, conns: int, key: str = "rps") -> float:
        values = [r[key] for r in rows if r["label"] == label and r["connections"] == conns]
        return max(values) if key == "rps" else min(values)

    print("\nbest of each (req/s, p50):")
    for label, _, _ in POLICY_RUNS:
        cells = [
            f"{c} conns {best(label, c):>8,.0f} req/s {fmt_us(best(label, c, 'p50_us')):>8}"
            for c in args.connections
        ]
        print(f"  {label:<26} " + " | ".join(cells))
    ratios: dict[str, dict[str, float]] = {}
    comparisons = [
        ("memory: forwarded (miss)", "off: forwarded", "limits+cache in memory / off"),
        ("redis: forwarded (miss)", "off: forwarded", "limits+cache in Redis / off"),
        ("memory: cache hit", "memory: forwarded (miss)", "memory: hit / forwarded"),
        ("redis: cache hit", "redis: forwarded (miss)", "redis: hit / forwarded"),
        ("memory: cache hit", "off: forwarded", "memory hit / off forwarded"),
    ]
    print("\nthroughput ratios (best of rounds; target: limits+cache >= 0.85 of off):")
    for a, b, name in comparisons:
        ratios[name] = {str(c): best(a, c) / best(b, c) for c in args.connections if best(b, c)}
        joined = ", ".join(f"{c} conns: {v:.2f}" for c, v in ratios[name].items())
        print(f"  {name}: {joined}")
    print("\np50 latency ratios (a cache hit should cost less than a forwarded request):")
    for a, b, name in comparisons[2:4]:
        values = {
            str(c): best(a, c, "p50_us") / best(b, c, "p50_us")
            for c in args.connections
            if best(b, c, "p50_us")
        }
        ratios[name + " (p50)"] = values
        print(f"  {name}: " + ", ".join(f"{c} conns: {v:.2f}" for c, v in values.items()))
    data = {
        "kind": "policy",
        "started": args.started,
        "duration_s": args.duration,
        "connections": args.connections,
        "rounds": args.rounds,
        "environment": environment(args),
        "daemon_env": envs,
        "results": rows,
        "ratios": ratios,
    }
    print(f"\nresults: {save('policy', data)}")
    for r in rows:
        if r["error_count"]:
            print(f"warning: {r['label']} had {r['error_count']} errors at {r['connections']}")
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
    p.add_argument("--targets", default=",".join(TARGETS), help="subset of floor,reference,mpcapi")
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
    p.add_argument("--rounds", type=int, default=2, help="policy mode: rounds (2)")
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
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    args.started = datetime.now(UTC).isoformat(timespec="seconds")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def supervised(keep: bool) -> Iterator[Supervisor]:
    tmp = Path(tempfile.mkdtemp(prefix="mpcapi-bench-"))
    sup = Supervisor(tmp)
    ok = False
    try:
        yield sup
        ok = True
    finally:
        sup.stop_all()
        if ok and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    try:
        with supervised(args.keep_tmp) as sup:
            if args.policy:
                return policy(args, sup)
            return memory(args, sup) if args.memory else throughput(args, sup)
    except BenchError as err:
        print(f"\nbench: {err}", file=sys.stderr)
        if err.proc is not None:
            print(f"--- last lines of {err.proc.log}:\n{err.proc.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
