"""What the benchmarks share (bench/harness.py, bench/streams.py, bench/soak.py): starting and
supervising their processes (each in its own process group, all stopped when a run ends,
fails or is interrupted), MPC-API and the streaming stand-in, reading /proc, driving wrk, the
run guard that turns failures into exit statuses, and the results files.

Standard library only, so that bench/harness.py runs before the project venv has MPC-API.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
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
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = ROOT / ".venv" / "bin"
RESULTS = BENCH / "results"
STANDIN = BENCH / "stream_standin.py"
CHAT_LUA = BENCH / "chat.lua"
CHAT_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}]}'
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class BenchError(Exception):
    """The run cannot go on; ``proc`` is the process whose log explains why, if any."""

    def __init__(self, message: str, proc: Proc | None = None) -> None:
        super().__init__(message)
        self.proc = proc


class RunFailed(Exception):  # noqa: N818 (a signal, not an error)
    """The run finished but found errors: raised through ``supervised`` (which then keeps the
    process logs); ``guarded`` returns ``status``."""

    def __init__(self, status: int = 1) -> None:
        super().__init__(status)
        self.status = status


# --------------------------------------------------------------------------- /proc


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


def fd_count(pid: int) -> int:
    """Open file descriptors of one process (-1 if it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


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


def cpu_seconds(root: int) -> float:
    """CPU time (user + system) used so far by `root` and its descendants (its workers)."""
    total = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def raise_nofile_limit(wanted: int) -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE (the children inherit it); return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
        except (ValueError, OSError):  # not allowed to raise the hard limit: go as far as it
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def nofile_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int
    hwm_kib: dict[int, int] = field(default_factory=dict)  # pid -> highest VmHWM seen
    api_key: str | None = None  # the client key requests need (MPC-API with MPCAPI_AUTH=keys)
    wrk_env: dict[str, str] = field(default_factory=dict)  # what its wrk scripts need besides

    def rss_kib(self) -> int:
        """Current resident memory of the process and its children."""
        return sum(proc_status(pid).get("VmRSS", 0) for pid in process_tree(self.popen.pid))

    def rss_by_role(self) -> dict[str, int]:
        """Current resident memory (KiB) of the process and its children, by what they are:
        the daemon itself, its workers, its usage row writers (mpcapi.storage.usagerows)."""
        roles: dict[str, int] = {}
        for pid in process_tree(self.popen.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if b"mpcapi.storage.usagerows" in cmdline:
                role = "row writer"
            else:
                role = "daemon" if pid == self.popen.pid else "worker"
            roles[role] = roles.get(role, 0) + proc_status(pid).get("VmRSS", 0)
        return roles

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


def http_status(
    url: str,
    body: bytes | None = None,
    timeout: float = 2.0,
    api_key: str | None = None,
    extra_headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    headers.update(extra_headers or {})
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


def smoke_test(proc: Proc, url: str, headers: dict[str, str] | None = None) -> None:
    """One real chat request before measuring: a target that answers errors is not benchmarked."""
    try:
        status, body = http_status(
            url, CHAT_BODY, timeout=10.0, api_key=proc.api_key, extra_headers=headers
        )
    except OSError as err:
        raise BenchError(f"{proc.name}: POST {url} failed: {err}", proc) from err
    if status != 200 or b'"choices"' not in body:
        raise BenchError(f"{proc.name}: POST {url} -> HTTP {status}: {body[:300]!r}", proc)


# --------------------------------------------------------------------------- the processes we run


def start_mpcapi(
    sup: Supervisor,
    upstream: int,
    workers: int | None,
    extra_env: dict[str, str] | None = None,
    name: str = "mpcapi",
    wrapper: Sequence[str] = (),
    ready_timeout: float = 30.0,
) -> Proc:
    """`twistd -n mpcapi` of the working tree in front of the upstream on `upstream`, with
    JSON log lines; ready and answering a chat request when this returns."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        PORT=str(port),
        LITELLM_BASE_URL=f"http://127.0.0.1:{upstream}",
        MPCAPI_ENV="production",
        MPCAPI_LOG_FORMAT="json",
        # The usage ledger of each daemon in the run's temporary directory, not the checkout.
        MPCAPI_DATABASE_URL=f"sqlite:///{sup.tmp / name}.db",
        MPCAPI_USAGE_SPOOL=str(sup.tmp / f"{name}.spool.jsonl"),
    )
    env.update(extra_env or {})  # --env KEY=VALUE, mode presets
    api_key = create_client_key(env) if env.get("MPCAPI_AUTH") == "keys" else None
    # The working tree's code and plugin, whatever the kind of (editable) install in .venv.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if workers is not None:
        env["MPCAPI_WORKERS"] = str(workers)
    twistd = "from twisted.scripts.twistd import run; run()"
    argv = [*wrapper, str(VENV_BIN / "python"), "-c", twistd, "-n", "--pidfile=", "mpcapi"]
    proc = sup.start(name, argv, port, env)
    proc.api_key = api_key
    wait_ready(proc, f"http://127.0.0.1:{port}/health", ready_timeout)
    smoke_test(proc, f"http://127.0.0.1:{port}/api/chat/completions")
    return proc


def create_client_key(env: dict[str, str]) -> str:
    """A client key without limits of its own, made with `mpcapi-admin keys create` in the
    daemon's database (``env``'s MPCAPI_DATABASE_URL): what an MPCAPI_AUTH=keys daemon asks."""
    done = subprocess.run(
        [str(VENV_BIN / "mpcapi-admin"), "keys", "create", "--user", "bench"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) < 2:
        raise BenchError(f"mpcapi-admin keys create failed: {done.stdout}{done.stderr}")
    return lines[1].strip()


def start_standin(sup: Supervisor, *options: str) -> tuple[Proc, int]:
    """bench/stream_standin.py (a streaming stand-in LiteLLM) with `options`; the process and
    its uncounted control port."""
    port, control = free_port(), free_port()
    argv = [str(VENV_BIN / "python"), str(STANDIN), f"--port={port}", f"--control-port={control}"]
    proc = sup.start("standin", [*argv, *options], port)
    wait_ready(proc, f"http://127.0.0.1:{control}/health/liveliness")
    return proc, control


def mpcapi_log_summary(proc: Proc) -> dict[str, Any]:
    """Outcomes and statuses of MPC-API's request log lines (JSON), and its warnings and errors."""
    outcomes: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    levels: Counter[str] = Counter()
    problems: list[str] = []
    lines = 0
    try:
        with proc.log.open(errors="replace") as log:
            for raw in log:
                line = raw.rstrip("\n")
                lines += 1
                try:
                    record = json.loads(line)
                except ValueError:
                    if line.strip():
                        problems.append(line[:300])
                    continue
                level = str(record.get("level", "?"))
                levels[level] += 1
                if level in ("warn", "error", "critical"):
                    problems.append(str(record.get("message", line))[:300])
                if record.get("namespace") == "mpcapi.request" and "outcome" in record:
                    outcomes[str(record["outcome"])] += 1
                    statuses[str(record.get("status"))] += 1
    except OSError:
        pass
    return {
        "lines": lines,
        "levels": dict(levels),
        "outcomes": dict(outcomes),
        "statuses": dict(statuses),
        "problems": problems[:20],
        "problem_count": len(problems),
    }


# --------------------------------------------------------------------------- wrk


def run_wrk(
    url: str,
    connections: int,
    seconds: float,
    script: Path = CHAT_LUA,
    timeout: float = 10.0,
    api_key: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One wrk run; the `BENCH_JSON` line of bench/report.lua as a dict, plus `non_2xx` and
    `threads`. With ``api_key`` the scripts send it as a bearer token (BENCH_API_KEY); ``env``
    is more for the scripts to read (BENCH_PORTKEY_HOST)."""
    threads = 1 if connections < 2 else 2
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout:g}s",
        "--latency",
        f"--script={script}",
        url,
    ]
    scripts_env = {**(env or {}), **({"BENCH_API_KEY": api_key} if api_key else {})}
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
        env={**os.environ, **scripts_env} if scripts_env else None,
    )
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


def fmt_mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def print_rows(rows: Sequence[Sequence[str]]) -> None:
    """A table: the first row is the header; the first column left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        pairs = enumerate(zip(row, widths, strict=True))
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def save(kind: str, data: dict[str, Any]) -> Path:
    """Write `data` to bench/results/<UTC timestamp>[-<kind>].json."""
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{stamp}{'' if kind == 'throughput' else '-' + kind}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- running


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def supervised(keep: bool) -> Iterator[Supervisor]:
    """A Supervisor with a temp dir for the process logs; every process is stopped on exit,
    and the logs are removed unless the run failed or `keep` is set."""
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


def guarded(run: Callable[[Supervisor], int], keep_tmp: bool) -> int:
    """Run `run` with a Supervisor; SIGINT, SIGTERM and SIGHUP stop it (and every process it
    started). The exit status: `run`'s; 1 after a BenchError (printed with the end of the
    failing process's log) or a RunFailed; 130 when interrupted."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _terminate)
    try:
        with supervised(keep_tmp) as sup:
            return run(sup)
    except RunFailed as failed:
        return failed.status
    except BenchError as err:
        print(f"\nbench: {err}", file=sys.stderr)
        if err.proc is not None:
            print(f"--- last lines of {err.proc.log}:\n{err.proc.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130


def log_problems_only(stream: TextIO) -> None:
    """Twisted's log of this process to ``stream``, warnings and errors only."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    only_problems = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(stream), [only_problems])],
        redirectStandardIO=False,
    )
