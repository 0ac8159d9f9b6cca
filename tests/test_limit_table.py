"""The shared rate-limit table of backend: local, in one process and across real processes."""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import IO, Any, Iterator, Optional

import pytest

import bungate
from bungate.core.ratelimit import Rate, decide_us, key_hash, seconds_to_us
from bungate.limit_table import LimitTable, LimitTableError

ROOT = Path(bungate.__file__).resolve().parents[1]
NOW = 1_700_000_000.0


@pytest.fixture
def made() -> Iterator[tuple[LimitTable, IO[bytes]]]:
    table, backing = LimitTable.create()
    yield table, backing
    table.close()
    backing.close()


def small_table(slots: int = 16, stripes: int = 1, probe: int = 4) -> tuple[LimitTable, IO[bytes]]:
    return LimitTable.create(slots=slots, stripes=stripes, probe=probe)


def same_home(table: LimitTable, route: str, count: int, home: Optional[int] = None) -> list[bytes]:
    """``count`` keys of ``route`` whose home slot is the same (``home`` if given)."""
    by_home: dict[int, list[bytes]] = defaultdict(list)
    for n in range(100_000):
        key = b"client-%d" % n
        slot = key_hash(route, key) & (table.slots - 1)
        if home is None or slot == home:
            by_home[slot].append(key)
            if len(by_home[slot]) == count:
                return by_home[slot]
    raise AssertionError("no keys found")


def slot_hashes(backing: IO[bytes], slots: int) -> list[int]:
    """The key_hash column of the file, read as another process would see it."""
    raw = os.pread(backing.fileno(), 16 * slots, 64)
    return [
        int.from_bytes(raw[16 * i : 16 * i + 8], sys.byteorder, signed=True) for i in range(slots)
    ]


# --- in one process -----------------------------------------------------------------------


def test_a_table_is_1_mib_by_default_and_a_worker_maps_the_masters(made: Any) -> None:
    table, backing = made
    assert (table.slots, table.stripes, table.probe) == (65536, 64, 16)
    assert os.fstat(backing.fileno()).st_size == 64 + 65536 * 16
    worker = LimitTable.inherited(os.dup(backing.fileno()))
    try:
        rate = Rate(3, 60)
        assert [worker.decide("r", b"k", rate, NOW).allowed for _ in range(3)] == [True] * 3
        assert not table.decide("r", b"k", rate, NOW).allowed  # the master sees the same state
    finally:
        worker.close()


def test_decisions_are_gcra_per_route_and_key(made: Any) -> None:
    table, _ = made
    rate = Rate(7, 60, burst=3)
    tat: Optional[int] = None
    now = NOW
    for step in range(100):
        now += (step % 4) * 2.5
        expected, tat = decide_us(rate, tat, seconds_to_us(now))
        assert table.decide("api", b"10.0.0.1", rate, now) == expected
    # other keys and routes have budgets of their own
    assert table.decide("api", b"10.0.0.2", rate, now).remaining == 2
    assert table.decide("admin", b"10.0.0.1", rate, now).remaining == 2


def test_a_clock_going_back_neither_frees_the_budget_nor_locks_the_key_for_long(made: Any) -> None:
    table, _ = made
    rate = Rate(10, 60)
    for _ in range(10):
        table.decide("r", b"k", rate, NOW)
    back = table.decide("r", b"k", rate, NOW - 3600)
    assert not back.allowed and back.retry_after == 6.0


def test_keys_of_one_home_slot_probe_to_the_next_slots() -> None:
    table, backing = small_table()
    try:
        rate = Rate(2, 60)
        keys = same_home(table, "r", 4)
        for key in keys:
            assert table.decide("r", key, rate, NOW).remaining == 1
        for key in keys:
            assert table.decide("r", key, rate, NOW).remaining == 0
            assert not table.decide("r", key, rate, NOW).allowed
        assert table.evictions == 0
        assert table.used_slots() == 4
    finally:
        table.close()
        backing.close()


def test_a_full_probe_sequence_gives_the_oldest_tat_away_and_counts_it() -> None:
    table, backing = small_table()
    try:
        rate = Rate(2, 60)
        *live, newcomer = same_home(table, "r", 5)
        for n, key in enumerate(live):  # TATs: NOW + 30 + n
            table.decide("r", key, rate, NOW + n)
        assert table.decide("r", newcomer, rate, NOW + 10).allowed
        assert table.evictions == 1
        # the oldest TAT was live[0]'s: it starts again from a full bucket...
        assert table.decide("r", live[0], rate, NOW + 10).remaining == 1
        assert table.evictions == 2  # (taking the slot of live[1], the oldest then)
        # ...and the newcomer was not refused wrongly by the key it replaced
        assert table.decide("r", newcomer, rate, NOW + 10).remaining == 0
        assert table.decide("r", live[2], rate, NOW + 10).remaining == 0
    finally:
        table.close()
        backing.close()


