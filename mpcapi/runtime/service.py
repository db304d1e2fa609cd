"""``GatewayService``: the root of the daemon's service tree, and its log observer."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from mpcapi.config.settings import Settings
from mpcapi.runtime.heap import freeze_startup_heap
from mpcapi.runtime.logs import LogSwitch, TurnFlushedOutput, observer_for

log = Logger(namespace="mpcapi")


class GatewayService(MultiService):
    """The daemon's service tree; installs our log observer when the format needs one."""

    def __init__(self, settings: Settings, reactor: Any, worker: str | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.worker = worker
        self.logs: LogSwitch | None = None  # ours, when installed: a reload may switch it

    def setServiceParent(self, parent: Any) -> None:
        # twistd logs through the application's ILogObserver when --logger is not given;
        # without one (text, one process) twistd's own observer keeps --logfile and --syslog.
        needed = observer_for(self.settings.log_format, self.worker, sys.stdout) is not None
        if needed and isinstance(parent, Componentized):
            out = TurnFlushedOutput(sys.stdout, self.reactor)
            self.logs = LogSwitch(self.settings.log_format, self.worker, out)
            parent.setComponent(ILogObserver, self.logs)
        super().setServiceParent(parent)

    def startService(self) -> None:
        if self.worker is None:
            log.info("MPC-API configuration: {settings}", settings=self.settings.masked())
        super().startService()
        freeze_startup_heap()  # the services are built and started: what follows is requests'


__all__ = ["GatewayService"]
