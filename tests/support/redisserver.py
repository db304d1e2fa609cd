"""A ``redis-server`` of a test's own (free port, no persistence, optionally a password), which
the test can stop, kill and start again; and a port where nothing listens. For the unit and
integration tests of Redis outages (the shared Redis at 127.0.0.1:6379 is never stopped)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.ports import free_port

REDIS_SERVER = shutil.which("redis-server")
SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


class RedisServer:
    """A ``redis-server`` of the test's own, which it can stop, kill and start again; with a
    ``password``, clients must AUTH (and ``url`` carries it)."""

    def __init__(self, port: int, password: str | None = None) -> None:
        self.port = port
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        ping = b"PING\r\n"
        if self.password:
            ping = f"AUTH {self.password}\r\n".encode() + ping
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(ping)
                    answer = b""
                    while b"\r\n" not in answer.removeprefix(b"+OK\r\n"):
                        data = sock.recv(64)
                        if not data:
                            break
                        answer += data
                    if answer.endswith(b"+PONG\r\n"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, every client connection reset."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