def test_an_expired_slot_is_reused_without_eviction_and_later_keys_are_still_found() -> None:
    table, backing = small_table()
    try:
        short, long = Rate(1, 1), Rate(1, 3600)
        first, second, third, fourth, fifth = same_home(table, "r", 5)
        table.decide("r", first, short, NOW)  # TAT NOW + 1, soon in the past
        for key in (second, third, fourth):
            table.decide("r", key, long, NOW)
        before = slot_hashes(backing, 16)
        # first's slot is free again at NOW + 2: fifth takes it, nothing is evicted
        assert table.decide("r", fifth, long, NOW + 2).allowed
        assert table.evictions == 0
        after = slot_hashes(backing, 16)
        changed = [i for i in range(16) if before[i] != after[i]]
        assert len(changed) == 1 and before[changed[0]] == key_hash("r", first)
        # the keys behind the reused slot keep their state
        for key in (second, third, fourth):
            assert not table.decide("r", key, long, NOW + 2).allowed
        # and first, back, goes to a free slot rather than a second copy anywhere
        assert table.decide("r", first, short, NOW + 2).allowed
        assert not table.decide("r", first, short, NOW + 2).allowed
        assert slot_hashes(backing, 16).count(key_hash("r", first)) == 1
    finally:
        table.close()
        backing.close()


def test_a_probe_sequence_wraps_inside_its_lock_stripe() -> None:
    table, backing = small_table(slots=16, stripes=2, probe=4)
    try:
        rate = Rate(1, 60)
        keys = same_home(table, "r", 3, home=7)  # the last slot of the first stripe
        for key in keys:
            table.decide("r", key, rate, NOW)
        used = [i for i, h in enumerate(slot_hashes(backing, 16)) if h]
        assert used == [0, 1, 7]  # wrapped to 0 and 1, not into the second stripe (8, 9)
        start, length = table.lock_range("r", keys[0])
        assert (start, length) == (64, 8 * 16)
    finally:
        table.close()
        backing.close()


@pytest.mark.parametrize(
    "shape", [(15, 1, 1), (16, 3, 1), (16, 32, 1), (16, 4, 5), (16, 4, 0), (0, 1, 1)]
)
def test_a_table_of_impossible_shape_is_refused(shape: tuple[int, int, int]) -> None:
    with pytest.raises(LimitTableError):
        LimitTable.create(*shape)


def test_a_file_that_is_no_table_is_refused_and_its_descriptor_closed(tmp_path: Path) -> None:
    for content in (b"", b"x" * 4096):
        path = tmp_path / "junk"
        path.write_bytes(content)
        fd = os.open(path, os.O_RDWR)
        with pytest.raises(LimitTableError):
            LimitTable.inherited(fd)
        with pytest.raises(OSError):
            os.fstat(fd)


# --- across processes ---------------------------------------------------------------------

# A worker: maps the inherited table, says "ready", waits for "go" on stdin, then decides
# as fast as it can (each decision on the wall clock) and prints what it got.
HAMMER = """
import json, sys, time
from bungate.core.ratelimit import Rate
from bungate.limit_table import LimitTable
table = LimitTable.inherited(int(sys.argv[1]))
rate = Rate(50, 60)
print("ready", flush=True)
sys.stdin.readline()
allowed, first, last = 0, time.time(), 0.0
for _ in range(int(sys.argv[2])):
    now = time.time()
    allowed += table.decide("api", b"one-key", rate, now).allowed
    last = now
print(json.dumps({"allowed": allowed, "first": first, "last": last}), flush=True)
"""

# Takes some budget at NOW, then holds the key's stripe lock until killed.
HOLDER = """
import fcntl, sys
from bungate.core.ratelimit import Rate
from bungate.limit_table import LimitTable
table = LimitTable.inherited(int(sys.argv[1]))
now = float(sys.argv[2])
rate = Rate(50, 60)
taken = sum(table.decide("api", b"one-key", rate, now).allowed for _ in range(20))
start, length = table.lock_range("api", b"one-key")
fcntl.lockf(int(sys.argv[1]), fcntl.LOCK_EX, length, start)
print("locked", taken, flush=True)
sys.stdin.readline()
"""

# Decides 100 times at NOW (blocking on the lock if someone holds it).
WAITER = """
import sys
from bungate.core.ratelimit import Rate
from bungate.limit_table import LimitTable
table = LimitTable.inherited(int(sys.argv[1]))
now = float(sys.argv[2])
rate = Rate(50, 60)
print(sum(table.decide("api", b"one-key", rate, now).allowed for _ in range(100)), flush=True)
"""


