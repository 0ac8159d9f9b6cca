"""The scenarios beyond plain HTTP/1.1 GETs: policies on a route, WebSockets, HTTP/2.

- :func:`policy`: bungate-2w against itself with one policy on its route (JWT, API key,
  local or Redis rate limit), wrk as in ``get``; checks the policy is in force and that
  every request passed.
- :func:`websocket`: echo round trips through each proxy to ``bench/ws.py serve``, loaded
  by ``bench/ws.py load``.
- :func:`h2`: HTTP/2 over TLS with h2load, to the same nginx upstream.

Each returns ``{contender name: result}`` like :mod:`harness.scenarios`; contenders are
interleaved and repeated (A B C A B C ...) and the medians quoted.
"""

import http.client
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from . import h2load, probe, procs
from .contenders import BENCH_DIR, PATH_SMALL, BungatePolicy, Contender
from .scenarios import (
    Memory,
    Settings,
    _children_cpu,
    _cpu_total,
    _during,
    _median,
    _request_share,
    throughput,
)

Log = Callable[[str], None]


def _failed(reason: str, **figures: Any) -> Dict[str, Any]:
    return {"status": "failed", "reason": reason, **figures}


def _sampler(c: Contender, memory: Memory, seconds: float, conns: Dict[int, int]):
    """A tick for :func:`_during`: peak RSS, and (several workers) half-way through the
    run the client connections each worker holds."""

    def tick(elapsed: float) -> None:
        memory.sample()
        if not conns and elapsed >= seconds / 2 and c.workers > 1:
            conns.update(procs.established_per_pid(c.worker_pids(), c.port))

    return tick


# --- policy -------------------------------------------------------------------------------


def _policy_check(c: Contender) -> Optional[str]:
    """
    Show the policy is in force before loading it.

    - auth: a request without credentials is refused (and one with them passes);
    - rate limit: the answer carries ``RateLimit-Limit: 100000000``;
    - Redis: one request makes Redis decide once more (``EVALSHA``).

    :return: what was seen (for the table), or ``None`` for plain bungate.
    :raises RuntimeError: when the policy is not in force or a credentialed request fails.
    """
    if not isinstance(c, BungatePolicy):
        return None
    before = c.counters()
    status, headers, _ = probe.fetch(c.port, PATH_SMALL, timeout=5.0, headers=c.load_headers)
    if status != 200:
        raise RuntimeError(f"GET / with the load's credentials answered {status}, not 200")
    if c.policy in ("jwt", "apikey"):
        bare, _, _ = probe.fetch(c.port, PATH_SMALL, timeout=5.0)
        if bare == 200:
            raise RuntimeError("the policy is not in force: GET / without credentials got 200")
        return f"no credentials: {bare}; with: {status}"
    limit = headers.get("ratelimit-limit")
    if limit != "100000000":
        raise RuntimeError(f"the rate limit is not in force: RateLimit-Limit is {limit!r}")
    seen = f"RateLimit-Limit: {limit}"
    if c.policy == "ratelimit-redis":
        after = c.counters()
        if not before or not after:
            raise RuntimeError("the harness's Redis does not answer INFO")
        made = after["redis_decisions"] - before["redis_decisions"]
        if made < 1:
            raise RuntimeError(
                "Redis made no decision for a request: the local fallback decided "
                f"(on_backend_error: allow){c.log_tail()}"
            )
        seen += f"; Redis decided it ({made} EVALSHA)"
    return seen


