"""Configuration: one frozen ``Settings``, built once at start.

Sources, weakest first: built-in defaults < the TOML file (``MPCAPI_CONFIG`` or
``--config``) < a ``.env`` file in the working directory < the real environment <
twistd options. ``SETTINGS`` is the single table that feeds the twistd options, the
environment lookup, the TOML keys and ``--help``.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from dotenv import dotenv_values
from hyperlink import DecodedURL

from mpcapi.errors import ERROR_FORMATS, ErrorFormat

LOG_FORMATS = ("text", "json")


class ConfigError(Exception):
    """A configuration value is unusable; the message names the key."""


def _port(raw: Any) -> int:
    value = _integer(raw)
    if not 0 <= value <= 65535:
        raise ValueError(f"{raw!r} is not a port number (0-65535)")
    return value


def _integer(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError(f"{raw!r} is not an integer")
    if isinstance(raw, int):
        return raw
    try:
        return int(str(raw).strip())
    except ValueError:
        raise ValueError(f"{raw!r} is not an integer") from None


def _positive_int(raw: Any) -> int:
    value = _integer(raw)
    if value < 1:
        raise ValueError(f"{raw!r} must be at least 1")
    return value


def _positive_seconds(raw: Any) -> float:
    try:
        value = float(str(raw).strip()) if not isinstance(raw, int | float) else float(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not a number of seconds") from None
    if isinstance(raw, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{raw!r} must be a positive number of seconds")
    return value


def _url(raw: Any) -> str:
    text = str(raw).strip()
    try:
        url = DecodedURL.from_text(text)
    except Exception:
        raise ValueError(f"{text!r} is not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{text!r} must be an http:// or https:// URL with a host")
    return text.rstrip("/")


def _optional_url(raw: Any) -> str:
    return _url(raw) if str(raw).strip() else ""


def _urls(raw: Any) -> str:
    """One URL, or several separated by commas (LiteLLM instances sharing the load)."""
    parts = [part for part in str(raw).split(",") if part.strip()]
    if not parts:
        raise ValueError("must name at least one URL")
    urls = [_url(part) for part in parts]
    if len(set(urls)) != len(urls):
        raise ValueError(f"{str(raw).strip()!r} names a URL twice")
    return ",".join(urls)


def _text(raw: Any) -> str:
    return str(raw).strip()


def _non_empty(raw: Any) -> str:
    text = _text(raw)
    if not text:
        raise ValueError("must not be empty")
    return text


def _workers(raw: Any) -> int:
    if str(raw).strip().lower() == "auto":
        return os.cpu_count() or 1
    return _positive_int(raw)


def _non_negative_int(raw: Any) -> int:
    if str(raw).strip() == "":
        return 0
    value = _integer(raw)
    if value < 0:
        raise ValueError(f"{raw!r} must be 0 or more")
    return value


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{raw!r} is not true or false")


def _one_of(*choices: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        text = str(raw).strip().lower()
        if text not in choices:
            raise ValueError(f"{raw!r} is not one of: {', '.join(choices)}")
        return text

    return parse


def _database_url(raw: Any) -> str:
    text = str(raw).strip()
    if not text.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ValueError(f"{text!r} must start with sqlite:/// or postgresql://")
    return text


def without_password(url: str) -> str:
    """``url`` with the password of its user part (``user:password@``) masked."""
    scheme, separator, rest = url.partition("://")
    user_part, at, host_part = rest.rpartition("@")
    if not separator or not at or ":" not in user_part:
        return url
    return f"{scheme}://{user_part.split(':', 1)[0]}:***@{host_part}"


def _redis_url(raw: Any) -> str:
    text = str(raw).strip()
    if text and not text.startswith(("redis://", "unix://")):
        raise ValueError(f"{text!r} must be empty or start with redis://")
    return text


def _log_format(raw: Any) -> str:
    text = _text(raw).lower()
    if text not in ("", *LOG_FORMATS):
        raise ValueError(f"{raw!r} is not one of: {', '.join(LOG_FORMATS)}")
    return text


@attrs.frozen
class Setting:
    """One configuration key: its name everywhere, its default and its parser."""

    name: str
    env: tuple[str, ...]
    default: Any
    parse: Callable[[Any], Any]
    help: str
    secret: bool = False

    @property
    def option(self) -> str:
        return self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("port", ("PORT",), 3000, _port, "TCP port to listen on"),
    Setting("host", ("MPCAPI_HOST",), "0.0.0.0", _non_empty, "interface to listen on"),
    Setting(
        "litellm_base_url",
        ("LITELLM_BASE_URL",),
        "http://litellm:4000",
        _urls,
        "base URL of the LiteLLM Gateway (a path prefix is kept); several, comma-separated: "
        "requests go to the least busy healthy one",
    ),
    Setting(
        "litellm_api_key",
        ("LITELLM_API_KEY",),
        "",
        _text,
        "key sent to LiteLLM as Bearer; empty: the client's Authorization passes through",
        secret=True,
    ),
    Setting(
        "litellm_timeout",
        ("LITELLM_TIMEOUT",),
        600.0,
        _positive_seconds,
        "seconds to wait for LiteLLM's response headers and between body chunks",
    ),
    Setting(
        "connect_timeout",
        ("MPCAPI_CONNECT_TIMEOUT",),
        10.0,
        _positive_seconds,
        "seconds to wait for a TCP connection to LiteLLM",
    ),
    Setting(
        "ready_timeout",
        ("MPCAPI_READY_TIMEOUT",),
        2.0,
        _positive_seconds,
        "seconds LiteLLM's liveness probe may take before /health/ready says 503",
    ),
    Setting(
        "upstream_probe_seconds",
        ("MPCAPI_UPSTREAM_PROBE_SECONDS",),
        5.0,
        _positive_seconds,
        "with several LiteLLM base URLs, seconds between liveness probes of each instance",
    ),
    Setting(
        "pool_size",
        ("MPCAPI_POOL_SIZE",),
        256,
        _positive_int,
        "idle persistent connections kept open to LiteLLM",
    ),
    Setting(
        "max_body_bytes",
        ("MPCAPI_MAX_BODY_BYTES",),
        32 * 1024 * 1024,
        _positive_int,
        "largest accepted request body in bytes (larger: 413)",
    ),
    Setting(
        "read_timeout",
        ("MPCAPI_READ_TIMEOUT",),
        30.0,
        _positive_seconds,
        "seconds a client may take to send a request's headers and body (then 408)",
    ),
    Setting(
        "idle_timeout",
        ("MPCAPI_IDLE_TIMEOUT",),
        60.0,
        _positive_seconds,
        "seconds an idle keep-alive connection stays open",
    ),
    Setting(
        "max_connections",
        ("MPCAPI_MAX_CONNECTIONS",),
        10000,
        _positive_int,
        "open client connections per worker; more get 503 and are closed",
    ),
    Setting(
        "drain_seconds",
        ("MPCAPI_DRAIN_SECONDS",),
        30.0,
        _positive_seconds,
        "on SIGTERM, how long in-flight requests and streams may take to finish",
    ),
    Setting(
        "cors_origins",
        ("MPCAPI_CORS_ORIGINS",),
        "",
        _text,
        "browser origins allowed to call the API, comma-separated ('*': any); empty: CORS off",
    ),
    Setting(
        "error_format",
        ("MPCAPI_ERROR_FORMAT",),
        "openai",
        _one_of(*ERROR_FORMATS),
        "MPC-API's own error bodies: openai ({error: {message, type, param, code}, ...}, what "
        "the SDKs read) or seed (the flat {error, message, request_id} of the Express service)",
    ),
    Setting(
        "workers",
        ("MPCAPI_WORKERS",),
        1,
        _workers,
        "worker processes sharing the port; 'auto' = one per CPU core",
    ),
    Setting(
        "auth",
        ("MPCAPI_AUTH",),
        "off",
        _one_of("off", "keys"),
        "off: open, as the seed; keys: /api and /v1 need a client key (mpcapi-admin keys create)",
    ),
    Setting(
        "database_url",
        ("MPCAPI_DATABASE_URL",),
        "sqlite:///mpcapi.db",
        _database_url,
        "client keys, teams and usage: sqlite:///<path> (relative: working directory) or "
        "postgresql://",
    ),
    Setting(
        "admin_key",
        ("MPCAPI_ADMIN_KEY",),
        "",
        _text,
        "key of the admin surfaces (usage, metrics, dashboard, /admin/keys, /admin/teams); "
        "empty: they are closed",
        secret=True,
    ),
    Setting(
        "default_rpm",
        ("MPCAPI_DEFAULT_RPM",),
        0,
        _non_negative_int,
        "requests per minute for keys (or client addresses) that set none; 0: unlimited",
    ),
    Setting(
        "default_tpm",
        ("MPCAPI_DEFAULT_TPM",),
        0,
        _non_negative_int,
        "tokens per minute for keys (or client addresses) that set none; 0: unlimited",
    ),
    Setting(
        "redis_url",
        ("MPCAPI_REDIS_URL",),
        "",
        _redis_url,
        "Redis shared by instances for limits and cache; empty: in memory, per process",
    ),
    Setting(
        "redis_prefix",
        ("MPCAPI_REDIS_PREFIX",),
        "mpcapi:",
        _non_empty,
        "prefix of every Redis key MPC-API writes (instances sharing limits share it)",
    ),
    Setting(
        "cache_ttl",
        ("MPCAPI_CACHE_TTL",),
        0,
        _non_negative_int,
        "seconds a successful answer is cached; 0: no cache",
    ),
    Setting(
        "cache_scope",
        ("MPCAPI_CACHE_SCOPE",),
        "key",
        _one_of("key", "global"),
        "key: each key owner has its own cache; global: one cache for everyone",
    ),
    Setting(
        "cache_max_bytes",
        ("MPCAPI_CACHE_MAX_BYTES",),
        64 * 1024 * 1024,
        _positive_int,
        "size limit of the in-memory cache (least recently used answers go first); with "
        "Redis, of each instance's index of the answers Redis holds (160 bytes an answer)",
    ),
    Setting(
        "metrics_public",
        ("MPCAPI_METRICS_PUBLIC",),
        False,
        _boolean,
        "true: /metrics needs no admin key",
    ),
    Setting(
        "usage_ledger",
        ("MPCAPI_USAGE_LEDGER",),
        True,
        _boolean,
        "false: no usage ledger (no rows, no budgets, no /api/usage)",
    ),
    Setting(
        "otel_endpoint",
        ("MPCAPI_OTEL_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        "",
        _optional_url,
        "OpenTelemetry collector (OTLP/HTTP, e.g. http://otel-collector:4318): every API call "
        "becomes spans and GenAI metrics; empty: off",
    ),
    Setting(
        "otel_service_name",
        ("MPCAPI_OTEL_SERVICE_NAME", "OTEL_SERVICE_NAME"),
        "mpc-api",
        _non_empty,
        "service.name of the exported spans and metrics",
    ),
    Setting(
        "log_bodies",
        ("MPCAPI_LOG_BODIES",),
        False,
        _boolean,
        "true: the usage ledger (and trace spans) also store request and response bodies "
        "(credentials redacted)",
    ),
    Setting(
        "prices",
        ("MPCAPI_PRICES",),
        "",
        _text,
        "TOML price table (USD per 1M tokens) for costs LiteLLM does not report; empty: built in",
    ),
    Setting(
        "usage_spool",
        ("MPCAPI_USAGE_SPOOL",),
        "mpcapi-usage.spool.jsonl",
        _non_empty,
        "file keeping usage rows while the database is unreachable (replayed when it is back)",
    ),
    Setting(
        "env",
        ("MPCAPI_ENV", "NODE_ENV"),
        "production",
        _non_empty,
        "environment name; 'development' logs text, anything else JSON",
    ),
    Setting(
        "log_format",
        ("MPCAPI_LOG_FORMAT",),
        "",
        _log_format,
        "text or json; empty: text in development, json otherwise",
    ),
)

CONFIG_ENV = "MPCAPI_CONFIG"
# Pending connections the kernel queues for us; Twisted's default of 50 drops bursts, and
# 1,024 dropped SYNs when 5,000 streams were opened within 2 s. The kernel caps it at
# net.core.somaxconn (4,096 on Linux since 5.4).
LISTEN_BACKLOG = 4096


@attrs.frozen
class Settings:
    """The effective configuration of one daemon."""

    port: int = 3000
    host: str = "0.0.0.0"
    litellm_base_url: str = "http://litellm:4000"
    litellm_api_key: str = ""
    litellm_timeout: float = 600.0
    connect_timeout: float = 10.0
    ready_timeout: float = 2.0
    upstream_probe_seconds: float = 5.0
    pool_size: int = 256
    max_body_bytes: int = 32 * 1024 * 1024
    read_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_connections: int = 10000
    drain_seconds: float = 30.0
    cors_origins: str = ""
    error_format: ErrorFormat = "openai"
    workers: int = 1
    auth: str = "off"
    database_url: str = "sqlite:///mpcapi.db"
    admin_key: str = ""
    default_rpm: int = 0
    default_tpm: int = 0
    redis_url: str = ""
    redis_prefix: str = "mpcapi:"
    cache_ttl: int = 0
    cache_scope: str = "key"
    cache_max_bytes: int = 64 * 1024 * 1024
    metrics_public: bool = False
    usage_ledger: bool = True
    otel_endpoint: str = ""
    otel_service_name: str = "mpc-api"
    log_bodies: bool = False
    prices: str = ""
    usage_spool: str = "mpcapi-usage.spool.jsonl"
    env: str = "production"
    log_format: str = "json"
    config_file: str = ""

    @property
    def litellm_base_urls(self) -> list[str]:
        """The LiteLLM instances of ``litellm_base_url``."""
        return self.litellm_base_url.split(",")

    @property
    def listen_endpoint(self) -> str:
        host = self.host.replace(":", "\\:")
        return f"tcp:port={self.port}:interface={host}:backlog={LISTEN_BACKLOG}"

    def masked(self) -> dict[str, Any]:
        """The settings as a dict, with every secret replaced by asterisks."""
        values = attrs.asdict(self)
        for setting in SETTINGS:
            if setting.secret and values[setting.name]:
                values[setting.name] = "***"
        values["database_url"] = without_password(self.database_url)
        values["redis_url"] = without_password(self.redis_url)
        values["litellm_base_url"] = ",".join(
            without_password(url) for url in self.litellm_base_url.split(",")
        )
        return values


def _read_toml(path: str, source: str) -> dict[str, Any]:
    """The TOML file at ``path``; errors name ``source``, where the path came from."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"{source}: cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: {path} is not valid TOML: {error}") from None
    known = {setting.name for setting in SETTINGS}
    unknown = sorted(set(document) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key in {path}")
    return document


def load_settings(
    options: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Merge every source into one ``Settings``; raise ``ConfigError`` on a bad value.

    ``options`` holds twistd option values by setting name (``None`` = not given),
    plus ``config`` for the TOML file path.
    """
    options = options or {}
    dotenv_file = (cwd or Path.cwd()) / ".env"
    from_dotenv = {k: v for k, v in dotenv_values(dotenv_file).items() if v is not None}
    environment = {**from_dotenv, **(os.environ if environ is None else environ)}

    config_file = options.get("config") or environment.get(CONFIG_ENV) or ""
    source = "--config" if options.get("config") else CONFIG_ENV
    from_file = _read_toml(config_file, source) if config_file else {}

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw, key = setting.default, setting.name
        if setting.name in from_file:
            raw, key = from_file[setting.name], f"{setting.name} (in {config_file})"
        for variable in reversed(setting.env):
            if variable in environment:
                raw, key = environment[variable], variable
        if options.get(setting.name) is not None:
            raw, key = options[setting.name], f"--{setting.option}"
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as error:
            raise ConfigError(f"{key}: {error}") from None
    if not values["log_format"]:
        values["log_format"] = "text" if values["env"] == "development" else "json"
    return Settings(**values, config_file=config_file)
