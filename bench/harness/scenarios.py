"""The scenarios: what load we put on each contender and what we read off it.

Every scenario returns ``{contender name: result dict}``; a result dict has a ``status``
(``ok``, ``skipped`` or ``failed``) and, when ``ok``, the figures the tables show.
"""

import http.client
import os
import resource
import signal
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from . import probe, procs, wrk
from .contenders import PATH_1MIB, PATH_100MIB, PATH_SMALL, Contender


@dataclass
class Settings:
    """How long and how often; ``--quick`` shrinks all of it."""

    duration: int = 10
    warmup: int = 2
    warmup_1mib: int = 2
    warmup_oneoff: int = 2
    #: Extra warm-up before the first counted run of a PyPy contender: its JIT needs ~10 s
    #: of load to reach a steady speed (measured: 20.8k req/s after 2 s, 24k after 7 s).
    warmup_pypy: int = 10
    repeat: int = 3
    connections: int = 50
    ready_timeout: float = 30.0
    slow_seconds: float = 60.0
    slow_read: int = 64 * 1024
    slow_pause: float = 0.010
    roll_duration: int = 10
    roll_count: int = 8
    kill_duration: int = 10
    kill_timeout: float = 10.0
    #: c1000: one wrk run of this many connections per contender.
    c1000_connections: int = 1000
    c1000_threads: int = 2
    c1000_duration: int = 5
    #: roll-pypy: back-to-back 1 s wrk runs, this many; SIGUSR2 as this one (0-based)
    #: starts; the mean over this many runs from the signal on, against the runs before it.
    roll_pypy_duration: int = 20
    roll_pypy_second: int = 5
    roll_pypy_window: int = 5
    #: websocket: connections of the load client, each with one message in flight.
    ws_connections: int = 50
    #: h2: h2load's connections (``-c``) and concurrent streams per connection (``-m``).
    h2_clients: int = 10
    h2_streams: int = 10


class Memory:
    """Peak RSS per process of a contender, sampled while something runs."""

    def __init__(self, contender: Contender) -> None:
        """:param contender: whose process tree to sample."""
        self.contender = contender
        self.peak: Dict[int, int] = {}
        self.titles: Dict[int, str] = {}

    def sample(self) -> None:
        """Read VmRSS of every process of the contender now, keep the maximum."""
        for pid in self.contender.pids():
            kib = procs.rss_kib(pid)
            if kib is None:
                continue
            self.peak[pid] = max(kib, self.peak.get(pid, 0))
            if pid not in self.titles:
                self.titles[pid] = procs.cmdline(pid)[:200]

    def merge(self, other: "Memory") -> None:
        """:param other: another sampling of the same contender; keep the maxima."""
        for pid, kib in other.peak.items():
            self.peak[pid] = max(kib, self.peak.get(pid, 0))
        self.titles.update(other.titles)

    def as_dict(self) -> Dict[str, object]:
        """:return: total and per-process peak RSS in KiB (root process first)."""
        return {
            "total_kib": sum(self.peak.values()),
            "per_process": [
                {"pid": pid, "title": self.titles.get(pid, ""), "kib": kib}
                for pid, kib in self.peak.items()
            ],
        }


def _during(proc, tick: Callable[[float], None], interval: float) -> None:
    """Call ``tick(elapsed)`` every ``interval`` seconds until ``proc`` exits."""
    start = time.monotonic()
    while proc.poll() is None:
        tick(time.monotonic() - start)
        time.sleep(interval)


def _skipped(reason: str) -> Dict[str, object]:
    return {"status": "skipped", "reason": reason}


def _failed(reason: str) -> Dict[str, object]:
    return {"status": "failed", "reason": reason}


def _request_share(
    before: Optional[Dict[str, int]], after: Optional[Dict[str, int]]
) -> Optional[Dict[str, object]]:
    """
    Each worker's share of the requests served between two :meth:`Contender.served`
    readings; ``None`` unless the same workers were there at both.
    """
    if not before or not after or set(before) != set(after):
        return None
    deltas = {w: after[w] - before[w] for w in sorted(before)}
    total = sum(deltas.values())
    return {w: round(d / total, 3) for w, d in deltas.items()} if total > 0 else None


