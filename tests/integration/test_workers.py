"""MPCAPI_WORKERS: one socket bound by the supervisor, served by worker processes."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .harness import Daemon, DaemonLauncher, wait_until

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def chat(url: str) -> int:
    request = urllib.request.Request(
        url + "/api/chat/completions",
        data=json.dumps(CHAT).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["choices"]
        return int(response.status)


def burst(url: str, count: int = 48) -> list[int]:
    """``count`` requests at once, each on its own connection."""
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda _: chat(url), range(count)))


def test_two_workers_share_the_port_and_each_log_names_its_worker(
    start_mpcapi: Callable[..., Daemon],
) -> None:
    daemon = start_mpcapi(MPCAPI_WORKERS="2")
    assert wait_until(lambda: len(children(daemon.process.pid)) == 2, 10)
    served_by: set[str] = set()
    for _ in range(10):  # the kernel picks the worker; a few bursts reach both
        assert burst(daemon.url) == [200] * 48
        log = daemon.log_text()
        served_by = {
            worker
            for worker in ("[worker 1]", "[worker 2]")
            if any(worker in line and "POST /api/chat" in line for line in log.splitlines())
        }
        if len(served_by) == 2:
            break
    assert served_by == {"[worker 1]", "[worker 2]"}
    assert "[supervisor] supervising 2 workers" in daemon.log_text()


def test_a_dead_worker_is_replaced_and_sigterm_stops_all(
    start_mpcapi: Callable[..., Daemon],
) -> None:
    daemon = start_mpcapi(MPCAPI_WORKERS="2", MPCAPI_LOG_FORMAT="json")
    assert wait_until(lambda: len(children(daemon.process.pid)) == 2, 10)
    victim = children(daemon.process.pid)[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(
        lambda: (
            len(children(daemon.process.pid)) == 2 and victim not in children(daemon.process.pid)
        ),
        10,
    ), "the supervisor starts a new worker"
    assert burst(daemon.url, 16) == [200] * 16

    def records() -> list[dict[str, Any]]:
        lines = daemon.log_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    assert any("restarting" in record["message"] for record in records())
    # The new worker names itself once it has started (its first line may come after the
    # burst, which the kernel may have given to the other worker alone).
    assert wait_until(
        lambda: {record.get("worker") for record in records()} >= {"supervisor", "1", "2"}, 10
    ), {record.get("worker") for record in records()}

    workers = children(daemon.process.pid)
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=15) == 0, "workers drained, a clean stop"
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 5)


def test_bad_worker_count_stops_startup(mpcapi_launcher: DaemonLauncher) -> None:
    result = mpcapi_launcher.run(MPCAPI_WORKERS="zero")
    assert result.returncode != 0
    assert "MPCAPI_WORKERS" in result.stderr.strip().splitlines()[-1]
