"""``python -m mpcapi.config`` and scripts/run: a bad setting stops the start at once, with the
daemon's own message, before scripts/run spends seconds starting a LiteLLM."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest

from mpcapi.config.__main__ import main
from mpcapi.config.settings import CONFIG_ENV, SETTINGS

ROOT = Path(__file__).resolve().parents[3]
VARIABLES = {CONFIG_ENV, *(variable for setting in SETTINGS for variable in setting.env)}


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No MPC-API variable from the test's own environment, and no .env (tmp_path is empty)."""
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_a_usable_configuration_passes_silently(
    clean: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean.setenv("PORT", "3001")
    assert main(["--litellm-timeout", "5"]) == 0
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("environ", "argv", "message"),
    [
        ({"PORT": "abc"}, [], "mpcapi: configuration error: PORT: 'abc' is not an integer"),
        ({"PORT": "3001"}, ["--port", "abc"], "mpcapi: configuration error: --port: "),
        # Checked as the daemon checks it, beyond the settings themselves.
        ({"MPCAPI_PRICES": "missing.toml"}, [], "mpcapi: configuration error: MPCAPI_PRICES: "),
        ({}, ["--no-such-option"], "mpcapi: option --no-such-option not recognized"),
    ],
)
def test_a_bad_configuration_exits_2_with_one_line(
    clean: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    environ: dict[str, str],
    argv: list[str],
    message: str,
) -> None:
    for variable, value in environ.items():
        clean.setenv(variable, value)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(message)
    assert err.count("\n") == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def listens(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@attrs.frozen
class Run:
    status: int
    stderr: str
    seconds: float
    litellm_listened: bool  # on the LITELLM_PORT it was given, at any time during the run
    litellm_logged: bool  # its log, $TMPDIR/mpcapi-litellm-<port>.log, was created


def run_script(tmp_path: Path, **environ: str) -> Run:
    """scripts/run with ``environ`` and no LITELLM_BASE_URL, so that it would start its own
    LiteLLM (on a free port, logging into tmp_path)."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("scripts/run uses the checkout's .venv; these tests run from another one")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in VARIABLES}
    env.update(TMPDIR=str(tmp_path), LITELLM_PORT=str(port), **environ)
    started = time.monotonic()
    process = subprocess.Popen(
        [str(ROOT / "scripts" / "run")],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    listened = False
    try:
        while process.poll() is None and time.monotonic() - started < 60:
            listened = listened or listens(port)
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.terminate()  # its own trap stops what it started
        _, stderr = process.communicate(timeout=30)
    return Run(
        status=process.returncode,
        stderr=stderr,
        seconds=time.monotonic() - started,
        litellm_listened=listened,
        litellm_logged=(tmp_path / f"mpcapi-litellm-{port}.log").exists(),
    )


def test_scripts_run_stops_on_a_bad_setting_before_starting_litellm(tmp_path: Path) -> None:
    run = run_script(tmp_path, PORT="abc")
    assert run.status == 2, run.stderr
    assert run.stderr.splitlines() == ["mpcapi: configuration error: PORT: 'abc' is not an integer"]
    assert run.seconds < 10  # LiteLLM alone takes longer than that to start
    assert not run.litellm_listened
    assert not run.litellm_logged


def test_scripts_run_checks_with_the_url_of_the_litellm_it_would_start(tmp_path: Path) -> None:
    # The file's URL is unusable, but the LiteLLM of scripts/run replaces it (the environment beats
    # the file): the check must report the next bad value, not this one.
    config = tmp_path / "mpcapi.toml"
    config.write_text('litellm_base_url = "not a url"\n')
    run = run_script(tmp_path, MPCAPI_CONFIG=str(config), MPCAPI_READY_TIMEOUT="0")
    assert run.status == 2, run.stderr
    assert run.stderr.splitlines()[-1].startswith(
        "mpcapi: configuration error: MPCAPI_READY_TIMEOUT: "
    )
    assert not run.litellm_logged