def _cpu_total(pids: List[int]) -> float:
    """CPU seconds used so far by these processes (those still there)."""
    return sum(filter(None, (procs.cpu_seconds(pid) for pid in pids)))


def _children_cpu() -> float:
    """CPU seconds of our reaped children: wrk's, once it has exited."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _measured_run(
    contender: Contender,
    path: str,
    settings: Settings,
    seconds: int,
    upstream: Optional[Contender] = None,
) -> Dict[str, object]:
    """
    One counted wrk run with memory, CPU per request and, for several workers, the
    share of requests and the connections each worker holds.

    The CPU accounting tells whether the server or the machine is the limit: the server's
    processes, and wrk plus the upstream (which share the same cores), in microseconds
    per request, and how many cores all of them kept busy. A server's helpers (the Redis
    of a rate limit) are counted apart, and so are its counters (Redis's commands).
    """
    memory = Memory(contender)
    server_pids = contender.pids()
    upstream_pids = upstream.pids() if upstream is not None and upstream is not contender else []
    helper_pids = contender.helper_pids()
    served_before = contender.served() if contender.workers > 1 else None
    counters_before = contender.counters()
    cpu_server, cpu_upstream, cpu_wrk, cpu_helpers = (
        _cpu_total(server_pids), _cpu_total(upstream_pids), _children_cpu(),
        _cpu_total(helper_pids),
    )  # fmt: skip
    started = time.monotonic()
    conns: Dict[int, int] = {}

    def tick(elapsed: float) -> None:
        memory.sample()
        if not conns and elapsed >= seconds / 2 and contender.workers > 1:
            conns.update(procs.established_per_pid(contender.worker_pids(), contender.port))

    proc = wrk.start(
        contender.url(path), seconds, settings.connections, headers=contender.load_headers
    )
    try:
        _during(proc, tick, 0.25)
        result = wrk.finish(proc, timeout=seconds + 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.monotonic() - started
    cpu_server = _cpu_total(server_pids) - cpu_server
    cpu_others = _cpu_total(upstream_pids) - cpu_upstream + _children_cpu() - cpu_wrk
    cpu_helpers = _cpu_total(helper_pids) - cpu_helpers
    run = result.as_dict()
    run["memory"] = memory
    if result.requests:
        run["cpu_us_per_request"] = {
            "server": round(cpu_server / result.requests * 1e6, 1),
            "wrk_and_upstream": round(cpu_others / result.requests * 1e6, 1),
        }
        if helper_pids:
            run["cpu_us_per_request"]["helpers"] = round(cpu_helpers / result.requests * 1e6, 1)
        run["cores_busy"] = round((cpu_server + cpu_others + cpu_helpers) / wall, 2)
    if counters_before:
        after = contender.counters()
        run["counters"] = {k: after[k] - v for k, v in counters_before.items() if k in after}
        if result.requests:
            run["counters_per_request"] = {
                k: round(v / result.requests, 3) for k, v in run["counters"].items()
            }
    if contender.workers > 1:
        run["request_share"] = _request_share(served_before, contender.served())
        run["connections"] = conns
    return run


def throughput(
    contenders: List[Contender],
    path: str,
    settings: Settings,
    warmup: int,
    log: Callable[[str], None],
    upstream: Optional[Contender] = None,
) -> Dict[str, Dict[str, object]]:
    """
    Load every contender with wrk, interleaved and repeated (A B C A B C ...).

    :param contenders: running contenders (others are reported as they are).
    :param path: the URL path to load.
    :param settings: durations and repetitions.
    :param warmup: seconds of warm-up before each counted run (0: none).
    :param log: progress output.
    :param upstream: the upstream every proxy forwards to, for its CPU per request.
    :return: per contender: medians and ranges over the counted runs.
    """
    runs: Dict[str, List[Dict[str, object]]] = {c.name: [] for c in contenders}
    errors: Dict[str, str] = {}
    for rep in range(settings.repeat):
        for c in contenders:
            if c.name in errors:
                continue
            log(f"  {c.name}: run {rep + 1}/{settings.repeat}")
            try:
                if not c.alive():
                    raise RuntimeError(f"the server exited{c.log_tail()}")
                status, _, _ = probe.get(
                    c.port, path, timeout=10.0, headers=c.load_headers, tls=c.tls
                )
                if status != 200:
                    raise RuntimeError(f"GET {path} answered {status}, not 200")
                seconds = warmup
                if rep == 0 and getattr(c, "pypy", False):
                    seconds = max(warmup, settings.warmup_pypy)
                if seconds:
                    wrk.run(c.url(path), seconds, settings.connections, headers=c.load_headers)
                run = _measured_run(c, path, settings, settings.duration, upstream)
                runs[c.name].append(run)
            except (wrk.WrkError, RuntimeError, OSError, http.client.HTTPException) as e:
                errors[c.name] = str(e)
    out = {}
    for c in contenders:
        if c.name in errors:
            out[c.name] = _failed(errors[c.name])
            continue
        out[c.name] = _summarise(runs[c.name])
    return out


def _median(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _summarise(runs: List[Dict[str, object]]) -> Dict[str, object]:
    """Medians with min-max over the counted runs of one contender."""
    memory = runs[0]["memory"]
    for r in runs[1:]:
        memory.merge(r["memory"])
    for r in runs:
        r["memory"] = r["memory"].as_dict() if isinstance(r["memory"], Memory) else r["memory"]
    rps = [r["rps"] for r in runs]
    mbps = [r["transfer_bytes_per_s"] / 1e6 for r in runs]
    summary = {
        "status": "ok",
        "rps": _median(rps),
        "rps_min": min(rps),
        "rps_max": max(rps),
        "mb_per_s": _median(mbps),
        "mb_per_s_min": min(mbps),
        "mb_per_s_max": max(mbps),
        "p50_ms": _median([r["latency_ms"].get("p50") for r in runs]),
        "p99_ms": _median([r["latency_ms"].get("p99") for r in runs]),
        "errors": sum(r["errors"] for r in runs),
        "non_2xx_3xx": sum(r["non_2xx_3xx"] for r in runs),
        "memory": memory.as_dict(),
        "runs": runs,
    }
    if "cpu_us_per_request" in runs[0]:
        for key in ("server", "wrk_and_upstream", "helpers"):
            per_run = [r.get("cpu_us_per_request", {}).get(key) for r in runs]
            if key != "helpers" or any(v is not None for v in per_run):
                summary[f"cpu_us_{key}"] = _median(per_run)
        summary["cores_busy"] = _median([r.get("cores_busy") for r in runs])
    if "counters_per_request" in runs[0]:
        for key in runs[0]["counters_per_request"]:
            per_run = [r.get("counters_per_request", {}).get(key) for r in runs]
            summary[f"{key}_per_request"] = _median(per_run)
    if "connections" in runs[-1]:
        summary["request_share"] = runs[-1]["request_share"]
        summary["connections"] = runs[-1]["connections"]
    return summary


def slow_client(contender: Contender, settings: Settings) -> Dict[str, object]:
    """
    A slow client reads the 100 MiB file through the contender; sample its peak RSS.

    The client reads at most ``slow_read`` bytes every ``slow_pause`` seconds with a
    256 KiB receive buffer, so a proxy that does not apply backpressure ends up holding the
    body in memory. It stops at the end of the body or after ``slow_seconds``.

    :param contender: a running contender.
    :param settings: the read size, pause and time limit.
    :return: bytes read, time, and the peak RSS per process.
    """
    before = Memory(contender)
    before.sample()
    memory = Memory(contender)
    buf = bytearray(settings.slow_read)
    got = 0
    header = b""
    expected = None
    start = time.monotonic()
    next_sample = start
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        s.settimeout(10)
        s.connect(("127.0.0.1", contender.port))
        s.sendall(
            f"GET {PATH_100MIB} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        while time.monotonic() - start < settings.slow_seconds:
            n = s.recv_into(buf)
            if n == 0:
                break
            if expected is None:
                header += bytes(buf[:n])
                if b"\r\n\r\n" in header:
                    head, _, rest = header.partition(b"\r\n\r\n")
                    status = head.split(b"\r\n", 1)[0]
                    if b" 200 " not in status + b" ":
                        raise RuntimeError(f"slow client got {status.decode(errors='replace')}")
                    expected = _content_length(head)
                    got = len(rest)
            else:
                got += n
            if expected is not None and got >= expected:
                break
            now = time.monotonic()
            if now >= next_sample:
                memory.sample()
                next_sample = now + 0.05
            time.sleep(settings.slow_pause)
    memory.sample()
    took = time.monotonic() - start
    return {
        "status": "ok",
        "bytes": got,
        "expected": expected,
        "complete": expected is not None and got >= expected,
        "seconds": round(took, 2),
        "client_mib_per_s": round(got / took / 2**20, 2),
        "rss_before": before.as_dict(),
        "memory": memory.as_dict(),
    }


def _content_length(head: bytes) -> Optional[int]:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def roll(contender: Contender, settings: Settings) -> Dict[str, object]:
    """
    Send the contender's rolling-restart signal ``roll_count`` times during a wrk run.

    The signals go to the process we started (bungate's master: SIGUSR2; nginx's master:
    SIGHUP, what ``nginx -s reload`` sends), evenly spaced over the run.

    :param contender: a running contender with a ``roll_signal``.
    :param settings: run duration and signal count.
    :return: wrk's figures, the signals sent and the distinct worker pids seen.
    """
    seconds = settings.roll_duration
    n = settings.roll_count
    at = [seconds * (i + 1) / (n + 1) for i in range(n)]
    sent = []
    seen = set(contender.worker_pids())
    master = contender.root_pid

    def tick(elapsed: float) -> None:
        seen.update(contender.worker_pids())
        while at and elapsed >= at[0]:
            at.pop(0)
            os.kill(master, contender.roll_signal)
            sent.append(round(elapsed, 2))

    mark = _log_mark(contender)
    proc = wrk.start(contender.url(PATH_SMALL), seconds, settings.connections)
    try:
        _during(proc, tick, 0.02)
        result = wrk.finish(proc, timeout=seconds + 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if len(sent) < n:
        raise RuntimeError(f"only {len(sent)} of {n} signals were sent before wrk ended")
    # Let the last roll finish before we count the fleet.
    procs.wait_for(lambda: len(contender.worker_pids()) == contender.workers, timeout=5)
    rolls = None
    if mark is not None:
        # bungate queues a roll asked for during one (one more runs afterwards): count
        # what the master did, from its log.
        procs.wait_for(lambda: _rolls(contender, mark)["busy"] == 0, timeout=30)
        rolls = _rolls(contender, mark)
    return {
        "status": "ok",
        "signal": contender.roll_label,
        "signals_sent_at_s": sent,
        "worker_pids_seen": len(seen),
        "workers_after": len(contender.worker_pids()),
        "master_alive": contender.alive(),
        "rolls": rolls,
        **result.as_dict(),
    }


def _log_mark(contender: Contender) -> Optional[int]:
    """:return: where the master's event log ends now, or None without one (nginx)."""
    mark = getattr(contender, "log_mark", None)
    return mark() if mark else None


def _rolls(contender: Contender, mark: int) -> Dict[str, int]:
    """Rolls the master started, finished and aborted since ``mark``, from its log."""
    kinds = [e["event"] for e in contender.events(mark)]  # type: ignore[attr-defined]
    started = kinds.count("roll-start")
    done = kinds.count("roll-done")
    aborted = kinds.count("roll-aborted")
    return {
        "started": started,
        "done": done,
        "aborted": aborted,
        "busy": started - done - aborted,
        "workers_ready": kinds.count("worker-ready"),
    }


def kill_worker(contender: Contender, settings: Settings) -> Dict[str, object]:
    """
    ``kill -9`` one worker a third into a wrk run; time its replacement.

    "spawned" is when a new child with the worker's process title appears; "serving" is
    when that new process holds a client connection: either one of our probe requests
    (a fresh connection, checked through /proc/net/tcp while still open) or one of wrk's.
    For bungate, the master's own log adds when it saw the exit, spawned the replacement
    and got its READY (``master_log``).

    :param contender: a running multi-worker contender.
    :param settings: run duration and how long to wait for the replacement.
    :return: wrk's figures and the two delays in ms.
    """
    seconds = settings.kill_duration
    state: Dict[str, Any] = {"killed": None, "t0": None, "new": None}
    times: Dict[str, Optional[float]] = {"spawned_ms": None, "serving_ms": None}
    how = {"serving_seen_by": None}
    old: set = set()

    def tick(elapsed: float) -> None:
        if state["killed"] is None:
            if elapsed < seconds / 3:
                return
            old.update(contender.worker_pids())
            victim = min(old)
            state["mark"] = _log_mark(contender)
            state["wall"] = time.time()
            os.kill(victim, signal.SIGKILL)
            state["killed"], state["t0"] = victim, time.monotonic()
            return
        if times["serving_ms"] is not None:
            return
        since = (time.monotonic() - state["t0"]) * 1e3
        if state["new"] is None:
            new = sorted(set(contender.worker_pids()) - old)
            if new:
                state["new"] = new[0]
                times["spawned_ms"] = round(since, 1)
            return
        pid = state["new"]
        if procs.established_per_pid([pid], contender.port).get(pid):
            times["serving_ms"] = round(since, 1)
            how["serving_seen_by"] = "a load connection"
            return
        try:
            _, _, server = probe.get(
                contender.port,
                PATH_SMALL,
                timeout=1.0,
                while_open=lambda cport: procs.server_of(cport, contender.port, [pid]),
            )
        except OSError:
            return
        if server == pid:
            times["serving_ms"] = round((time.monotonic() - state["t0"]) * 1e3, 1)
            how["serving_seen_by"] = "a probe request"

    proc = wrk.start(contender.url(PATH_SMALL), seconds, settings.connections)
    try:
        _during(proc, tick, 0.005)
        result = wrk.finish(proc, timeout=seconds + 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if state["killed"] is None:
        raise RuntimeError("wrk ended before a worker was killed")
    # wrk ended: keep waiting for the replacement, up to the time limit.
    deadline = state["t0"] + settings.kill_timeout
    while times["serving_ms"] is None and time.monotonic() < deadline:
        tick(seconds)
        time.sleep(0.005)
    if times["serving_ms"] is None:
        what = "spawned" if times["spawned_ms"] is None else "serving"
        raise RuntimeError(
            f"no replacement worker {what} within {settings.kill_timeout:.0f} s of the kill"
        )
    logged = None
    if state.get("mark") is not None:
        logged = procs.wait_for(
            lambda: _replacement(contender, state["mark"], state["killed"], state["wall"]),
            timeout=max(0.0, deadline - time.monotonic()),
        )
        logged = logged or _replacement(
            contender, state["mark"], state["killed"], state["wall"], partial=True
        )
    return {
        "status": "ok",
        "killed_pid": state["killed"],
        "new_pid": state["new"],
        **times,
        **how,
        "master_log": logged,
        **result.as_dict(),
    }


def _replacement(
    contender: Contender, mark: int, victim: int, killed_at: float, partial: bool = False
) -> Optional[Dict[str, object]]:
    """
    From the master's log: when it saw the victim exit, spawned its replacement, and got
    the replacement's READY (it listens and answers its control channel), in ms after the
    kill (``time.time()`` on both sides).

    :param partial: return what was found even without the READY line.
    :return: ``{"exit_ms", "spawn_ms", "ready_ms", "new_id", "new_pid", "exit"}``, or None
        until the READY line is there (unless ``partial``).
    """
    found: Dict[str, object] = {}
    new_pid = None
    for e in contender.events(mark):  # type: ignore[attr-defined]
        ms = round((float(e["log_time"]) - killed_at) * 1e3, 1)
        if e["event"] == "worker-exit" and e.get("pid") == victim and "exit_ms" not in found:
            found["exit_ms"] = ms
            found["exit"] = f"{e.get('kind')}, {e.get('description')}"
        elif e["event"] == "worker-spawn" and "exit_ms" in found and new_pid is None:
            new_pid = e.get("pid")
            found.update(spawn_ms=ms, new_id=e.get("worker_id"), new_pid=new_pid)
        elif e["event"] == "worker-ready" and new_pid is not None and e.get("pid") == new_pid:
            found["ready_ms"] = ms
            return found
    return found if partial and found else None


def _connections_now(contender: Contender, elapsed: float, ss: bool) -> Dict[str, object]:
    """
    Where the client connections are at this moment: queued in the kernel, unaccepted
    (``ss -ltn``: ``Recv-Q`` of the listening sockets), and held by each worker (sockets
    in its ``/proc/<pid>/fd`` matched with ``/proc/net/tcp``).

    :param contender: a running contender.
    :param elapsed: seconds since wrk started, for the record.
    :param ss: whether ``ss`` is there (without it: ``None`` for its figures).
    :return: ``{"at_s", "held", "listen", "unaccepted", "backlog", "established"}``.
    """
    sample: Dict[str, object] = {
        "at_s": round(elapsed, 2),
        "held": procs.established_per_pid(contender.worker_pids(), contender.port),
        "listen": None,
        "unaccepted": None,
        "backlog": None,
        "established": None,
    }
    if ss:
        try:
            queues = procs.listen_queues(contender.port)
            sample["listen"] = queues
            sample["unaccepted"] = sum(q["recv_q"] for q in queues)
            sample["backlog"] = sum(q["send_q"] for q in queues)
            sample["established"] = procs.established_count(contender.port)
        except (OSError, ValueError, IndexError, subprocess.SubprocessError) as e:
            sample["ss_error"] = str(e)
    return sample


def many_connections(contender: Contender, settings: Settings) -> Dict[str, object]:
    """
    ``GET /`` from ``c1000_connections`` (1000) keep-alive connections at once.

    Once at 1 s and once half-way through the run, look at where the connections are:
    how many the kernel has completed but no process accepted yet (the listening
    sockets' ``Recv-Q``), and how many each worker holds. wrk's descriptor limit is
    raised for the run; the servers keep the one they inherited from us (recorded).

    :param contender: a running contender.
    :param settings: connections, threads, duration.
    :return: wrk's figures, the two samples and the peak RSS.
    """
    seconds = settings.c1000_duration
    conns = settings.c1000_connections
    ss = procs.have_ss()
    at = {"at_1s": 1.0, "mid": max(1.0, seconds / 2)}
    samples: Dict[str, Dict[str, object]] = {}
    memory = Memory(contender)

    def tick(elapsed: float) -> None:
        memory.sample()
        for key, when in at.items():
            if key not in samples and elapsed >= when:
                same = [k for k in samples if at[k] == when]
                samples[key] = (
                    samples[same[0]] if same else _connections_now(contender, elapsed, ss)
                )

    proc = wrk.start(contender.url(PATH_SMALL), seconds, conns, settings.c1000_threads)
    try:
        _during(proc, tick, 0.05)
        result = wrk.finish(proc, timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    memory.sample()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "status": "ok",
        "connections": conns,
        "threads": settings.c1000_threads,
        "duration_s": seconds,
        "ss": ss,
        "samples": samples,
        "server_nofile": [soft, hard],
        "server_alive": contender.alive(),
        "workers_after": len(contender.worker_pids()),
        "memory": memory.as_dict(),
        **result.as_dict(),
    }


def _event_label(e: Dict[str, Any]) -> str:
    """A master log event, short: ``roll-start``, ``w1 ready``, ``w2 exit``, ``roll-done``."""
    kind = str(e["event"])
    if kind.startswith("worker-"):
        return f"w{e.get('worker_id', '?')} {kind[len('worker-') :]}"
    return kind


def roll_per_second(contender: Contender, settings: Settings) -> Dict[str, object]:
    """
    Requests per second, second by second, across one rolling restart.

    After a warm-up (``warmup_pypy``: the JIT of the old workers is warm),
    ``roll_pypy_duration`` back-to-back 1-second wrk runs (wrk reports no per-second
    figures; a run's own ``Requests/sec`` is exact and a new run costs ~30 ms); one
    ``SIGUSR2`` to the master just as run ``roll_pypy_second`` starts. Each second's row
    is one wrk run (its req/s, errors and p99) with the master's events that fell in it,
    from its JSON log. The summary compares the mean over ``roll_pypy_window`` runs from
    the signal on with the mean of the runs before it: what the roll and the new, cold
    workers cost.

    :param contender: a running bungate (its PyPy variant: new workers start cold).
    :param settings: durations, connections.
    :return: ``seconds`` (one row per run), ``summary``, ``rolls``.
    """
    url = contender.url(PATH_SMALL)
    if settings.warmup_pypy:
        wrk.run(url, settings.warmup_pypy, settings.connections)
    mark = _log_mark(contender)
    state: Dict[str, Any] = {"sent": None, "sent_wall": None}
    rows: List[Dict[str, Any]] = []
    t0 = time.monotonic()
    for i in range(settings.roll_pypy_duration):
        if not contender.alive():
            raise RuntimeError(f"the master exited{contender.log_tail()}")
        row: Dict[str, Any] = {"second": i, "from_s": round(time.monotonic() - t0, 2)}
        row["wall_start"] = time.time()
        if i == settings.roll_pypy_second:
            state["sent"], state["sent_wall"] = time.monotonic() - t0, time.time()
            os.kill(contender.root_pid, signal.SIGUSR2)
        proc = wrk.start(url, 1, settings.connections)
        try:
            result = wrk.finish(proc, timeout=15)
            row.update(result.as_dict())
        except wrk.WrkError as e:
            row.update(rps=0.0, requests=0, errors=None, wrk_error=str(e))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        row["to_s"] = round(time.monotonic() - t0, 2)
        row["wall_end"] = time.time()
        rows.append(row)
    if state["sent"] is None:
        raise RuntimeError(
            f"{settings.roll_pypy_duration} runs end before SIGUSR2 (run "
            f"{settings.roll_pypy_second}) was due"
        )
    rolls = None
    events: List[Dict[str, Any]] = []
    if mark is not None:
        procs.wait_for(lambda: _rolls(contender, mark)["busy"] == 0, timeout=30)
        rolls = _rolls(contender, mark)
        events = contender.events(mark)  # type: ignore[attr-defined]
    _place_events(rows, events, state["sent_wall"])
    return {
        "status": "ok",
        "signal": "SIGUSR2",
        "signal_at_s": round(state["sent"], 2),
        "signal_second": settings.roll_pypy_second,
        "connections": settings.connections,
        "seconds": rows,
        "rolls": rolls,
        "summary": _roll_summary(rows, state["sent_wall"], events, settings),
        "workers_after": len(contender.worker_pids()),
        "master_alive": contender.alive(),
    }


def _place_events(
    rows: List[Dict[str, Any]], events: List[Dict[str, Any]], sent_wall: float
) -> None:
    """Put the signal and each master event in the row (second) it fell in: the first
    run that ended after it (an event between two runs goes to the later one)."""
    marks = [(sent_wall, "SIGUSR2 sent")]
    marks += [(float(e["log_time"]), _event_label(e)) for e in events]
    for row in rows:
        row["events"] = []
    for when, label in sorted(marks):
        for row in rows:
            if when < row["wall_end"]:
                row["events"].append(label)
                break
        else:
            rows[-1].setdefault("events_after", []).append(label)


def _roll_summary(
    rows: List[Dict[str, Any]],
    sent_wall: float,
    events: List[Dict[str, Any]],
    settings: Settings,
) -> Dict[str, Any]:
    """
    Mean req/s of the ``roll_pypy_window`` runs from the signal on against the runs
    before it; the worst second after it; how long the roll took by the master's log.
    """
    first = settings.roll_pypy_second
    before = [r["rps"] for r in rows[:first]]
    after = [r["rps"] for r in rows[first : first + settings.roll_pypy_window]]
    mean_before = statistics.mean(before) if before else None
    mean_after = statistics.mean(after) if after else None
    worst = min(after) if after else None
    times = {e["event"]: float(e["log_time"]) for e in reversed(events)}  # first of each
    done = next(
        (float(e["log_time"]) for e in events if e["event"] in ("roll-done", "roll-aborted")),
        None,
    )
    return {
        "before_mean_rps": None if mean_before is None else round(mean_before, 1),
        "before_seconds": len(before),
        "after_mean_rps": None if mean_after is None else round(mean_after, 1),
        "after_seconds": len(after),
        "ratio": round(mean_after / mean_before, 3) if mean_before and after else None,
        "worst_second_rps": worst,
        "worst_ratio": round(worst / mean_before, 3) if mean_before and after else None,
        "roll_start_ms": _ms_after(times.get("roll-start"), sent_wall),
        "roll_done_ms": _ms_after(done, sent_wall),
        "errors": sum(r.get("errors") or 0 for r in rows),
    }


def _ms_after(when: Optional[float], since: float) -> Optional[float]:
    return None if when is None else round((when - since) * 1e3, 1)


__all__ = [
    "PATH_1MIB",
    "Memory",
    "Settings",
    "kill_worker",
    "many_connections",
    "roll",
    "roll_per_second",
    "slow_client",
    "throughput",
]
