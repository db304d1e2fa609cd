"""``twistd mpcapi``: the options, and the service tree of ``mpcapi.runtime.build``."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from mpcapi.config.settings import CONFIG_ENV, SETTINGS, ConfigError, Settings, load_settings
from mpcapi.ledger.prices import PriceTable
from mpcapi.runtime.build import build_service, build_supervisor
from mpcapi.runtime.workers import WORKER_FD_ENV, WORKER_ID_ENV, listening_socket
from mpcapi.storage.database import DatabaseError, migrate_now


def _describe(setting: Any) -> str:
    default = "(none)" if setting.default in ("", None) else setting.default
    return f"{setting.help} [env {' or '.join(setting.env)}; default {default}]"


class Options(usage.Options):
    """Every setting is also an option; options win over every other source."""

    optParameters = [
        ["config", "c", None, f"TOML configuration file [env {CONFIG_ENV}]"],
        *[[setting.option, None, None, _describe(setting)] for setting in SETTINGS],
    ]

    def given(self) -> dict[str, Any]:
        """Option values by setting name; ``None`` where the option was not given."""
        values = {setting.name: self[setting.option] for setting in SETTINGS}
        values["config"] = self["config"]
        return values

    def as_argv(self) -> list[str]:
        """The options that were given, as command-line arguments (for worker processes)."""
        return [
            f"--{name.replace('_', '-')}={value}"
            for name, value in self.given().items()
            if value is not None
        ]


def read_settings(options: Options) -> Settings:
    """The configuration from every source, checked as at start; ``ConfigError`` if unusable."""
    settings = load_settings(options.given(), os.environ)
    try:
        PriceTable.load(settings.prices)
    except ValueError as error:
        raise ConfigError(f"MPCAPI_PRICES: {error}") from None
    return settings


def check_listening(settings: Settings) -> None:
    """Stop start-up with one line when the port cannot be had (in use, not permitted):
    twistd would only find out once running, and print a traceback."""
    try:
        listening_socket(settings.host, settings.port).close()
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        sys.stderr.write(f"mpcapi: cannot listen on {settings.host}:{settings.port}: {reason}\n")
        raise SystemExit(2) from None


def makeService(options: Options) -> IService:
    try:
        settings = read_settings(options)
    except ConfigError as error:
        sys.stderr.write(f"mpcapi: configuration error: {error}\n")
        raise SystemExit(2) from None
    if settings.auth == "keys":  # client keys need their table before the first request
        try:
            migrate_now(settings.database_url)
        except DatabaseError as error:
            sys.stderr.write(f"mpcapi: database error: MPCAPI_DATABASE_URL: {error}\n")
            raise SystemExit(2) from None
    from twisted.internet import reactor

    inherited_fd = os.environ.get(WORKER_FD_ENV)
    if inherited_fd is not None:
        worker = os.environ.get(WORKER_ID_ENV, "?")
        return build_service(
            settings, reactor, worker, int(inherited_fd), lambda: read_settings(options)
        )
    check_listening(settings)
    if settings.workers > 1:
        return build_supervisor(settings, reactor, options.as_argv())
    return build_service(settings, reactor, load=lambda: read_settings(options))
