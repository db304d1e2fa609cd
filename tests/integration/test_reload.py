"""SIGHUP reloads the configuration of a running daemon (one process, and every worker) while
a streamed answer is flowing; a bad configuration leaves the running one in force.

The stream that stays open across the reload comes from a stand-in that sends one event every
0.1 s (LiteLLM's mock models answer at once); the configuration the reload brings moves the
daemon to the real LiteLLM, so the stream also shows that a request in flight finishes on an
upstream that is no longer configured.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from .harness import HELLO, MOCK_TEXT, Daemon, LiteLLM, wait_until
from .test_stream_relay import streaming_standin

EVENTS = 40
STREAMED_TEXT = "".join(f"<{n}>" for n in range(EVENTS))


@pytest.fixture
def standin_url() -> Iterator[str]:
    with streaming_standin(events=EVENTS) as standin:  # one event per 0.1 s: 4 s
        yield standin.url


def write_config(path: Path, **values: Any) -> None:
    path.write_text("".join(f"{name} = {json.dumps(value)}\n" for name, value in values.items()))


def get(url: str) -> tuple[int, dict[str, str], Any]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, dict(response.headers), json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.load(error)


def chat(daemon: Daemon) -> tuple[int, dict[str, str]]:
    """One chat completion on a fresh connection: (status, headers); a 200 is LiteLLM's."""
    request = urllib.request.Request(
        daemon.api_base + "/chat/completions",
        data=json.dumps({"model": "gpt-4o-mini", "messages": HELLO}).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
            assert answer["choices"][0]["message"]["content"] == MOCK_TEXT
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}


class HeldStream:
    """A streamed chat completion read in a thread, chunk by chunk."""

    def __init__(self, daemon: Daemon) -> None:
        self.text = ""
        self.chunks = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, args=(daemon,), daemon=True)
        self._thread.start()

    def _read(self, daemon: Daemon) -> None:
        try:
            with openai.OpenAI(
                base_url=daemon.api_base, api_key="unused", max_retries=0, timeout=60
            ) as client:
                stream = client.chat.completions.create(
                    model="gpt-4o-mini", messages=HELLO, stream=True
                )
                for chunk in stream:
                    if chunk.choices:
                        self.chunks += 1
                        self.text += chunk.choices[0].delta.content or ""
        except BaseException as error:  # reported by the test
            self.error = error

    @property
    def open(self) -> bool:
        return self._thread.is_alive()

    def result(self) -> str:
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the stream never ended"
        assert self.error is None, repr(self.error)
        return self.text


def in_flight(daemon: Daemon) -> int:
    return sum(u["in_flight"] for u in get(daemon.url + "/health/ready")[2]["upstreams"])


def test_sighup_applies_new_upstreams_and_limits_while_a_stream_flows(
    start_mpcapi: Callable[..., Daemon],
    litellm: LiteLLM,
    dead_upstream_url: str,
    standin_url: str,
    tmp_path: Path,
) -> None:
    config = tmp_path / "mpcapi.toml"
    write_config(config, litellm_base_url=standin_url)
    daemon = start_mpcapi("--config", str(config), LITELLM_BASE_URL=None)
    held = HeldStream(daemon)
    assert wait_until(lambda: held.chunks >= 3, timeout=10), repr(held.error)
    assert in_flight(daemon) == 1, "a stream counts until it ends"

    write_config(
        config,
        litellm_base_url=f"{litellm.url},{dead_upstream_url}",
        default_rpm=3,
        pool_size=8,  # needs a restart: logged, left alone
    )
    os.kill(daemon.process.pid, signal.SIGHUP)
    log = daemon.wait_for_log("needs a restart")
    assert "configuration reloaded; applied:" in log, log
    assert f"litellm_base_url={litellm.url},{dead_upstream_url}" in log
    assert "default_rpm=3" in log
    assert "needs a restart (the running value stays): pool_size" in log
    assert held.open and held.chunks < EVENTS, "the reload came while the stream flowed"

    # The new limit is in force (3 a minute, per client address: auth is off), on the new
    # upstreams: the real LiteLLM answers (the dead one is taken out at its first refusal).
    answers = [chat(daemon) for _ in range(4)]
    assert [status for status, _ in answers] == [200, 200, 200, 429]
    assert answers[0][1]["x-ratelimit-limit-requests"] == "3"
    status, _, ready = get(daemon.url + "/health/ready")
    assert status == 200
    assert ready["litellm"]["url"] == f"{litellm.url},{dead_upstream_url}"
    assert [(u["url"], u["healthy"]) for u in ready["upstreams"]] == [
        (litellm.url, True),
        (dead_upstream_url, False),
    ]

    # The stream ends whole, from the upstream it began on; nothing was dropped.
    assert held.result() == STREAMED_TEXT
    assert daemon.process.poll() is None
    assert "outcome=completed" in daemon.wait_for_log("outcome=completed")
    assert in_flight(daemon) == 0


