"""Markdown tables from scenario results (see bench/README.md for the columns)."""

import os
import re
from typing import Dict, List, Optional

TITLES = {
    "get": "GET / (13-byte body), wrk -t1 -c{c}",
    "1mib": "GET 1 MiB body, wrk -t1 -c{c}",
    "slow": "Slow client reading 100 MiB through the proxy",
    "roll": "Rolling restarts under load",
    "kill": "kill -9 of one worker under load",
    "c1000": "GET / from {c} connections at once, wrk -t2 -c{c}: req/s, accept queue, "
    "connections per worker",
    "roll-pypy": "One rolling restart (SIGUSR2) under load, second by second, wrk -t1 -c{c} "
    "in back-to-back 1 s runs",
    "policy": "GET / through bungate-2w with one policy on its route, wrk -t1 -c{c}",
    "websocket": "WebSocket echo, 64-byte text frames, {c} connections with one message "
    "in flight each (bench/ws.py)",
    "h2": "HTTP/2 over TLS, GET / (13-byte body), h2load -t1 -c{c} -m{m}",
}

COLUMNS = {
    "get": [
        "contender", "req/s", "min-max", "p50 ms", "p99 ms", "errors",
        "RSS MiB", "RSS MiB per process", "CPU µs/req: server, wrk+upstream", "cores busy",
        "share of requests", "conns per worker",
    ],
    "1mib": [
        "contender", "MB/s", "min-max", "req/s", "p50 ms", "p99 ms", "errors",
        "RSS MiB", "RSS MiB per process",
    ],
    "slow": [
        "contender", "MiB read", "s", "client MiB/s", "complete",
        "peak RSS MiB", "peak RSS MiB per process", "RSS MiB before",
    ],
    "roll": [
        "contender", "signals", "rolls done (master log)", "req/s", "errors",
        "socket c/r/w/t", "non-2xx/3xx", "worker pids seen", "workers after",
    ],
    "kill": [
        "contender", "killed → new pid", "exit seen ms", "spawned ms", "ready ms",
        "serving ms", "errors", "socket c/r/w/t", "non-2xx/3xx", "req/s",
    ],
    "c1000": [
        "contender", "req/s", "p50 ms", "p99 ms", "timeouts", "errors", "socket c/r/w/t",
        "unaccepted @1s", "unaccepted @mid", "backlog", "held per worker @1s",
        "held per worker @mid", "RSS MiB",
    ],
    "roll-pypy": ["second", "from s", "req/s", "p99 ms", "errors", "event"],
    "policy": [
        "contender", "req/s", "vs plain", "min-max", "p99 ms",
        "CPU µs/req: server (+ Redis), wrk+upstream", "errors (non-2xx/3xx)", "policy check",
    ],
    "websocket": [
        "contender", "messages/s", "min-max", "p50 ms", "p99 round trip ms", "errors",
        "CPU µs/msg: server, client+upstream", "cores busy", "RSS MiB", "conns per worker",
    ],
    "h2": [
        "contender", "req/s", "min-max", "succeeded/failed", "request mean ms",
        "request max ms", "CPU µs/req: server, h2load+upstream", "cores busy", "RSS MiB",
        "share of requests", "conns per worker",
    ],
}  # fmt: skip


def _cell(value: object) -> str:
    return re.sub(r"\s+", " ", str(value)).replace("|", "\\|").strip()


