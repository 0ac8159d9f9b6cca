"""
Per-process resources: reading /proc, the collector, and writing its numbers where the
workers' /metrics (multiprocess mode) reads them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from bungate.ops.procfs import ProcessUsage, open_fds, usage
from bungate.ops.resources import ProcessResources, publish_collected


def test_usage_of_this_process():
    used = usage(os.getpid())
    assert used is not None
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    page = os.sysconf("SC_PAGE_SIZE")
    assert abs(used.rss_bytes - rss_pages * page) < 64 * 2**20  # the same order, moments apart
    assert used.rss_bytes > 2**20
    assert used.cpu_seconds > 0
    assert used.open_fds is not None and used.open_fds >= 3


def state_of(pid: int) -> bytes:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0]


def test_usage_of_a_gone_or_dead_process_is_none():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    # Exited but not reaped: a zombie uses nothing.
    deadline = time.monotonic() + 30
    while state_of(child.pid) != b"Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    assert usage(child.pid) is None
    child.wait()
    assert usage(child.pid) is None
    assert open_fds(child.pid) is None


def test_usage_reads_a_command_name_with_parentheses(tmp_path):
    (tmp_path / "42").mkdir()
    fields = ["S"] + ["0"] * 10 + ["250", "150"] + ["0"] * 8 + ["7"]
    (tmp_path / "42" / "stat").write_text("42 (a) (b) " + " ".join(fields) + " 0 0\n")
    (tmp_path / "42" / "fd").mkdir()
    used = usage(42, proc=str(tmp_path))
    assert used is not None
    assert used.cpu_seconds == 400 / os.sysconf("SC_CLK_TCK")
    assert used.rss_bytes == 7 * os.sysconf("SC_PAGE_SIZE")
    assert used.open_fds == 0


def fake(values: dict[int, ProcessUsage]):
    return lambda pid: values.get(pid)


def samples(registry_text: bytes) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(registry_text.decode()):
        for sample in family.samples:
            out[(sample.name, sample.labels.get("worker", ""))] = sample.value
    return out


def test_the_collector_labels_each_process():
    collector = ProcessResources(
        lambda: {"master": 10, "1": 11, "2": 12},
        read=fake(
            {
                10: ProcessUsage(10, 50 * 2**20, 1.5, 20),
                11: ProcessUsage(11, 60 * 2**20, 2.5, None),  # fds not readable
            }
        ),
    )
    registry = CollectorRegistry()
    registry.register(collector)
    got = samples(generate_latest(registry))
    assert got == {
        ("process_resident_memory_bytes", "master"): 50 * 2**20,
        ("process_resident_memory_bytes", "1"): 60 * 2**20,
        ("process_cpu_seconds_total", "master"): 1.5,
        ("process_cpu_seconds_total", "1"): 2.5,
        ("process_open_fds", "master"): 20,
    }


def merged(path: Path) -> tuple[bytes, dict[tuple[str, str], float]]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    text = generate_latest(registry)
    return text, samples(text)


def test_published_numbers_are_merged_by_the_multiprocess_collector(tmp_path):
    processes: dict[str, int] = {"master": 10, "1": 11, "2": 12}
    values = {
        10: ProcessUsage(10, 50 * 2**20, 1.5, 20),
        11: ProcessUsage(11, 60 * 2**20, 2.5, 14),
        12: ProcessUsage(12, 61 * 2**20, 3.5, 15),
    }
    collector = ProcessResources(lambda: processes, read=fake(values))
    written = publish_collected(collector, str(tmp_path), "resources-10")
    assert sorted(Path(p).name for p in written) == [
        "counter_resources-10.db",
        "gauge_livesum_resources-10.db",
    ]
    text, got = merged(tmp_path)
    assert got[("process_resident_memory_bytes", "2")] == 61 * 2**20
    assert got[("process_cpu_seconds_total", "1")] == 2.5
    assert got[("process_open_fds", "master")] == 20
    assert b"# TYPE process_cpu_seconds_total counter" in text
    assert b"# TYPE process_resident_memory_bytes gauge" in text
    assert b'pid="' not in text  # one writer: no pid label

    # Worker 2 is gone: its series goes with the next publication, and nothing is left
    # half-written or aside.
    del processes["2"]
    publish_collected(collector, str(tmp_path), "resources-10")
    _, got = merged(tmp_path)
    assert {w for _, w in got} == {"master", "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "counter_resources-10.db",
        "gauge_livesum_resources-10.db",
    ]
    # A worker that died with the master's pid number in its name does not take them.
    mark_process_dead(10, str(tmp_path))  # type: ignore[no-untyped-call]
    assert len(list(tmp_path.iterdir())) == 2


def test_a_leftover_temporary_file_does_not_bring_old_series_back(tmp_path):
    stale = ProcessResources(lambda: {"9": 9}, read=fake({9: ProcessUsage(9, 1, 1.0, 1)}))
    publish_collected(stale, str(tmp_path), "resources-1")
    for final in list(tmp_path.iterdir()):
        final.rename(tmp_path / f".{final.name[:-3]}.tmp")  # as if a write was cut short
    fresh = ProcessResources(lambda: {"1": 1}, read=fake({1: ProcessUsage(1, 2, 2.0, 2)}))
    publish_collected(fresh, str(tmp_path), "resources-1")
    _, got = merged(tmp_path)
    assert {w for _, w in got} == {"1"}