def spawn(script: str, backing: IO[bytes], *args: str) -> subprocess.Popen[str]:
    """A process running ``script`` that inherits the table's descriptor, as a worker does."""
    fd = backing.fileno()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", script, str(fd), *args],
        pass_fds=(fd,),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
        env=env,
    )


def read_line(process: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The next line ``process`` prints, waiting at most ``timeout`` seconds."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"no output from process {process.pid} in {timeout}s"
    return process.stdout.readline().strip()


def blocked_on_lock(pid: int) -> bool:
    """Whether the kernel lists ``pid`` as waiting for a POSIX lock (``/proc/locks``)."""
    with open("/proc/locks") as locks:
        return any("->" in line and f" {pid} " in line for line in locks)


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.005)


def test_four_processes_hammering_one_key_get_exactly_the_limit(made: Any) -> None:
    _, backing = made
    workers = [spawn(HAMMER, backing, "500") for _ in range(4)]
    try:
        for worker in workers:
            assert read_line(worker) == "ready"
        for worker in workers:  # all start together
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        results = [json.loads(read_line(worker, 60)) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(30)
    # 2000 tries within one emission interval (1.2 s): the burst and not one more
    spread = max(r["last"] for r in results) - min(r["first"] for r in results)
    assert spread < 1.2, f"the run took {spread:.2f}s, more than one emission interval"
    assert sum(r["allowed"] for r in results) == 50


# Decides as fast as it can at one instant (so nothing refills) and prints its count.
CONTENDER = """
import sys
from bungate.core.ratelimit import Rate
from bungate.limit_table import LimitTable
table = LimitTable.inherited(int(sys.argv[1]))
now, rate = float(sys.argv[2]), Rate(20000, 3600)
print("ready", flush=True)
sys.stdin.readline()
print(sum(table.decide("api", b"one-key", rate, now).allowed for _ in range(10000)), flush=True)
"""


def test_concurrent_read_decide_writes_lose_no_update(made: Any) -> None:
    # 40000 tries at one instant for a burst of 20000, long enough for the four to
    # overlap: an update lost between two processes would let more than 20000 through.
    _, backing = made
    workers = [spawn(CONTENDER, backing, repr(NOW)) for _ in range(4)]
    try:
        for worker in workers:
            assert read_line(worker) == "ready"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        counts = [int(read_line(worker, 60)) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(30)
    assert sum(counts) == 20000
    assert sum(1 for count in counts if count > 0) >= 2, counts  # they did compete


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux /proc/locks")
def test_a_worker_killed_while_holding_the_lock_releases_it_and_the_budget_survives(
    made: Any,
) -> None:
    table, backing = made
    holder = spawn(HOLDER, backing, repr(NOW))
    waiter: Optional[subprocess.Popen[str]] = None
    try:
        assert read_line(holder) == "locked 20"
        start, length = table.lock_range("api", b"one-key")
        with pytest.raises(OSError):  # really held, by another process
            fcntl.lockf(backing.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
        waiter = spawn(WAITER, backing, repr(NOW))
        wait_for(lambda: blocked_on_lock(waiter.pid), 30, "the waiter to block on the lock")
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(30) == -signal.SIGKILL
        # the kernel dropped the dead holder's lock: the waiter goes on, with what is left
        assert read_line(waiter, 30) == "30"
        assert waiter.wait(30) == 0
    finally:
        for process in (holder, waiter):
            if process is not None:
                process.kill()
                process.wait(30)
    fcntl.lockf(backing.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
    fcntl.lockf(backing.fileno(), fcntl.LOCK_UN, length, start)
    assert not table.decide("api", b"one-key", Rate(50, 60), NOW).allowed  # not reset


def test_a_clock_passed_in_is_read_while_the_keys_lock_is_held(made: Any) -> None:
    # Read before the lock, a time could be older than the decision another process
    # stored meanwhile, and its remaining count would come out one short.
    table, backing = made
    start, length = table.lock_range("r", b"k")
    probe = (
        "import fcntl, sys\n"
        "try:\n"
        f"    fcntl.lockf({backing.fileno()}, fcntl.LOCK_EX | fcntl.LOCK_NB, {length}, {start})\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    seen: list[int] = []

    def clock() -> float:
        done = subprocess.run([sys.executable, "-c", probe], pass_fds=[backing.fileno()])
        seen.append(done.returncode)
        return NOW

    decision = table.decide("r", b"k", Rate(3, 60), clock)
    assert decision.allowed and decision.remaining == 2
    assert seen == [1]  # read once, and another process could not take the lock then
    assert table.decide("r", b"k", Rate(3, 60), NOW).remaining == 1
