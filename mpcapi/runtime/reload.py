"""SIGHUP: read the configuration again and apply what can change while serving.

``Reloader.reload`` reads every source as at start (the TOML file, ``.env``, the
environment, the original options) in a thread, so the reactor never waits on a file. A
configuration that does not load is logged as one error and the running one stays. Of a
good one, the settings in ``LIVE`` apply at once to new requests (requests and streams
in flight finish as they began; no connection is dropped); every other change is logged
as needing a restart and keeps its running value. ``ReloadOnSighup`` runs it on SIGHUP.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from mpcapi.config.live import LiveSettings
from mpcapi.config.settings import SETTINGS, ConfigError, Settings
from mpcapi.runtime.logs import LogSwitch

log = Logger(namespace="mpcapi.reload")

# What a reload changes in a running daemon; the rest (ports, workers, databases, Redis,
# the cache, body and connection limits…) is wired into long-lived objects at start.
LIVE = frozenset(
    {
        "litellm_base_url",
        "litellm_api_key",
        "litellm_timeout",
        "ready_timeout",
        "upstream_probe_seconds",
        "default_rpm",
        "default_tpm",
        "admin_key",
        "metrics_public",
        "env",
        "log_format",
    }
)
_SECRETS = frozenset(setting.name for setting in SETTINGS if setting.secret)

Loader = Callable[[], Settings]


@attrs.define
class Reloader:
    """Applies a fresh configuration to one running gateway (one process)."""

    load: Loader  # the start-up loader: same options, environment, file and .env
    run_blocking: Callable[[Loader], defer.Deferred[Settings]]  # in a thread, in the daemon
    live: LiveSettings  # what is in force now; every part reads it, or hears of a change
    # The log observer, once twistd has installed it (None: twistd's own text observer).
    logs_of: Callable[[], LogSwitch | None] = lambda: None
    _lock: defer.DeferredLock = attrs.field(factory=defer.DeferredLock, init=False)

    async def reload(self) -> bool:
        """Read and apply the configuration; False (and the old one stays) when it is bad."""
        await self._lock.acquire()  # two quick SIGHUPs: one reload after the other
        try:
            return await self._reload()
        finally:
            self._lock.release()

    async def _reload(self) -> bool:
        try:
            fresh = await self.run_blocking(self.load)
        except ConfigError as error:
            log.error(
                "configuration reload failed, the running configuration stays: {error}",
                error=str(error),
            )
            return False
        old = self.live.current
        changed = [s.name for s in SETTINGS if getattr(old, s.name) != getattr(fresh, s.name)]
        live = [name for name in changed if name in LIVE]
        later = [name for name in changed if name not in LIVE]
        if bool(old.litellm_api_key) != bool(fresh.litellm_api_key):
            # Our key or the clients' own: who LiteLLM bills, and how answers are cached.
            live.remove("litellm_api_key")
            later.append("litellm_api_key")
        if "log_format" in live and self.logs_of() is None:
            live.remove("log_format")  # twistd's own observer (--logfile, --syslog) is in use
            later.append("log_format")
        applied = attrs.evolve(old, **{name: getattr(fresh, name) for name in live})
        self.live.replace(applied)
        logs = self.logs_of()
        if logs is not None:
            logs.use(applied.log_format)
        log.info(
            "configuration reloaded; applied: {applied}",
            applied=", ".join(_shown(name, applied) for name in live) or "no change",
        )
        if later:
            log.warn(
                "configuration reloaded; needs a restart (the running value stays): {names}",
                names=", ".join(later),
            )
        return True


def _shown(name: str, settings: Settings) -> str:
    value = getattr(settings, name)
    return f"{name}=***" if name in _SECRETS and value else f"{name}={value}"


class ReloadOnSighup(Service):
    """Runs ``reload`` when the process gets SIGHUP (the supervisor passes it to workers)."""

    def __init__(self, reactor: Any, reload: Callable[[], Any]) -> None:
        self._reactor = reactor
        self._reload = reload

    def startService(self) -> None:
        super().startService()
        # Stays installed while stopping: a SIGHUP during the drain must not kill the process.
        signal.signal(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        # A signal handler may interrupt the reactor anywhere: hand over to its thread.
        self._reactor.callFromThread(self._run)

    def _run(self) -> None:
        log.info("SIGHUP received: reloading the configuration")
        d = defer.maybeDeferred(self._reload)
        d.addErrback(lambda failure: log.failure("configuration reload failed", failure))


__all__ = ["LIVE", "ReloadOnSighup", "Reloader"]
