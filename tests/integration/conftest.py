"""Fixtures of the integration tests (the tools themselves are in ``harness``).

- ``litellm`` (session): a real LiteLLM proxy with the mock models of etc/litellm/config.yaml and
  the ``standin-*`` models of litellm_standin_models.yaml, which call ``standin_provider``.
- ``standin_provider`` (session): the stand-in provider (tests/support/standin.py) on a thread.
- ``mpcapi`` (session): one ``twistd -n mpcapi`` in front of it, for tests needing nothing special.
- ``start_mpcapi(*args, **env)``: a daemon of the test's own, with environment overrides.
- ``dead_upstream_url``, ``stalled_upstream_url``, ``fake_upstream``: stand-in upstreams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.standin import StandIn, running_standin

from . import harness
from .harness import Daemon, DaemonLauncher, FakeUpstream, LiteLLM


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration carries the ``integration`` marker."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def standin_provider() -> Iterator[StandIn]:
    """The stand-in provider that LiteLLM's ``standin-*`` models call."""
    with running_standin() as running:
        yield running


@pytest.fixture(scope="session")
def litellm(
    standin_provider: StandIn, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiteLLM]:
    directory = tmp_path_factory.mktemp("litellm")
    config = harness.write_standin_config(directory / "config.yaml", standin_provider.url)
    with harness.running_litellm(directory / "litellm.log", config) as running:
        yield running


@pytest.fixture(scope="session")
def mpcapi(litellm: LiteLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The shared daemon, in front of ``litellm`` with its master key."""
    root = tmp_path_factory.mktemp("mpcapi-shared")
    launcher = DaemonLauncher(root, harness.daemon_defaults(litellm))
    try:
        yield launcher.start()
    finally:
        launcher.stop_all()


@pytest.fixture
def mpcapi_launcher(litellm: LiteLLM, tmp_path: Path) -> Iterator[DaemonLauncher]:
    launcher = DaemonLauncher(tmp_path, harness.daemon_defaults(litellm))
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture
def start_mpcapi(mpcapi_launcher: DaemonLauncher) -> Callable[..., Daemon]:
    """``start_mpcapi(*twistd_args, **env)``: a daemon of this test's own, in front of
    ``litellm`` unless ``env`` says otherwise, stopped when the test ends."""
    return mpcapi_launcher.start


@pytest.fixture
def dead_upstream_url() -> Iterator[str]:
    with harness.dead_upstream() as url:
        yield url


@pytest.fixture
def stalled_upstream_url() -> Iterator[str]:
    with harness.stalled_upstream() as url:
        yield url


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    with harness.fake_upstream() as upstream:
        yield upstream
