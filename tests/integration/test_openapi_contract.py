"""schemathesis against GET /openapi.json of a real daemon in front of LiteLLM's mock models:
every check, zero failures, with client keys off (the default) and on.

The runs are bounded (examples per operation, total time, request timeout); a failing run's
report names every failing request with a curl command to reproduce it. The settings that are
not defaults are explained in ``CONFIG``: LiteLLM's 400 for a model it does not serve counts as
an accepted answer to a schema-valid body, LiteLLM's own failures relayed as 502 are not ours,
and the keys of the two security schemes. The WebSocket routes are left to test_websocket.py
(schemathesis speaks plain HTTP).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import Daemon, http_status

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
MPCAPI_ADMIN = Path(sys.executable).parent / "mpcapi-admin"
ADMIN_KEY = "sk-admin-schemathesis"
MAX_EXAMPLES = 10
MAX_SECONDS = 45
RUN_TIMEOUT = 240.0
CONFIG = """\
# A schema-valid body may still name a model that LiteLLM does not serve (the schema cannot
# know LiteLLM's model list): LiteLLM answers 400 "Invalid model name", which MPC-API relays
# unchanged, as the HTTP contract says. Every other expectation of the check is its default.
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]

# LiteLLM itself answers some schema-valid fuzzed bodies with a 500 (its mock models crash
# on them: "'list' object has no attribute '__aiter__'"); MPC-API relays that as the 502 of
# the HTTP contract. A 500 of our own, a 503 or a 504 still fails the run.
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "502"]
# The bearer tokens of the security schemes of /openapi.json.
[auth.openapi.adminKey]
bearer = "{admin_key}"
{client_key_section}
"""


def test_openapi_document_is_served(start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start_mpcapi()
    assert http_status(daemon.url + "/openapi.json") == 200


def create_client_key(database_url: str) -> str:
    """A client key made with ``mpcapi-admin keys create`` (its secret, from its output)."""
    result = subprocess.run(
        [str(MPCAPI_ADMIN), "--database-url", database_url, "keys", "create", "--user", "st"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    secrets = [word for word in result.stdout.split() if word.startswith("sk-")]
    assert len(secrets) == 1, result.stdout
    return secrets[0]


@pytest.mark.parametrize("auth", ["off", "keys"])
def test_schemathesis_finds_no_failures(
    start_mpcapi: Callable[..., Daemon], tmp_path: Path, auth: str
) -> None:
    database_url = f"sqlite:///{tmp_path / 'keys.db'}"
    client_key_section = ""
    if auth == "keys":
        client_key = create_client_key(database_url)
        client_key_section = f'[auth.openapi.clientKey]\nbearer = "{client_key}"\n'
    daemon = start_mpcapi(
        MPCAPI_ADMIN_KEY=ADMIN_KEY, MPCAPI_AUTH=auth, MPCAPI_DATABASE_URL=database_url
    )
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(admin_key=ADMIN_KEY, client_key_section=client_key_section))
    command = [
        str(SCHEMATHESIS),
        "--config-file",
        str(config),
        "run",
        f"{daemon.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--max-time",
        str(MAX_SECONDS),
        "--request-timeout",
        "20",
        # One worker: hypothesis's strategies run in the main thread (deeper C stack; in a
        # worker thread CPython 3.11 once hit "AST constructor recursion depth mismatch").
        "--workers",
        "1",
        "--seed",
        "20261127",
        "--report-dir",
        str(tmp_path / "report"),
        # The admin API is stateful (a DELETE of a key revokes it and keeps it readable; a
        # body may name a team that does not exist): tests/integration/test_tenancy.py and
        # tests/unit/policy/test_tenancy.py cover it, every refusal included.
        "--exclude-path-regex",
        "/ws$|^/admin/",
        "--no-color",
    ]
    result = subprocess.run(
        command,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    output = result.stdout + result.stderr
    (tmp_path / "schemathesis.txt").write_text(output)  # the whole report, for a failed run
    assert result.returncode == 0, output[:3000] + "\n…\n" + output[-15000:]
    # schemathesis exits non-zero on any failing check; "passed" shows that checks ran.
    assert " passed" in output, output[-5000:]
