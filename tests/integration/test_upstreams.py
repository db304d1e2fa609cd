"""Several LiteLLM instances in LITELLM_BASE_URL, for real: a dead one costs no request, and
a drill kills one under load, then starts it again."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from .harness import HELLO, MOCK_TEXT, Daemon, LiteLLM, LiteLLMServer, wait_until

LOAD_CLIENTS = 20


def ready(daemon: Daemon) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(daemon.url + "/health/ready", timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def served(log: Path) -> int:
    """Chat completions a LiteLLM has answered 200, from its access log."""
    return log.read_text(errors="replace").count('"POST /chat/completions HTTP/1.1" 200')


async def _chat_many(api_base: str, count: int) -> list[str | None]:
    async with openai.AsyncOpenAI(
        base_url=api_base, api_key="unused", max_retries=0, timeout=60
    ) as client:
        completions = await asyncio.gather(
            *(
                client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
                for _ in range(count)
            )
        )
    return [completion.choices[0].message.content for completion in completions]


def test_a_dead_instance_in_the_list_costs_no_request(
    start_mpcapi: Callable[..., Daemon], litellm: LiteLLM, dead_upstream_url: str
) -> None:
    daemon = start_mpcapi(LITELLM_BASE_URL=f"{dead_upstream_url},{litellm.url}")
    before = served(litellm.log)
    answers = asyncio.run(asyncio.wait_for(_chat_many(daemon.api_base, 20), timeout=120))
    assert answers == [MOCK_TEXT] * 20
    with openai.OpenAI(base_url=daemon.api_base, api_key="unused", max_retries=0) as client:
        for _ in range(5):  # one after another: the dead instance stays out
            reply = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
            assert reply.choices[0].message.content == MOCK_TEXT
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == MOCK_TEXT
    assert served(litellm.log) - before >= 25

    status, body = ready(daemon)
    assert status == 200, body
    dead, live = body["upstreams"]
    assert dead["url"] == dead_upstream_url
    assert dead["healthy"] is False
    assert "refused" in dead["error"].lower()
    assert dead["in_flight"] == 0
    assert (live["url"], live["healthy"], live["status"]) == (litellm.url, True, 200)
    assert body["litellm"]["url"] == f"{dead_upstream_url},{litellm.url}"
    log = daemon.wait_for_log("is out")
    assert log.count(f"LiteLLM at {dead_upstream_url} is out") == 1, "logged once, when it went"


@dataclass
class Outcome:
    started: float
    ended: float
    error: str | None


class Load:
    """LOAD_CLIENTS threads, each sending chat completions (every third one streamed) one after
    another through the OpenAI SDK until stopped."""

    def __init__(self, api_base: str) -> None:
        self.api_base = api_base
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, name=f"load-{n}", daemon=True)
            for n in range(LOAD_CLIENTS)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _client(self) -> None:
        with openai.OpenAI(
            base_url=self.api_base, api_key="unused", max_retries=0, timeout=30
        ) as client:
            count = 0
            while not self._stop.is_set():
                count += 1
                started = time.monotonic()
                problem: str | None = None
                try:
                    if count % 3 == 0:
                        stream = client.chat.completions.create(
                            model="gpt-4o-mini", messages=HELLO, stream=True
                        )
                        text = "".join(
                            chunk.choices[0].delta.content or ""
                            for chunk in stream
                            if chunk.choices
                        )
                    else:
                        reply = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
                        text = reply.choices[0].message.content or ""
                    if text != MOCK_TEXT:
                        problem = f"unexpected answer {text!r}"
                except openai.APIStatusError as error:  # the error body names the instance
                    problem = f"{type(error).__name__}: {error.status_code} {error.response.text}"
                except openai.OpenAIError as error:
                    problem = f"{type(error).__name__}: {error}"
                self.outcomes.append(Outcome(started, time.monotonic(), problem))

    def since(self, moment: float) -> list[Outcome]:
        return [outcome for outcome in list(self.outcomes) if outcome.started >= moment]


def test_drill_an_instance_killed_under_load_is_taken_out_and_probed_back_in(
    start_mpcapi: Callable[..., Daemon], litellm: LiteLLM, tmp_path: Path
) -> None:
    second = LiteLLMServer(tmp_path / "litellm-2.log")
    second.start()
    try:
        daemon = start_mpcapi(
            LITELLM_BASE_URL=f"{litellm.url},{second.url}", MPCAPI_UPSTREAM_PROBE_SECONDS="1"
        )
        first_before = served(litellm.log)
        with Load(daemon.api_base) as load:
            # Both instances take their share.
            assert wait_until(
                lambda: served(second.log) >= 30 and served(litellm.log) - first_before >= 30,
                timeout=60,
            ), (served(second.log), served(litellm.log) - first_before)

            killed_at = time.monotonic()
            second.kill()
            out = f"LiteLLM at {second.url} is out"
            assert wait_until(lambda: out in daemon.log_text(), timeout=15), daemon.log_text()
            out_at = time.monotonic()
            assert wait_until(lambda: len(load.since(out_at)) >= 100, timeout=60)
            status, body = ready(daemon)
            assert status == 200, body
            assert [u["healthy"] for u in body["upstreams"]] == [True, False]

            second_before = served(second.log)
            second.start()  # the same port: the background probe must bring it back
            back = f"LiteLLM at {second.url} is back in"
            assert wait_until(lambda: back in daemon.log_text(), timeout=15), daemon.log_text()
            back_at = time.monotonic()
            assert wait_until(lambda: served(second.log) >= second_before + 30, timeout=60)
        ended_at = time.monotonic()

        after_out = load.since(out_at)
        failed = [o.error for o in after_out if o.error is not None]
        # Once it is out, the dead instance fails nobody. (A keep-alive connection that the
        # live instance closes just as a request is written to it is another matter, seen
        # once in 700 requests: it is reported below, not counted here.)
        from_dead = [error for error in failed if second.url in error]
        assert from_dead == [], f"{len(from_dead)} of {len(after_out)} failed after the take-out"
        print(f"drill: failures after the take-out, none from the dead instance: {failed}")
        assert len(load.since(back_at)) >= 30
        # What the clients saw while the instance died (requests it held then break off: they
        # may have been billed, so they are not retried) is reported, not hidden.
        during = [o for o in load.outcomes if killed_at <= o.ended and o.started < out_at]
        failed_during = [o for o in during if o.error is not None]
        print(
            f"drill: {len(load.outcomes)} requests, {ended_at - killed_at:.1f} s after the kill; "
            f"{len(failed_during)} failed between the kill and the take-out, "
            f"{sum(o.started < killed_at for o in failed_during)} of them sent before the kill; "
            f"errors: {sorted({str(o.error)[:120] for o in failed_during})}"
        )
        status, body = ready(daemon)
        assert status == 200, body
        assert [u["healthy"] for u in body["upstreams"]] == [True, True]
        assert all(u["in_flight"] == 0 for u in body["upstreams"])
    finally:
        second.stop()
