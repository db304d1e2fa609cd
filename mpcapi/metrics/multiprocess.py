"""prometheus_client's multiprocess mode for workers: the shared directory, the collectors
that add up every worker's files, and cleaning up after a worker that is gone."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterable

from prometheus_client import ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def fresh_multiproc_dir() -> str:
    """The supervisor's directory for its workers' metric files (empty, private)."""
    return tempfile.mkdtemp(prefix="mpcapi-metrics-")


def forget_process(directory: str, pid: int) -> None:
    """A worker died: its in-flight gauge no longer counts (its counters still do)."""
    mark_process_dead(pid, directory)


def remove_multiproc_dir(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def live_pids(directory: str) -> list[int]:
    """The processes with files in ``directory`` that are still running."""
    pids: set[int] = set()
    for path in glob.glob(os.path.join(directory, "*.db")):
        tail = os.path.basename(path)[: -len(".db")].rsplit("_", 1)[-1]
        if tail.isdigit():
            pids.add(int(tail))
    return sorted(pid for pid in pids if os.path.exists(f"/proc/{pid}"))


class Without(Collector):
    """A collector minus the families whose names start with ``prefix``."""

    def __init__(self, collector: Collector, prefix: str) -> None:
        self._collector = collector
        self._prefix = prefix

    def collect(self) -> Iterable[Metric]:
        return (m for m in self._collector.collect() if not m.name.startswith(self._prefix))


class WorkerProcesses(Collector):
    """``process_*`` of every live worker, told apart by a ``pid`` label."""

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for pid in live_pids(self._directory):
            collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)  # type: ignore[misc]
            for family in collector.collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        return list(families.values())
