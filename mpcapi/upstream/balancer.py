"""Several LiteLLM instances behind one client: which are healthy, which is least busy.

``Balancer.pick`` gives the healthy instance with the fewest requests in flight (any
instance when none is healthy: a wrong verdict must not stop all traffic). Requests that
find an instance refusing connections, and ``HealthProbe``'s periodic liveness probes,
take instances out (``went_down``) and put them back (``came_up``); each change is logged
once. With a single instance nothing is probed in the background and ``pick`` is one
attribute read, so the common set-up pays nothing for the feature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from hyperlink import EncodedURL
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mpcapi.config.settings import without_password

log = Logger(namespace="mpcapi.balancer")


def split_urls(text: str) -> list[str]:
    """The instances of a ``LITELLM_BASE_URL`` value: comma-separated, trailing ``/`` dropped."""
    return [part.strip().rstrip("/") for part in text.split(",") if part.strip()]


@attrs.define(eq=False)
class Upstream:
    """One LiteLLM instance and what we know of it."""

    base_url: str
    in_flight: int = 0
    healthy: bool = True
    error: str | None = None  # why it is out (or why its last probe failed)
    status: int | None = None  # HTTP status of its last liveness probe
    latency_ms: float | None = None  # duration of its last liveness probe
    # Parsed URLs by path, filled by the client (parsing per request would cost on the hot path).
    urls: dict[str, EncodedURL] = attrs.field(factory=dict, repr=False)
    # The URL as logs, errors and /health/ready show it: without a password, if it has one.
    name: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.name = without_password(self.base_url)

    def report(self) -> dict[str, Any]:
        return {
            "url": self.name,
            "status": self.status,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "latency_ms": self.latency_ms,
            "error": self.error,
        }


class Balancer:
    """The instances of ``LITELLM_BASE_URL``, their health and their load."""

    def __init__(self, base_urls: Iterable[str]) -> None:
        self.instances: list[Upstream] = []
        self._single: Upstream | None = None
        self._turn = 0  # where the next pick starts looking, so ties take turns
        self.replace(base_urls)

    def replace(self, base_urls: Iterable[str]) -> None:
        """Serve ``base_urls`` from now on; instances that stay keep their counts and health.

        Requests in flight on a dropped instance finish there (they hold their ``Upstream``).
        """
        known = {instance.base_url: instance for instance in self.instances}
        instances = [known.get(url) or Upstream(url) for url in dict.fromkeys(base_urls)]
        if not instances:
            raise ValueError("at least one LiteLLM base URL is needed")
        self.instances = instances
        self._single = instances[0] if len(instances) == 1 else None
        self._turn = 0

    def pick(self, tried: Sequence[Upstream] = ()) -> Upstream | None:
        """The instance for a new request: the healthy one with the fewest requests in flight.

        With ``tried`` (instances that refused this request), only a healthy instance not in
        it, or None. Without, any instance when none is healthy.
        """
        single = self._single
        if single is not None:
            return None if tried else single
        instances = self.instances
        count = len(instances)
        start = self._turn
        self._turn = (start + 1) % count
        best: Upstream | None = None
        fallback: Upstream | None = None
        for offset in range(count):
            instance = instances[(start + offset) % count]
            if tried and instance in tried:
                continue
            if instance.healthy:
                if best is None or instance.in_flight < best.in_flight:
                    best = instance
            elif fallback is None or instance.in_flight < fallback.in_flight:
                fallback = instance
        if best is None and not tried:
            return fallback
        return best

    def went_down(self, instance: Upstream, reason: str) -> None:
        """Take ``instance`` out (a refused connection, a failed probe)."""
        instance.error = reason
        if instance.healthy:
            instance.healthy = False
            # Our reasons start with "LiteLLM at <url>": not twice in one line.
            why = reason.removeprefix(f"LiteLLM at {instance.name} ")
            log.warn(
                "LiteLLM at {upstream} is out: it {why}",
                upstream=instance.name,
                why=why,
                reason=reason,
            )

    def came_up(self, instance: Upstream) -> None:
        """Put ``instance`` back (its liveness probe answered)."""
        instance.error = None
        if not instance.healthy:
            instance.healthy = True
            log.info("LiteLLM at {upstream} is back in", upstream=instance.name)

    @property
    def ready(self) -> bool:
        return any(instance.healthy for instance in self.instances)

    def report(self) -> list[dict[str, Any]]:
        return [instance.report() for instance in self.instances]


class HealthProbe(Service):
    """Probes every instance each ``interval`` seconds while there are several of them.

    ``probe_all`` returns a Deferred that fires when the round is over; the next round starts
    ``interval`` seconds after that, so a slow instance never piles rounds up.
    """

    def __init__(
        self,
        balancer: Balancer,
        probe_all: Callable[[], defer.Deferred[Any]],
        clock: IReactorTime,
        interval: float,
    ) -> None:
        self._balancer = balancer
        self._probe_all = probe_all
        self._clock = clock
        self.interval = interval
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._start()

    def stopService(self) -> Any:
        super().stopService()
        self._stop()
        return None

    def set_interval(self, interval: float) -> None:
        """Probe every ``interval`` seconds from now on (a reloaded configuration)."""
        if interval != self.interval:
            self.interval = interval
            if self.running:
                self._stop()
                self._start()

    def _start(self) -> None:
        self._loop = task.LoopingCall(self._round)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda failure: log.failure("the upstream health probe stopped", failure)
        )

    def _stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _round(self) -> defer.Deferred[Any] | None:
        if len(self._balancer.instances) < 2:
            return None  # one instance gets every request anyway; /health/ready probes it
        round_ = self._probe_all()
        round_.addErrback(lambda failure: log.failure("upstream health probe failed", failure))
        return round_


__all__ = ["Balancer", "HealthProbe", "Upstream", "split_urls"]
