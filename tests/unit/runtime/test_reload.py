"""Configuration reload (SIGHUP), called directly: a TOML file and a .env of the test's own are
rewritten and read again by the real loader; the gateway runs over a fake LiteLLM."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import attrs
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.logger import LogEvent, formatEvent

from mpcapi.config.settings import load_settings
from mpcapi.runtime.logs import LogSwitch
from mpcapi.runtime.reload import Reloader, ReloadOnSighup
from mpcapi.storage.keys import revoke_key
from tests.support.databases import sqlite_url
from tests.support.gateway import CHAT, UPSTREAM, Harness, make_harness, never_answer
from tests.support.keys import call, database_of, new_key


def write_toml(path: Path, **values: Any) -> None:
    path.write_text("".join(f"{name} = {json.dumps(value)}\n" for name, value in values.items()))


@attrs.define
class Running:
    harness: Harness
    reloader: Reloader
    config: Path

    def rewrite(self, **values: Any) -> None:
        base = {"litellm_base_url": UPSTREAM, "litellm_api_key": "sk-ours"}
        write_toml(self.config, **{**base, **values})

    async def reload(self) -> bool:
        return await self.reloader.reload()

    async def chat(self) -> Any:
        pending = defer.ensureDeferred(self.harness.post("/api/chat/completions", CHAT))
        self.harness.flush()
        return await pending


def running(tmp_path: Path, **values: Any) -> Running:
    config = tmp_path / "mpcapi.toml"
    base = {"litellm_base_url": UPSTREAM, "litellm_api_key": "sk-ours"}
    write_toml(config, **{**base, **values})

    def load() -> Any:
        return load_settings({"config": str(config)}, {}, cwd=tmp_path)

    settings = load()
    harness = make_harness(**attrs.asdict(settings))
    reloader = Reloader(load=load, run_blocking=defer.maybeDeferred, live=harness.parts.live)
    return Running(harness, reloader, config)


def messages(events: list[LogEvent], namespace: str = "mpcapi.reload") -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == namespace]


@pytest_twisted.ensureDeferred
async def test_a_reload_applies_upstreams_limits_timeout_and_key(
    tmp_path: Path, log_events: list[LogEvent]
) -> None:
    r = running(tmp_path)
    assert (await r.chat()).code == 200
    r.rewrite(
        litellm_base_url="http://x.test:4000,http://y.test:4000",
        litellm_api_key="sk-rotated",
        litellm_timeout=30.0,
        default_rpm=2,
        port=4100,
    )
    assert await r.reload() is True

    answers = [await r.chat() for _ in range(3)]
    assert [a.code for a in answers] == [200, 200, 429]
    assert answers[0].headers.getRawHeaders(b"x-ratelimit-limit-requests") == [b"2"]
    forwarded = r.harness.fake.seen[1:]
    assert [seen.header("host") for seen in forwarded] == ["x.test:4000", "y.test:4000"]
    assert {seen.header("authorization") for seen in forwarded} == {"Bearer sk-rotated"}
    assert r.harness.upstream.timeout == 30.0
    assert r.harness.gateway is not None
    settings = r.harness.settings
    assert settings.port == 3000, "the port needs a restart: the running one stays"
    assert settings.default_rpm == 2

    logged = messages(log_events)
    assert any("applied:" in m and "default_rpm=2" in m for m in logged), logged
    assert any("litellm_api_key=***" in m for m in logged), logged
    assert any("needs a restart" in m and "port" in m for m in logged), logged
    assert not any("sk-rotated" in formatEvent(e) for e in log_events), "no key is ever logged"


@pytest_twisted.ensureDeferred
async def test_dotenv_is_read_again(tmp_path: Path) -> None:
    r = running(tmp_path)
    (tmp_path / ".env").write_text("MPCAPI_DEFAULT_RPM=1\n")
    assert await r.reload() is True
    assert [(await r.chat()).code for _ in range(2)] == [200, 429]


@pytest_twisted.ensureDeferred
async def test_a_bad_configuration_is_one_error_and_the_running_one_stays(
    tmp_path: Path, log_events: list[LogEvent]
) -> None:
    r = running(tmp_path, default_rpm=5)
    before = r.reloader.live.current
    r.rewrite(default_rpm=1, litellm_timeout=-1)
    assert await r.reload() is False
    r.config.write_text("default_rpm = \n")
    assert await r.reload() is False
    r.rewrite(litellm_base_url="http://x.test:4000,ftp://y.test")
    assert await r.reload() is False

    errors = [e for e in log_events if e.get("log_namespace") == "mpcapi.reload"]
    assert len(errors) == 3
    texts = [formatEvent(e) for e in errors]
    assert "litellm_timeout (in " in texts[0] and "the running configuration stays" in texts[0]
    assert "not valid TOML" in texts[1]
    assert "litellm_base_url" in texts[2]
    assert all("\n" not in text for text in texts)
    assert r.reloader.live.current is before
    answers = [await r.chat() for _ in range(2)]
    assert [a.code for a in answers] == [200, 200]
    assert answers[0].headers.getRawHeaders(b"x-ratelimit-limit-requests") == [b"5"]
    assert [u.base_url for u in r.harness.upstream.balancer.instances] == [UPSTREAM]


@pytest_twisted.ensureDeferred
async def test_requests_in_flight_keep_their_instance_and_its_count(tmp_path: Path) -> None:
    r = running(tmp_path)
    r.harness.fake.routes[("POST", "/chat/completions")] = never_answer
    held = defer.ensureDeferred(r.chat())
    (kept,) = r.harness.upstream.balancer.instances
    assert kept.in_flight == 1
    r.rewrite(litellm_base_url=f"{UPSTREAM},http://y.test:4000", litellm_timeout=1.0)
    assert await r.reload() is True
    assert r.harness.upstream.balancer.instances[0] is kept
    assert kept.in_flight == 1
    r.harness.clock.advance(2)  # the new timeout is for new requests ...
    r.harness.flush()
    assert not held.called
    r.harness.clock.advance(600)  # ... the held one keeps the one it began with
    r.harness.flush()
    assert (await held).code == 504
    assert kept.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_switching_between_our_key_and_the_clients_needs_a_restart(
    tmp_path: Path, log_events: list[LogEvent]
) -> None:
    r = running(tmp_path)
    r.rewrite(litellm_api_key="")
    assert await r.reload() is True
    assert r.harness.upstream.api_key == "sk-ours"
    assert any("needs a restart" in m and "litellm_api_key" in m for m in messages(log_events))


@pytest_twisted.ensureDeferred
async def test_a_reload_forgets_cached_client_keys(tmp_path: Path) -> None:
    r = running(tmp_path, auth="keys", database_url=sqlite_url(tmp_path))
    harness = r.harness
    assert harness.gateway is not None and harness.keys is not None
    try:
        key, secret = await new_key(harness)
        header = f"Bearer {secret}"
        assert (await call(harness, "GET", "/api/models", header)).code == 200
        await database_of(harness).run(revoke_key, key.id)
        # The cache trusts the key for a while yet (the clock has not moved) ...
        assert (await call(harness, "GET", "/api/models", header)).code == 200
        assert await r.reload() is True
        # ... a reload reads it again at once.
        assert (await call(harness, "GET", "/api/models", header)).code == 401
    finally:
        harness.keys.database.close()


def test_the_log_format_switches_live() -> None:
    out = io.StringIO()
    switch = LogSwitch("text", "1", out)
    switch({"log_format": "plain {n}", "n": 1, "log_time": 0, "log_namespace": "t"})
    switch.use("json")
    switch({"log_format": "as json {n}", "n": 2, "log_time": 0, "log_namespace": "t"})
    first, second = out.getvalue().splitlines()
    assert "[worker 1] plain 1" in first
    record = json.loads(second)
    assert (record["message"], record["n"], record["worker"]) == ("as json 2", 2, "1")


@pytest_twisted.ensureDeferred
async def test_a_reload_switches_the_log_format_it_was_given(tmp_path: Path) -> None:
    r = running(tmp_path, log_format="json")
    out = io.StringIO()
    switch = LogSwitch("json", None, out)
    r.reloader.logs_of = lambda: switch
    r.rewrite(log_format="text")
    assert await r.reload() is True
    assert switch.log_format == "text"


@pytest_twisted.ensureDeferred
async def test_without_our_observer_the_log_format_needs_a_restart(
    tmp_path: Path, log_events: list[LogEvent]
) -> None:
    r = running(tmp_path, log_format="text")
    r.rewrite(log_format="json")
    assert await r.reload() is True
    assert r.reloader.live.current.log_format == "text"
    assert any("needs a restart" in m and "log_format" in m for m in messages(log_events))


@pytest_twisted.ensureDeferred
async def test_sighup_runs_the_reload_on_the_reactor_thread() -> None:
    reloaded: defer.Deferred[None] = defer.Deferred()
    previous = signal.getsignal(signal.SIGHUP)
    service = ReloadOnSighup(reactor, lambda: reloaded.callback(None))
    try:
        service.startService()
        os.kill(os.getpid(), signal.SIGHUP)
        await reloaded.addTimeout(5, reactor)
    finally:
        signal.signal(signal.SIGHUP, previous)
