"""The composition root: every part is made once, shared where it must be, and reached by a
reload through ``LiveSettings``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor

from mpcapi.config.settings import Settings
from mpcapi.ledger.ledger import UsageLedger
from mpcapi.runtime.build import build_gateway, build_service
from mpcapi.upstream.balancer import HealthProbe
from tests.support.gateway import UPSTREAM, make_harness


class ForgetCounting:
    """Stands in for the key authenticator; counts how often it was told to forget."""

    database: Any = None

    def __init__(self) -> None:
        self.forgotten = 0

    def forget(self) -> None:
        self.forgotten += 1


def test_http_and_websocket_share_one_admission_and_one_cache() -> None:
    parts = make_harness().parts
    websockets = parts.gateway.websockets
    assert parts.forwarding.admission is parts.admission is websockets.admission
    assert parts.forwarding.cache is parts.cache is websockets.cache
    assert parts.admission.limiter is parts.limiter
    assert parts.forwarding.upstream is parts.upstream is websockets.upstream


def test_a_reload_reaches_every_part_through_live_settings() -> None:
    keys = ForgetCounting()
    parts = make_harness(keys=keys, auth="keys", default_rpm=5).parts
    fresh = attrs.evolve(
        parts.live.current,
        litellm_base_url="http://a.test:4000,http://b.test:4000",
        litellm_api_key="sk-rotated",
        litellm_timeout=7.0,
        ready_timeout=0.5,
        default_rpm=2,
        default_tpm=100,
    )
    parts.live.replace(fresh)
    upstream = parts.upstream
    assert [u.base_url for u in upstream.balancer.instances] == [
        "http://a.test:4000",
        "http://b.test:4000",
    ]
    assert (upstream.api_key, upstream.timeout, upstream.probe_timeout) == ("sk-rotated", 7.0, 0.5)
    assert (parts.limiter.default_rpm, parts.limiter.default_tpm) == (2, 100)
    assert keys.forgotten == 1
    assert parts.gateway.websockets.session(lambda _: None, "/api/ws", None, "x").settings is fresh


def test_without_a_ledger_setting_there_is_none_and_streams_do_not_ask_for_usage() -> None:
    parts = build_gateway(
        Settings(litellm_base_url=UPSTREAM, usage_ledger=False), reactor, reactor, object()
    )
    assert parts.ledger is None and parts.forwarding.ledger is None
    assert parts.admission.budgets is None
    assert parts.gateway.websockets.counts_usage is False


def test_the_daemons_tree_has_each_service_once(tmp_path: Path) -> None:
    settings = Settings(port=0, database_url=f"sqlite:///{tmp_path}/usage.db")
    service = build_service(settings, reactor)
    kinds = [type(child).__name__ for child in service]
    assert kinds.count("UsageLedger") == kinds.count("HealthProbe") == kinds.count("Drain") == 1
    (ledger,) = [child for child in service if isinstance(child, UsageLedger)]
    probe = next(child for child in service if isinstance(child, HealthProbe))
    assert probe.interval == settings.upstream_probe_seconds
    ledger.database.close()
