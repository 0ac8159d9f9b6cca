"""
What each process of the fleet uses (memory, CPU, open files), as Prometheus metrics with
a ``worker`` label, collected by the master from ``/proc`` and written into the
multiprocess directory the workers serve ``/metrics`` from (internal).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from bungate.ops.procfs import ProcessUsage, usage

__all__ = ["ProcessResources", "publish_collected"]


class ProcessResources:
    """
    A prometheus_client collector of what each process of the fleet uses, read from
    ``/proc`` (:mod:`bungate.ops.procfs`): ``process_resident_memory_bytes``,
    ``process_cpu_seconds_total`` and ``process_open_fds``, the names of prometheus_client's
    own process collector, with a ``worker`` label (the slot id, or ``master``).

    In cluster mode the workers serve ``/metrics`` from the multiprocess directory, where
    no collector of the master can be seen: the master therefore writes what this
    collects into that directory (:func:`publish_collected`) on its heartbeat tick.

    :param processes: ``{worker label: pid}`` of the processes to measure, asked at each
        collection.
    :param read: reads one process (for tests).
    """

    def __init__(
        self,
        processes: Callable[[], Mapping[str, int]],
        read: Callable[[int], Optional[ProcessUsage]] = usage,
    ) -> None:
        self.processes = processes
        self.read = read

    def describe(self) -> list[Metric]:
        """Nothing: registering this collector must not read ``/proc``."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The three families, one sample per process that could be read."""
        rss = GaugeMetricFamily(
            "process_resident_memory_bytes",
            "Resident memory size in bytes, per process of the fleet (worker: the slot id, "
            "or master).",
            labels=["worker"],
        )
        cpu = CounterMetricFamily(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds, per process of the fleet "
            "(a worker's restarts from 0 when it is respawned or replaced).",
            labels=["worker"],
        )
        fds = GaugeMetricFamily(
            "process_open_fds",
            "Number of open file descriptors, per process of the fleet.",
            labels=["worker"],
        )
        for label, pid in sorted(self.processes().items()):
            used = self.read(pid)
            if used is None:
                continue
            rss.add_metric([label], used.rss_bytes)
            cpu.add_metric([label], used.cpu_seconds)
            if used.open_fds is not None:
                fds.add_metric([label], used.open_fds)
        yield rss
        yield cpu
        yield fds


#: The file name prefix (before the name given) for each metric type that
#: :func:`publish_collected` writes: gauges as ``livesum`` (one writer: its value as is,
#: no ``pid`` label).
_PUBLISHED_AS = {"gauge": "gauge_livesum_", "counter": "counter_"}


def publish_collected(collector: Any, path: str, name: str) -> list[str]:
    """
    Write what ``collector`` collects now into the multiprocess directory ``path``, as
    the files prometheus_client's ``MultiProcessCollector`` merges.

    Each file is written aside and renamed over the previous one, so a scrape sees
    either the last collection or this one, never a mix, and a series that is no longer
    collected (a worker that is gone) disappears at once.

    :param collector: anything with ``collect()`` yielding gauge and counter families.
    :param path: the multiprocess directory.
    :param name: what tells this writer's files apart, e.g. ``resources-<master pid>``
        (never a bare pid: ``mark_process_dead`` would delete it).
    :returns: the files written.
    :raises OSError: the directory cannot be written.
    """
    entries: dict[str, list[tuple[str, float]]] = {typ: [] for typ in _PUBLISHED_AS}
    for family in collector.collect():
        if family.type not in entries:
            continue
        for sample in family.samples:
            key = mmap_key(
                family.name,
                sample.name,
                list(sample.labels),
                list(sample.labels.values()),
                family.documentation,
            )
            entries[family.type].append((key, float(sample.value)))
    now = time.time()
    written = []
    for typ, collected in entries.items():
        final = os.path.join(path, f"{_PUBLISHED_AS[typ]}{name}.db")
        # A dot file that does not end in .db: never read as metrics while written.
        temp = os.path.join(path, f".{_PUBLISHED_AS[typ]}{name}.tmp")
        try:
            os.remove(temp)  # a leftover would keep its old keys
        except FileNotFoundError:
            pass
        table = MmapedDict(temp)  # type: ignore[no-untyped-call]
        try:
            for key, value in collected:
                table.write_value(key, value, now)  # type: ignore[no-untyped-call]
        finally:
            table.close()  # type: ignore[no-untyped-call]
        os.replace(temp, final)
        written.append(final)
    return written