def test_a_bad_configuration_is_one_error_and_the_running_one_stays(
    start_mpcapi: Callable[..., Daemon], litellm: LiteLLM, tmp_path: Path
) -> None:
    config = tmp_path / "mpcapi.toml"
    write_config(config, litellm_base_url=litellm.url, default_rpm=2)
    daemon = start_mpcapi("--config", str(config), LITELLM_BASE_URL=None)
    write_config(config, litellm_base_url=litellm.url, default_rpm=100, litellm_timeout="soon")
    os.kill(daemon.process.pid, signal.SIGHUP)
    log = daemon.wait_for_log("configuration reload failed")
    failures = [line for line in log.splitlines() if "configuration reload failed" in line]
    assert len(failures) == 1, failures
    assert "litellm_timeout (in " in failures[0]
    assert "the running configuration stays" in failures[0]
    answers = [chat(daemon) for _ in range(3)]
    assert [status for status, _ in answers] == [200, 200, 429], "still 2 a minute"
    assert daemon.process.poll() is None


def test_sighup_reloads_every_worker(
    start_mpcapi: Callable[..., Daemon], litellm: LiteLLM, standin_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "mpcapi.toml"
    write_config(config, litellm_base_url=standin_url)
    daemon = start_mpcapi("--config", str(config), "--workers", "2", LITELLM_BASE_URL=None)
    assert wait_until(lambda: both_workers_serve(daemon), timeout=30), "a worker never served"
    held = HeldStream(daemon)
    assert wait_until(lambda: held.chunks >= 3, timeout=10), repr(held.error)

    write_config(config, litellm_base_url=litellm.url, default_rpm=2, log_format="json")
    os.kill(daemon.process.pid, signal.SIGHUP)  # the supervisor passes it to its workers
    assert wait_until(lambda: len(reloads(daemon)) == 2, timeout=15), daemon.log_text()
    reloaded = reloads(daemon)
    assert sorted(r["worker"] for r in reloaded) == ["1", "2"], "JSON from now on, in both"
    assert all("default_rpm=2" in r["message"] for r in reloaded)
    assert held.open and held.chunks < EVENTS, "the reload came while the stream flowed"

    # Each worker counts on its own (memory windows): 2 each at most, and every answer says so.
    answers = [chat(daemon) for _ in range(8)]
    statuses = [status for status, _ in answers]
    assert statuses.count(200) <= 4 and 429 in statuses, statuses
    assert {headers.get("x-ratelimit-limit-requests") for _, headers in answers} == {"2"}
    assert held.result() == STREAMED_TEXT
    assert daemon.process.poll() is None


def reloads(daemon: Daemon) -> list[dict[str, Any]]:
    """The JSON log records of workers that applied a reloaded configuration."""
    records = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    return [r for r in records if r["message"].startswith("configuration reloaded; applied")]


def both_workers_serve(daemon: Daemon) -> bool:
    """Send a burst of GET /health; whether each worker has answered one (so it has started,
    and a SIGHUP reloads it rather than killing it)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = set(pool.map(lambda _: get(daemon.url + "/health")[0], range(16)))
    assert statuses == {200}
    lines = daemon.log_text().splitlines()
    return all(
        any(worker in line and "GET /health" in line for line in lines)
        for worker in ("[worker 1]", "[worker 2]")
    )