def _num(value: Optional[float], digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _label(title: str, index: int, count: int = 1) -> str:
    """
    A short name for a process: M (master), w1 (bungate worker 1), w (nginx worker);
    the Bun original's (all ``bun gateway.ts``): M and w1, w2, ... in its cluster mode.
    """
    m = re.search(r"bungate worker (\S+)", title)
    if m:
        return f"w{m.group(1)}"
    if title.endswith("gateway.ts") and count > 1:
        return "M" if index == 0 else f"w{index}"
    if title.startswith(("bungate master", "nginx: master")):
        return "M"
    if title.startswith("nginx: worker"):
        return "w"
    return "main" if index == 0 else f"p{index}"


def _per_process(memory: Dict[str, object]) -> str:
    parts = [
        f"{_label(p['title'], i, len(memory['per_process']))} {p['kib'] / 1024:.0f}"
        for i, p in enumerate(memory["per_process"])
    ]
    return " / ".join(parts) or "-"


def _mib(kib: Optional[float]) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def _shares(values: Optional[Dict[object, object]], percent: bool) -> str:
    if not values:
        return "-"
    if percent:
        return " / ".join("?" if v is None else f"{v * 100:.0f}%" for v in values.values())
    return " / ".join(str(v) for v in values.values())


def _socket(r: Dict[str, object]) -> str:
    e = r["socket_errors"]
    return f"{e['connect']}/{e['read']}/{e['write']}/{e['timeout']}"


def _row(scenario: str, name: str, r: Dict[str, object]) -> List[str]:
    if r["status"] != "ok":
        return [name, f"{r['status']}: {r['reason']}"] + [""] * (len(COLUMNS[scenario]) - 2)
    if scenario == "get":
        return [
            name, _num(r["rps"]), f"{_num(r['rps_min'])}-{_num(r['rps_max'])}",
            _ms(r["p50_ms"]), _ms(r["p99_ms"]), str(r["errors"]),
            _mib(r["memory"]["total_kib"]), _per_process(r["memory"]),
            f"{_num(r.get('cpu_us_server'))}, {_num(r.get('cpu_us_wrk_and_upstream'))}",
            _num(r.get("cores_busy"), 2),
            _shares(r.get("request_share"), True), _shares(r.get("connections"), False),
        ]  # fmt: skip
    if scenario == "1mib":
        return [
            name, _num(r["mb_per_s"], 1),
            f"{_num(r['mb_per_s_min'], 1)}-{_num(r['mb_per_s_max'], 1)}",
            _num(r["rps"]), _ms(r["p50_ms"]), _ms(r["p99_ms"]), str(r["errors"]),
            _mib(r["memory"]["total_kib"]), _per_process(r["memory"]),
        ]  # fmt: skip
    if scenario == "slow":
        return [
            name, f"{r['bytes'] / 2**20:.1f}", f"{r['seconds']:.1f}",
            f"{r['client_mib_per_s']:.1f}", "yes" if r["complete"] else "no (time limit)",
            _mib(r["memory"]["total_kib"]), _per_process(r["memory"]),
            _mib(r["rss_before"]["total_kib"]),
        ]  # fmt: skip
    if scenario == "roll":
        rolls = r.get("rolls")
        done = "-"
        if rolls:
            aborted = f", {rolls['aborted']} aborted" if rolls["aborted"] else ""
            done = f"{rolls['done']}{aborted}"
        return [
            name, f"{r['signal']} x {len(r['signals_sent_at_s'])}", done, _num(r["rps"]),
            str(r["errors"]), _socket(r), str(r["non_2xx_3xx"]),
            str(r["worker_pids_seen"]), str(r["workers_after"]),
        ]  # fmt: skip
    if scenario == "kill":
        logged = r.get("master_log") or {}
        spawned = logged.get("spawn_ms", r["spawned_ms"])
        return [
            name, f"{r['killed_pid']} → {r['new_pid']}", _ms(logged.get("exit_ms")),
            _ms(spawned), _ms(logged.get("ready_ms")),
            f"{_ms(r['serving_ms'])} ({r['serving_seen_by']})", str(r["errors"]),
            _socket(r), str(r["non_2xx_3xx"]), _num(r["rps"]),
        ]  # fmt: skip
    if scenario == "c1000":
        samples = r["samples"]
        one, mid = samples.get("at_1s") or {}, samples.get("mid") or {}
        return [
            name, _num(r["rps"]), _ms(r["latency_ms"].get("p50")),
            _ms(r["latency_ms"].get("p99")), str(r["socket_errors"]["timeout"]),
            str(r["errors"]), _socket(r), _queued(one, r["ss"]), _queued(mid, r["ss"]),
            _backlog(mid or one, r["ss"]), _shares(one.get("held"), False),
            _shares(mid.get("held"), False), _mib(r["memory"]["total_kib"]),
        ]  # fmt: skip
    if scenario == "policy":
        helpers = r.get("cpu_us_helpers")
        cpu = _num(r.get("cpu_us_server")) + (f" (+ {_num(helpers)})" if helpers else "")
        ratio = r.get("vs_plain")
        return [
            name, _num(r["rps"]), "-" if ratio is None else f"{ratio:.2f}x",
            f"{_num(r['rps_min'])}-{_num(r['rps_max'])}", _ms(r["p99_ms"]),
            f"{cpu}, {_num(r.get('cpu_us_wrk_and_upstream'))}",
            f"{r['errors']} ({r['non_2xx_3xx']})", _policy_seen(r),
        ]  # fmt: skip
    if scenario == "websocket":
        return [
            name, _num(r["messages_per_s"]),
            f"{_num(r['messages_per_s_min'])}-{_num(r['messages_per_s_max'])}",
            _ms(r["p50_ms"]), _ms(r["p99_ms"]), str(r["errors"]),
            f"{_num(r['cpu_us_server'])}, {_num(r['cpu_us_client_and_upstream'])}",
            _num(r["cores_busy"], 2), _mib(r["memory"]["total_kib"]),
            _shares(r.get("connections_per_worker"), False),
        ]  # fmt: skip
    if scenario == "h2":
        return [
            name, _num(r["rps"]), f"{_num(r['rps_min'])}-{_num(r['rps_max'])}",
            f"{r['succeeded']:,}/{r['failed']}", _ms(r["request_mean_ms"]),
            _ms(r["request_max_ms"]),
            f"{_num(r['cpu_us_server'])}, {_num(r['cpu_us_h2load_and_upstream'])}",
            _num(r["cores_busy"], 2), _mib(r["memory"]["total_kib"]),
            _shares(r.get("request_share"), True),
            _shares(r.get("connections_per_worker"), False),
        ]  # fmt: skip
    raise ValueError(scenario)


def _policy_seen(r: Dict[str, object]) -> str:
    """The policy check, and for Redis how many decisions it made per request."""
    seen = str(r.get("check") or "-")
    per = r.get("redis_decisions_per_request")
    if per is not None:
        seen += f"; Redis decisions per request during the runs: {per:.2f}"
    return seen


def _queued(sample: Dict[str, object], ss: bool) -> str:
    """Unaccepted connections (Recv-Q of the listening sockets, summed; each in brackets
    when there are several, one per worker with SO_REUSEPORT)."""
    if not ss:
        return "n/a (no ss)"
    listen = sample.get("listen")
    if not listen:
        return "-" if not sample else f"? ({sample.get('ss_error', 'no listener')})"
    total = str(sample["unaccepted"])
    if len(listen) > 1:  # type: ignore[arg-type]
        total += " (" + " + ".join(str(q["recv_q"]) for q in listen) + ")"  # type: ignore
    return total


def _backlog(sample: Dict[str, object], ss: bool) -> str:
    listen = sample.get("listen") if ss else None
    if not listen:
        return "-"
    return " + ".join(str(q["send_q"]) for q in listen)  # type: ignore[union-attr]


def _roll_pypy(name: str, r: Dict[str, object]) -> List[str]:
    """The per-second table of ``roll-pypy`` for one contender, and its summary line."""
    cols = COLUMNS["roll-pypy"]
    lines = [
        f"{name}, {r['signal']} at {r['signal_at_s']:.1f} s, as second "
        f"{r['signal_second']} started:",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for row in r["seconds"]:  # type: ignore[union-attr]
        events = ", ".join(row["events"])
        if row.get("events_after"):
            events += ("; " if events else "") + "after the last run: "
            events += ", ".join(row["events_after"])
        if row.get("wrk_error"):
            events = f"wrk failed: {row['wrk_error']}; {events}"
        cells = [
            str(row["second"]), f"{row['from_s']:.1f}", _num(row["rps"]),
            _ms((row.get("latency_ms") or {}).get("p99")),
            "-" if row.get("errors") is None else str(row["errors"]), events,
        ]  # fmt: skip
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    s = r["summary"]
    ratio = "-" if s["ratio"] is None else f"{s['ratio']:.2f}x"  # type: ignore[index]
    worst = "-" if s["worst_ratio"] is None else f"{s['worst_ratio']:.2f}x"  # type: ignore
    done = s["roll_done_ms"]  # type: ignore[index]
    lines += [
        "",
        f"{name}: mean req/s in the {s['after_seconds']} s from the SIGUSR2 on: "  # type: ignore
        f"{_num(s['after_mean_rps'])} vs {_num(s['before_mean_rps'])} in the "  # type: ignore
        f"{s['before_seconds']} s before: **{ratio}**; worst second {worst}; "  # type: ignore
        f"roll done {'-' if done is None else f'{done / 1e3:.1f} s'} after the signal "
        f"(master log); errors {s['errors']}; workers after {r['workers_after']}",  # type: ignore
    ]
    return lines


def table(
    scenario: str,
    results: Dict[str, Dict[str, object]],
    connections: int,
    streams: Optional[int] = None,
) -> str:
    """
    One scenario as a markdown table with a heading.

    :param scenario: one of ``bench/run``'s scenarios.
    :param results: ``{contender name: result}`` from the scenario.
    :param connections: wrk's (h2load's, the WebSocket client's) connections, for the
        heading.
    :param streams: h2load's concurrent streams per connection, for h2's heading.
    :return: markdown text.
    """
    lines = [f"### {TITLES[scenario].format(c=connections, m=streams)}", ""]
    if scenario == "roll-pypy":
        for name, r in results.items():
            if r["status"] == "ok":
                lines += [*_roll_pypy(name, r), ""]
            else:
                lines += [f"{name}: {r['status']}: {_cell(r['reason'])}", ""]
        return "\n".join(lines)
    cols = COLUMNS[scenario]
    lines += [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for name, r in results.items():
        lines.append("| " + " | ".join(_cell(c) for c in _row(scenario, name, r)) + " |")
    if scenario == "c1000":
        if any(r["status"] == "ok" and not r["ss"] for r in results.values()):
            lines += ["", "(ss is not on PATH: no accept-queue figures; apt-get install iproute2)"]
        lines += [
            "",
            "unaccepted: connections the kernel completed that no process accepted yet "
            "(`ss -ltn` Recv-Q of the listening sockets, one per worker with SO_REUSEPORT); "
            "backlog: their limit (Send-Q); held: established connections in each worker's "
            "descriptors; timeouts: wrk's (no answer within 2 s)",
        ]
    if scenario in NOTES:
        lines += ["", NOTES[scenario]]
    return "\n".join(lines) + "\n"


NOTES = {
    "policy": "vs plain: req/s over plain bungate-2w's in the same sitting; errors: socket "
    "errors + non-2xx/3xx (in brackets: wrk's `Non-2xx or 3xx responses`, i.e. refused "
    "requests: a contender with any fails the run)",
    "websocket": "round trip: a 64-byte masked text frame out, its echo back, per "
    "connection; the client and the echo upstream are pure Python (`bench/ws.py`) on the "
    "same cores: where a server's CPU per message is below client+upstream's, the load is "
    "the limit and its messages/s a floor",
    "h2": "h2load reports no percentiles: request time mean is the median over runs of "
    "its mean, max the largest of any run",
}


def _ok(results: Dict[str, Dict[str, Dict[str, object]]], scenario: str, name: str):
    r = results.get(scenario, {}).get(name)
    return r if r and r["status"] == "ok" else None


def _ratio(a: Optional[Dict[str, object]], b: Optional[Dict[str, object]]) -> str:
    if not (a and b and b["rps"]):
        return "-"
    return f"{a['rps'] / b['rps']:.2f}x"


def _rolls_done(roll: Dict[str, object]) -> str:
    asked = len(roll["signals_sent_at_s"])  # type: ignore[arg-type]
    rolls = roll.get("rolls")
    if not rolls:
        return f"{asked} rolls asked"
    return f"{rolls['done']} rolls done, {asked} asked"  # type: ignore[index]


def _scaling(get: Dict[str, Optional[Dict[str, object]]]) -> str:
    """
    What one request costs the workers with one worker and with two, and how busy the
    cores were with two: equal costs and saturated cores mean the workers scale and
    the machine (shared with wrk and the upstream) is the limit.
    """
    one, two = get["bungate-1w"], get["bungate-2w"]
    a = (one or {}).get("cpu_us_server")
    b = (two or {}).get("cpu_us_server")
    if not (a and b):
        return "-"
    busy = (two or {}).get("cores_busy")
    cores = f", {busy:.2f} of {os.cpu_count()} cores busy with 2" if busy else ""
    return f"{b:.0f} vs {a:.0f} µs/req{cores}"


def _cpu_ratio(get: Dict[str, Optional[Dict[str, object]]]) -> str:
    """CPython workers' CPU per request over PyPy workers' (2 workers each): the speed-up
    of the workers themselves, which req/s understates when wrk and the upstream share
    the cores."""
    cpython, pypy = get["bungate-2w"], get["bungate-2w-pypy"]
    a = (cpython or {}).get("cpu_us_server")
    b = (pypy or {}).get("cpu_us_server")
    return f"{a / b:.2f}x ({a:.0f} / {b:.0f} µs/req)" if a and b else "-"  # type: ignore[operator]


def goals(results: Dict[str, Dict[str, Dict[str, object]]]) -> str:
    """
    The issue's goals as ratios from this run (reported, never asserted).

    :param results: ``{scenario: {contender: result}}``.
    :return: a markdown table, or ``""`` when no figure is available.
    """
    get = {
        n: _ok(results, "get", n)
        for n in ("bungate-1w", "bungate-2w", "bungate-1w-pypy", "bungate-2w-pypy")
    }
    stock = _ok(results, "get", "twisted-stock")
    rows = [
        ("req/s bungate-1w / twisted-stock", _ratio(get["bungate-1w"], stock), ">= 1.5x (2x)"),
        ("req/s bungate-2w / bungate-1w", _ratio(get["bungate-2w"], get["bungate-1w"]), ">= 1.6x"),
    ]
    rows.append(("  workers' CPU per request, 2 workers vs 1", _scaling(get), "-"))
    share = (get["bungate-2w"] or {}).get("request_share") or {}
    values = list(share.values())
    off = max(abs(v * len(values) - 1) for v in values) if values else None
    rows.append(
        (
            "bungate-2w worst worker share of requests off an even split",
            "-" if off is None else f"{off * 100:.0f}%",
            "<= 20%",
        )
    )
    rows.append(
        (
            "req/s bungate-2w-pypy / bungate-2w",
            _ratio(get["bungate-2w-pypy"], get["bungate-2w"]),
            ">= 2.5x",
        )
    )
    rows.append(("  the same, workers' CPU per request only", _cpu_ratio(get), "-"))
    rows.append(
        (
            "req/s bungate-1w-pypy / bungate-1w",
            _ratio(get["bungate-1w-pypy"], get["bungate-1w"]),
            ">= 2.5x",
        )
    )
    roll = _ok(results, "roll", "bungate-2w")
    rows.append(
        (
            "errors through rolling restarts, bungate-2w",
            "-" if roll is None else f"{roll['errors']} ({_rolls_done(roll)})",
            "0 (8 rolls)",
        )
    )
    kill = _ok(results, "kill", "bungate-2w")
    ready = ((kill or {}).get("master_log") or {}).get("ready_ms")
    rows.append(
        (
            "kill -9: replacement ready (master log), bungate-2w",
            "-" if ready is None else f"{_ms(ready)} ms",
            "<= 1000 ms",
        )
    )
    rows.append(
        (
            "kill -9: replacement serving a connection, bungate-2w",
            "-" if kill is None else f"{_ms(kill['serving_ms'])} ms",
            "<= 1000 ms",
        )
    )
    slow = _ok(results, "slow", "bungate-2w")
    peak = max((p["kib"] for p in slow["memory"]["per_process"]), default=None) if slow else None
    rows.append(
        (
            "slow client: peak RSS of one process, bungate-2w",
            "-" if peak is None else f"{peak / 1024:.0f} MiB",
            "< 100 MiB",
        )
    )
    if all(measured == "-" for _, measured, _ in rows):
        return ""
    lines = [
        "### Goals (issue 5), from this run",
        "",
        "| goal | measured | target |",
        "|---|---|---|",
    ]
    lines += [f"| {g} | {m} | {t} |" for g, m, t in rows]
    return "\n".join(lines) + "\n"
