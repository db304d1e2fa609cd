"""``twistd mpcapi``: the options and the service tree, nothing else."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from mpcapi.app import Gateway
from mpcapi.logs import JsonLinesObserver
from mpcapi.settings import CONFIG_ENV, SETTINGS, ConfigError, Settings, load_settings
from mpcapi.site import GatewaySite
from mpcapi.upstream import LiteLLMClient, make_http_client, make_pool

log = Logger(namespace="mpcapi")


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


class GatewayService(MultiService):
    """The daemon's service tree; installs the JSON log observer when configured."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def setServiceParent(self, parent: Any) -> None:
        # twistd logs through the application's ILogObserver when --logger is not given.
        if self.settings.log_format == "json" and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, JsonLinesObserver(sys.stdout))
        super().setServiceParent(parent)

    def startService(self) -> None:
        log.info("MPC-API configuration: {settings}", settings=self.settings.masked())
        super().startService()


class _PoolCloser(Service):
    """Closes the persistent LiteLLM connections when the daemon stops."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def stopService(self) -> Any:
        super().stopService()
        return self._pool.closeCachedConnections()


def build_service(settings: Settings, reactor: Any) -> MultiService:
    """Wire the settings, the LiteLLM client, the app and the listening port."""
    service = GatewayService(settings)
    pool = make_pool(reactor, settings)
    upstream = LiteLLMClient(
        base_url=settings.litellm_base_url,
        api_key=settings.litellm_api_key,
        http=make_http_client(reactor, pool, settings),
        clock=reactor,
        timeout=settings.litellm_timeout,
    )
    gateway = Gateway(settings, upstream, reactor)
    site = GatewaySite(gateway.resource(), settings.max_body_bytes, reactor=reactor)
    strports.service(settings.listen_endpoint, site, reactor=reactor).setServiceParent(service)
    _PoolCloser(pool).setServiceParent(service)
    return service


def makeService(options: Options) -> IService:
    try:
        settings = load_settings(options.given(), os.environ)
    except ConfigError as error:
        sys.stderr.write(f"mpcapi: configuration error: {error}\n")
        raise SystemExit(2) from None
    from twisted.internet import reactor

    return build_service(settings, reactor)
