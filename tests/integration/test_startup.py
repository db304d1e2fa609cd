"""``twistd -n mpcapi`` refuses a bad configuration with one line that names the key."""

from __future__ import annotations

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
