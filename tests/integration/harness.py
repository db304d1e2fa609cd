"""Test tools of the integration tests: real processes and stand-in servers on loopback ports.

- ``running_litellm``: the LiteLLM proxy of ``.venv-litellm`` with ``etc/litellm/config.yaml``
  (offline mock models); ``ensure_litellm_installed`` creates ``.venv-litellm`` like scripts/test.
  ``write_standin_config`` adds the models of litellm_standin_models.yaml, which LiteLLM really
  calls at the stand-in provider of tests/support/standin.py (the ``litellm`` fixture uses it).
  ``LiteLLMServer`` is the same proxy on a fixed port, which a test can kill and start again.
- ``DaemonLauncher``: ``twistd -n mpcapi`` subprocesses, each in its own working directory with
  its output in files; ``Daemon`` is one of them.
- Stand-in upstreams for the faults LiteLLM cannot produce on demand: ``dead_upstream``
  (nothing listens), ``stalled_upstream`` (accepts, never answers), ``fake_upstream`` (answers
  what the test says and records what it received).

Every wait is bounded; every context manager stops what it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import yaml
from openai.types.chat import ChatCompletionMessageParam

from tests.support.httpserver import serving
from tests.support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
LITELLM_VENV = REPO_ROOT / ".venv-litellm"
LITELLM_BIN = LITELLM_VENV / "bin" / "litellm"
LITELLM_CONFIG = REPO_ROOT / "etc" / "litellm" / "config.yaml"
# A `{standin}` in it stands for the stand-in provider's URL (tests/support/standin.py).
LITELLM_STANDIN_MODELS = Path(__file__).with_name("litellm_standin_models.yaml")
LITELLM_REQUIREMENTS = REPO_ROOT / "etc" / "litellm" / "requirements.txt"
LITELLM_LIVENESS_PATH = "/health/liveliness"
LITELLM_MASTER_KEY = "sk-mpcapi-test-master"
# twistd of the virtualenv that runs pytest (not resolved: a venv's python is a symlink).
TWISTD = Path(sys.executable).parent / "twistd"

# What the mock models of etc/litellm/config.yaml answer.
MOCK_TEXT = "Hello from the MPC-API mock model."
MOCK_EMBEDDING = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
# The seed README's chat request.
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello!"}]

LITELLM_INSTALL_TIMEOUT = 900.0
LITELLM_START_TIMEOUT = 120.0
MPCAPI_START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# Variables of the caller's environment that would change how a daemon under test behaves.
_DAEMON_ENV_PREFIXES = ("MPCAPI_", "LITELLM_")
_DAEMON_ENV_NAMES = ("PORT", "NODE_ENV", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


class HarnessError(Exception):
    """A process of the harness did not start or stop as expected."""


# --- processes ----------------------------------------------------------------------------------


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of ``GET url``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_for_http_200(
    url: str, process: subprocess.Popen[bytes], timeout: float, log: Path
) -> None:
    """Wait until ``GET url`` answers 200; give up early when ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_status(url) == 200:
            return
        if process.poll() is not None:
            raise HarnessError(f"{process.args!r} exited with {process.returncode}:\n{tail(log)}")
        time.sleep(0.2)
    raise HarnessError(f"{url} did not answer 200 within {timeout:.0f} s:\n{tail(log)}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still there after STOP_TIMEOUT."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


# --- LiteLLM ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiteLLM:
    url: str
    key: str
    log: Path


def ensure_litellm_installed() -> None:
    """Create .venv-litellm like scripts/test does, so that a plain ``pytest`` works too."""
    if LITELLM_BIN.exists():
        return
    python = shutil.which("python3") or sys.executable
    pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    steps = [
        [python, "-m", "venv", str(LITELLM_VENV)],
        [*pip, "--disable-pip-version-check", "-r", str(LITELLM_REQUIREMENTS)],
    ]
    for step in steps:
        subprocess.run(step, check=True, timeout=LITELLM_INSTALL_TIMEOUT, stdin=subprocess.DEVNULL)


class LiteLLMServer:
    """A LiteLLM proxy of ``.venv-litellm`` on one port, which a test can kill (SIGKILL, as a
    crash) and start again on the same port. Its output goes to ``log`` (appended on restart)."""

    def __init__(self, log: Path, config: Path = LITELLM_CONFIG, port: int | None = None) -> None:
        self.log = log
        self.config = config
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it and wait until it answers its liveness probe."""
        ensure_litellm_installed()
        env = {
            **os.environ,
            "LITELLM_MASTER_KEY": LITELLM_MASTER_KEY,
            # Do not fetch the model price list from the internet at start.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        }
        command = [str(LITELLM_BIN), "--config", str(self.config)]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for kill()
            )
        url = self.url + LITELLM_LIVENESS_PATH
        wait_for_http_200(url, self.process, LITELLM_START_TIMEOUT, self.log)

    def kill(self) -> None:
        """SIGKILL its whole process group at once: no shutdown, connections reset."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None


def write_standin_config(path: Path, standin_url: str, base: Path = LITELLM_CONFIG) -> Path:
    """Write to ``path`` the LiteLLM config ``base`` with the stand-in models of
    LITELLM_STANDIN_MODELS added to its model list, their ``api_base`` at ``standin_url``."""
    config = yaml.safe_load(base.read_text())
    text = LITELLM_STANDIN_MODELS.read_text().replace("{standin}", standin_url)
    config["model_list"] = [*config["model_list"], *yaml.safe_load(text)]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextmanager
def running_litellm(log: Path, config: Path = LITELLM_CONFIG) -> Iterator[LiteLLM]:
    """A LiteLLM proxy on a free port, answering its liveness probe; stopped on exit."""
    server = LiteLLMServer(log, config)
    try:
        server.start()
        yield LiteLLM(url=server.url, key=LITELLM_MASTER_KEY, log=log)
    finally:
        server.stop()


# --- MPC-API ------------------------------------------------------------------------------------


@dataclass
class Daemon:
    """A running ``twistd -n mpcapi``."""

    url: str
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    @property
    def api_base(self) -> str:
        return self.url + "/api"

    def log_text(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        """The log once it contains ``text``, or after ``timeout`` (log events may trail the
        response a little)."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_text()
            if text in log or time.monotonic() > deadline:
                return log
            time.sleep(0.1)


def daemon_environment(overrides: Mapping[str, str | None]) -> dict[str, str]:
    """The caller's environment without MPCAPI_*, LITELLM_*, PORT and the like, with
    ``overrides`` applied; an override of None removes the name."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(_DAEMON_ENV_PREFIXES) and name not in _DAEMON_ENV_NAMES
    }
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@dataclass
class DaemonLauncher:
    """Starts daemons, each in a new directory under ``root`` (so no ``.env`` or ``etc/`` of the
    repository is read), with ``defaults`` in their environment; ``stop_all`` stops them."""

    root: Path
    defaults: dict[str, str]
    daemons: list[Daemon] = field(default_factory=list)
    _runs: int = 0

    def _workdir(self) -> Path:
        self._runs += 1
        workdir = self.root / f"mpcapi-{self._runs}"
        workdir.mkdir()
        return workdir

    def _command(self, args: tuple[str, ...]) -> list[str]:
        return [str(TWISTD), "-n", "--pidfile=", "mpcapi", *args]

    def start(self, *args: str, **env: str | None) -> Daemon:
        """Start a daemon on a free port (``env`` over the defaults; a value of None unsets the
        variable), and wait until its GET /health answers 200."""
        port = free_port()
        workdir = self._workdir()
        environment = daemon_environment({**self.defaults, "PORT": str(port), **env})
        stdout, stderr = workdir / "stdout.log", workdir / "stderr.log"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                self._command(args),
                cwd=workdir,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        daemon = Daemon(f"http://127.0.0.1:{port}", process, stdout, stderr)
        self.daemons.append(daemon)
        try:
            wait_for_http_200(daemon.url + "/health", process, MPCAPI_START_TIMEOUT, stdout)
        except HarnessError as error:
            raise HarnessError(f"{error}\nstderr:\n{tail(stderr)}") from None
        return daemon

    def run(
        self, *args: str, timeout: float = 30.0, **env: str | None
    ) -> subprocess.CompletedProcess[str]:
        """Run a daemon that should exit by itself (a bad configuration, ``--help``)."""
        return subprocess.run(
            self._command(args),
            cwd=self._workdir(),
            env=daemon_environment({**self.defaults, **env}),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop_all(self) -> None:
        for daemon in self.daemons:
            stop_process(daemon.process)
        self.daemons.clear()


def daemon_defaults(litellm: LiteLLM) -> dict[str, str]:
    """The environment of a daemon in front of ``litellm``, with its master key."""
    return {
        "MPCAPI_HOST": "127.0.0.1",
        "MPCAPI_ENV": "development",
        "LITELLM_BASE_URL": litellm.url,
        "LITELLM_API_KEY": litellm.key,
    }


# --- stand-in upstreams -------------------------------------------------------------------------


@contextmanager
def dead_upstream() -> Iterator[str]:
    """A URL where nothing listens. The port stays bound (so nobody else takes it) but does not
    listen, so connections are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextmanager
def stalled_upstream() -> Iterator[str]:
    """A URL whose server accepts connections and then neither answers nor closes them."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    stop = threading.Event()
    accepted: list[socket.socket] = []

    def hold_connections() -> None:
        while not stop.is_set():
            readable, _, _ = select.select([server], [], [], 0.1)
            if readable:
                connection, _ = server.accept()
                accepted.append(connection)

    thread = threading.Thread(target=hold_connections, name="stalled-upstream", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=STOP_TIMEOUT)
        for connection in accepted:
            connection.close()
        server.close()


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class FakeUpstream:
    """What the fake upstream answers to every request, and what it has received."""

    url: str = ""
    status: int = 200
    body: Any = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)

    def answer(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        """Answer from now on with ``status``, ``body`` (as JSON) and ``headers``."""
        self.status, self.body, self.headers = status, body, dict(headers or {})


def _fake_upstream_handler(upstream: FakeUpstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            upstream.requests.append(RecordedRequest(self.command, self.path, headers, body))
            payload = json.dumps(upstream.body).encode()
            self.send_response(upstream.status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            for name, value in upstream.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def fake_upstream() -> Iterator[FakeUpstream]:
    """An HTTP server that answers every request as its ``FakeUpstream`` says (200 ``{}`` until
    told otherwise) and records the requests."""
    upstream = FakeUpstream()
    with serving(_fake_upstream_handler(upstream), "fake-upstream") as url:
        upstream.url = url
        yield upstream


# A request line of the log, in text ("] POST /api/x 500 ") or JSON ("message":"POST …").
_ANSWERED_500 = re.compile(r'(?:\] |"message":")[A-Z]+ \S+ 500 ')


def answered_500(log: str) -> bool:
    """Whether a daemon's log has a request answered 500 (its request line, not any " 500 ":
    "replayed 500 usage rows" is no error)."""
    return _ANSWERED_500.search(log) is not None


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` every 0.1 s until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()
