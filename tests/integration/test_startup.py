"""``twistd -n mpcapi`` refuses a bad configuration with one line that names the key."""

from __future__ import annotations

import socket

import pytest

from tests.support.ports import free_port

from .harness import DaemonLauncher


def test_bad_port_stops_start_up(mpcapi_launcher: DaemonLauncher) -> None:
    result = mpcapi_launcher.run(PORT="abc")
    assert result.returncode != 0, result.stdout + result.stderr
    assert any("PORT" in line for line in result.stderr.splitlines()), result.stderr
    assert "Traceback" not in result.stderr


def test_bad_litellm_url_stops_start_up(mpcapi_launcher: DaemonLauncher) -> None:
    result = mpcapi_launcher.run(LITELLM_BASE_URL="not a url")
    assert result.returncode != 0, result.stdout + result.stderr
    assert any("LITELLM_BASE_URL" in line for line in result.stderr.splitlines()), result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_stops_start_up_with_one_line(
    mpcapi_launcher: DaemonLauncher, workers: str
) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = mpcapi_launcher.run(PORT=str(port), MPCAPI_WORKERS=workers)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"mpcapi: cannot listen on 127.0.0.1:{port}: address already in use"
    ]
    assert "Traceback" not in result.stdout + result.stderr