def policy(
    contenders: List[Contender], settings: Settings, log: Log, upstream: Contender
) -> Dict[str, Dict[str, Any]]:
    """
    ``GET /`` through plain bungate-2w and through bungate-2w with one policy each, the
    load carrying the credentials (wrk ``-H``), as in ``get``.

    A contender fails when its policy is not in force (:func:`_policy_check`), when any
    request of the load was answered non-2xx/3xx (wrk's ``Non-2xx or 3xx responses``:
    401, 429, ...), or, for the Redis backend, when Redis decided fewer than 99 % of the
    requests (the rest went to the local fallback).

    :return: per contender: :func:`~harness.scenarios.throughput`'s figures plus
        ``vs_plain`` (req/s over plain bungate-2w's) and ``check``.
    """
    checks: Dict[str, Optional[str]] = {}
    broken: Dict[str, str] = {}
    for c in contenders:
        try:
            checks[c.name] = _policy_check(c)
        except (RuntimeError, OSError, http.client.HTTPException) as e:
            broken[c.name] = str(e)
    ready = [c for c in contenders if c.name not in broken]
    results = throughput(ready, PATH_SMALL, settings, settings.warmup, log, upstream)
    for name, reason in broken.items():
        results[name] = _failed(reason)
    plain = results.get("bungate-2w") or {}
    for c in contenders:
        r = results[c.name]
        if r["status"] != "ok":
            continue
        r["check"] = checks.get(c.name)
        r["load_headers"] = sorted(c.load_headers)
        if plain.get("status") == "ok" and plain["rps"]:
            r["vs_plain"] = round(r["rps"] / plain["rps"], 3)
        if r["non_2xx_3xx"]:
            try:
                now = probe.get(c.port, PATH_SMALL, headers=c.load_headers, timeout=5.0)[0]
            except (OSError, http.client.HTTPException) as e:
                now = f"{type(e).__name__}: {e}"
            results[c.name] = {
                **r,
                "status": "failed",
                "reason": f"{r['non_2xx_3xx']} requests of the load were refused (wrk's "
                f"Non-2xx or 3xx responses); GET / with the credentials now answers {now}",
            }
            continue
        per = r.get("redis_decisions_per_request")
        if getattr(c, "policy", None) == "ratelimit-redis" and (per is None or per < 0.99):
            results[c.name] = {
                **r,
                "status": "failed",
                "reason": f"Redis decided {per} per request: the rest went to the local "
                "fallback (on_backend_error: allow)",
            }
    return {c.name: results[c.name] for c in contenders}


# --- websocket ----------------------------------------------------------------------------


def _ws_client(port: int, seconds: float, connections: int) -> subprocess.Popen:
    script = os.path.join(BENCH_DIR, "ws.py")
    return subprocess.Popen(
        [sys.executable, script, "load", str(port), str(connections), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
    )


def _ws_finish(proc: subprocess.Popen, timeout: float) -> Dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"the WebSocket client did not finish within {timeout:.0f} s") from None
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the WebSocket client exited {proc.returncode}: {err.strip()[-500:]}")
    result = json.loads(lines[-1])
    if not result["connected"] or not result["messages"]:
        raise RuntimeError(f"no WebSocket round trip: {result['first_error']}")
    return result


def _ws_run(c: Contender, seconds: int, connections: int, others: List[int]) -> Dict[str, Any]:
    """One counted client run with memory and CPU per message (server; client+upstream)."""
    memory = Memory(c)
    server_pids = c.pids()
    conns: Dict[int, int] = {}
    cpu_server, cpu_others, cpu_client = (
        _cpu_total(server_pids), _cpu_total(others), _children_cpu(),
    )  # fmt: skip
    started = time.monotonic()
    proc = _ws_client(c.port, seconds, connections)
    try:
        _during(proc, _sampler(c, memory, seconds, conns), 0.25)
        run = _ws_finish(proc, timeout=seconds + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.monotonic() - started
    cpu_server = _cpu_total(server_pids) - cpu_server
    cpu_rest = _cpu_total(others) - cpu_others + _children_cpu() - cpu_client
    n = run["messages"]
    run["memory"] = memory
    run["cpu_us_per_message"] = {
        "server": round(cpu_server / n * 1e6, 1),
        "client_and_upstream": round(cpu_rest / n * 1e6, 1),
    }
    run["cores_busy"] = round((cpu_server + cpu_rest) / wall, 2)
    if c.workers > 1:
        run["connections_per_worker"] = conns
    return run


def websocket(
    contenders: List[Contender], settings: Settings, log: Log, echo: Contender
) -> Dict[str, Dict[str, Any]]:
    """
    WebSocket echo round trips per second through each contender to ``echo``.

    ``ws_connections`` connections, each with one 64-byte message in flight; a warm-up
    run (PyPy: ``warmup_pypy`` before its first), then a counted run per contender,
    interleaved and repeated. A run fails when no connection opened or a connection's
    handshake failed or an echo came back wrong; connections closed during the run
    are counted as errors.

    :param echo: the upstream (``ws-direct`` when it is a contender itself: the ceiling).
    :return: per contender: median messages/s, round-trip percentiles, errors, CPU.
    """
    conns = settings.ws_connections
    runs: Dict[str, List[Dict[str, Any]]] = {c.name: [] for c in contenders}
    errors: Dict[str, str] = {}
    for rep in range(settings.repeat):
        for c in contenders:
            if c.name in errors:
                continue
            log(f"  {c.name}: run {rep + 1}/{settings.repeat}")
            try:
                if not c.alive():
                    raise RuntimeError(f"the server exited{c.log_tail()}")
                seconds = settings.warmup
                if rep == 0 and getattr(c, "pypy", False):
                    seconds = max(seconds, settings.warmup_pypy)
                if seconds:
                    _ws_finish(_ws_client(c.port, seconds, conns), timeout=seconds + 60)
                others = echo.pids() if echo is not c else []
                run = _ws_run(c, settings.duration, conns, others)
                bad = run["errors"]["handshake"] + run["errors"]["bad_echo"]
                if bad:
                    raise RuntimeError(f"{bad} connections failed: {run['first_error']}")
                runs[c.name].append(run)
            except (RuntimeError, OSError, ValueError, KeyError) as e:
                errors[c.name] = str(e)
    out: Dict[str, Dict[str, Any]] = {}
    for c in contenders:
        if c.name in errors:
            out[c.name] = _failed(errors[c.name], runs=_plain(runs[c.name]))
            continue
        rs = runs[c.name]
        memory = rs[0]["memory"]
        for r in rs[1:]:
            memory.merge(r["memory"])
        rates = [r["rate"] for r in rs]
        out[c.name] = {
            "status": "ok",
            "connections": conns,
            "messages_per_s": _median(rates),
            "messages_per_s_min": min(rates),
            "messages_per_s_max": max(rates),
            "p50_ms": _median([r["latency_ms"]["p50"] for r in rs]),
            "p99_ms": _median([r["latency_ms"]["p99"] for r in rs]),
            "errors": sum(r["error_count"] for r in rs),
            "cpu_us_server": _median([r["cpu_us_per_message"]["server"] for r in rs]),
            "cpu_us_client_and_upstream": _median(
                [r["cpu_us_per_message"]["client_and_upstream"] for r in rs]
            ),
            "cores_busy": _median([r["cores_busy"] for r in rs]),
            "connections_per_worker": rs[-1].get("connections_per_worker"),
            "memory": memory.as_dict(),
            "runs": _plain(rs),
        }
    return out


def _plain(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The runs with their Memory objects as dicts (for the JSON)."""
    return [
        {**r, "memory": r["memory"].as_dict() if isinstance(r["memory"], Memory) else r["memory"]}
        for r in runs
    ]


# --- h2 -----------------------------------------------------------------------------------


def _h2_run(c: Contender, settings: Settings, upstream: Contender) -> Dict[str, Any]:
    """One counted h2load run with memory and CPU per request (server; h2load+upstream)."""
    memory = Memory(c)
    server_pids, upstream_pids = c.pids(), upstream.pids()
    served_before = c.served() if c.workers > 1 else None
    conns: Dict[int, int] = {}
    cpu_server, cpu_up, cpu_h2load = (
        _cpu_total(server_pids), _cpu_total(upstream_pids), _children_cpu(),
    )  # fmt: skip
    started = time.monotonic()
    seconds = settings.duration
    proc = h2load.start(c.url(PATH_SMALL), seconds, settings.h2_clients, settings.h2_streams)
    try:
        _during(proc, _sampler(c, memory, seconds, conns), 0.25)
        run = h2load.finish(proc, timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.monotonic() - started
    cpu_server = _cpu_total(server_pids) - cpu_server
    cpu_rest = _cpu_total(upstream_pids) - cpu_up + _children_cpu() - cpu_h2load
    done = run["requests"]["succeeded"]
    run["memory"] = memory
    if done:
        run["cpu_us_per_request"] = {
            "server": round(cpu_server / done * 1e6, 1),
            "h2load_and_upstream": round(cpu_rest / done * 1e6, 1),
        }
    run["cores_busy"] = round((cpu_server + cpu_rest) / wall, 2)
    if c.workers > 1:
        run["request_share"] = _request_share(served_before, c.served())
        run["connections_per_worker"] = conns
    return run


def h2(
    contenders: List[Contender], settings: Settings, log: Log, upstream: Contender
) -> Dict[str, Dict[str, Any]]:
    """
    HTTP/2 over TLS: ``h2load -t1 -c<h2_clients> -m<h2_streams> -D<duration>`` on
    ``https://127.0.0.1:<port>/``; a warm-up run, then a counted run per contender,
    interleaved and repeated. A contender fails when ALPN does not choose h2, when no
    request succeeded, or when any request failed or was answered non-2xx.

    :return: per contender: median req/s, succeeded/failed, request time mean and max.
    """
    runs: Dict[str, List[Dict[str, Any]]] = {c.name: [] for c in contenders}
    errors: Dict[str, str] = {}
    for rep in range(settings.repeat):
        for c in contenders:
            if c.name in errors:
                continue
            log(f"  {c.name}: run {rep + 1}/{settings.repeat}")
            try:
                if not c.alive():
                    raise RuntimeError(f"the server exited{c.log_tail()}")
                if settings.warmup:
                    h2load.run(
                        c.url(PATH_SMALL), settings.warmup, settings.h2_clients, settings.h2_streams
                    )
                run = _h2_run(c, settings, upstream)
                runs[c.name].append(run)
                req, status = run["requests"], run["status"]
                bad = req["failed"] + req["errored"] + req["timeout"]
                refused = sum(v for k, v in status.items() if k != "2xx")
                if not req["succeeded"] or bad or refused:
                    raise RuntimeError(
                        f"{req['succeeded']} succeeded, {bad} failed/errored/timed out, "
                        f"status codes {status}"
                    )
            except (RuntimeError, OSError) as e:
                errors[c.name] = str(e)
    out: Dict[str, Dict[str, Any]] = {}
    for c in contenders:
        rs = runs[c.name]
        if c.name in errors:
            out[c.name] = _failed(errors[c.name], runs=_plain(rs))
            continue
        memory = rs[0]["memory"]
        for r in rs[1:]:
            memory.merge(r["memory"])
        rps = [r["rps"] for r in rs]
        out[c.name] = {
            "status": "ok",
            "clients": settings.h2_clients,
            "streams": settings.h2_streams,
            "rps": _median(rps),
            "rps_min": min(rps),
            "rps_max": max(rps),
            "succeeded": sum(r["requests"]["succeeded"] for r in rs),
            "failed": sum(r["requests"][k] for r in rs for k in ("failed", "errored", "timeout")),
            "request_mean_ms": _median([r["request_ms"].get("mean") for r in rs]),
            "request_max_ms": max((r["request_ms"].get("max") or 0.0) for r in rs),
            "cpu_us_server": _median([r.get("cpu_us_per_request", {}).get("server") for r in rs]),
            "cpu_us_h2load_and_upstream": _median(
                [r.get("cpu_us_per_request", {}).get("h2load_and_upstream") for r in rs]
            ),
            "cores_busy": _median([r["cores_busy"] for r in rs]),
            "request_share": rs[-1].get("request_share"),
            "connections_per_worker": rs[-1].get("connections_per_worker"),
            "memory": memory.as_dict(),
            "runs": _plain(rs),
        }
    return out


__all__ = ["h2", "policy", "websocket"]
