"""
The ``bungate`` command (internal: run it, do not import it): talks to a running master
through its control API (:mod:`bungate.master.control`) on ``cluster.control_socket``.

::

    bungate [--socket PATH | --config FILE] [--json] COMMAND

    bungate status                 the fleet, as a table (like ``pm2 ls``)
    bungate scale N [--wait]       grow or shrink the fleet to N workers
    bungate roll [--wait]          rolling restart
    bungate reload [--wait]        re-read the config file
    bungate stop [--wait]          drain and stop the gateway
    bungate signal WORKER SIGNAL   e.g. ``bungate signal 2 HUP`` (WORKER may be ``all``)

The socket is ``--socket PATH``, or the ``cluster.control_socket`` of ``--config FILE``.
Exit status, for deploy scripts: 0 done (or started, without ``--wait``); 1 refused or
failed (``roll --wait`` when the roll aborted, ``reload --wait`` when the config was
refused, an unknown worker); 2 a usage error; 3 the master cannot be reached.

Only the standard library speaks to the master (``http.client`` over the UNIX socket).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
from collections.abc import Sequence
from typing import IO, Any, Optional

__all__ = ["EXIT_OK", "EXIT_REFUSED", "EXIT_UNREACHABLE", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

#: Seconds to wait for an answer that is not waited for (``--wait`` waits as long as the
#: operation takes, unless ``--timeout`` says otherwise).
DEFAULT_TIMEOUT = 10.0


class _UnixConnection(http.client.HTTPConnection):
    """``http.client`` over a UNIX socket."""

    def __init__(self, path: str, timeout: Optional[float]) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Unreachable(Exception):
    """The master cannot be reached (no socket, nobody listening, no answer)."""


def request(
    path: str,
    method: str,
    endpoint: str,
    body: Optional[dict[str, Any]] = None,
    timeout: Optional[float] = DEFAULT_TIMEOUT,
) -> tuple[int, dict[str, Any]]:
    """
    One call to the control API.

    :param path: the control socket.
    :param method: ``GET`` or ``POST``.
    :param endpoint: e.g. ``/fleet`` or ``/roll?wait=1``.
    :param body: a JSON body for a POST.
    :param timeout: seconds to wait for the answer (``None``: as long as it takes).
    :returns: the status code and the JSON answer.
    :raises Unreachable: no master answers on ``path``.
    """
    connection = _UnixConnection(path, timeout)
    payload = None if body is None else json.dumps(body).encode("utf-8")
    headers = {"content-type": "application/json"} if payload is not None else {}
    try:
        connection.request(method, endpoint, body=payload, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise Unreachable(f"cannot reach the master at {path}: {reason}") from None
    finally:
        connection.close()
    try:
        document = json.loads(raw) if raw.strip() else {}
    except ValueError:
        document = {"ok": False, "error": raw.decode("utf-8", "replace").strip()}
    if not isinstance(document, dict):
        document = {"ok": False, "error": f"unexpected answer: {document!r}"}
    return response.status, document


# --- formatting ---------------------------------------------------------------------------


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _mib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def _count(value: Optional[int]) -> str:
    return "-" if value is None or value < 0 else str(value)


def _cpu(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}s"


def format_fleet(fleet: dict[str, Any], now: Optional[float] = None) -> str:
    """
    The fleet as ``bungate status`` prints it: a line for the master, then a table with
    one row per worker (id, pid, status, restarts, uptime, requests, conns, rss, cpu).

    :param fleet: the answer of ``GET /fleet``.
    :param now: the time to count uptimes to (default: now).
    """
    now = time.time() if now is None else now
    master = fleet.get("master") or {}
    workers = fleet.get("workers") or []
    started = master.get("started_at")
    head = [
        f"master pid {master.get('pid', '?')}",
        f"up {_duration(None if started is None else now - started)}",
        f"{fleet.get('running', 0)}/{fleet.get('desired', 0)} workers running",
        f"rss {_mib(master.get('rss_bytes'))}",
    ]
    if master.get("user"):
        head.append(f"user {master['user']}")
    if master.get("config"):
        head.append(f"config {master['config']}")
    if fleet.get("stopping"):
        head.append("STOPPING")
    columns = ("id", "pid", "status", "restarts", "uptime", "requests", "conns", "rss", "cpu")
    rows = [columns]
    for w in workers:
        started_at = w.get("started_at")
        alive = w.get("status") in ("starting", "running", "stopping")
        rows.append(
            (
                str(w.get("id", "?")),
                str(w.get("pid")) if w.get("pid") is not None and alive else "-",
                str(w.get("status", "?")),
                str(w.get("restarts", 0)),
                _duration(now - started_at) if started_at is not None and alive else "-",
                _count(w.get("requests")),
                _count(w.get("connections")),
                _mib(w.get("rss_bytes")),
                _cpu(w.get("cpu_seconds")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    left = {2}  # the status column reads better left-aligned
    lines = []
    for row in rows:
        cells = [
            cell.ljust(widths[i]) if i in left else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    if not workers:
        lines.append("(no workers)")
    return " · ".join(head) + "\n" + "\n".join(lines)


# --- the command line ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bungate",
        description="Talk to a running bungate master through its control API "
        "(cluster.control_socket).",
        epilog="Exit status: 0 done; 1 refused or failed; 2 usage; 3 the master cannot "
        "be reached.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", "-s", metavar="PATH", help="the master's control socket")
    where.add_argument(
        "--config", "-c", metavar="FILE", help="read the socket from this config's "
        "cluster.control_socket"
    )
    parser.add_argument("--json", action="store_true", help="print the master's JSON answer")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"give up waiting for an answer after this long (default: {DEFAULT_TIMEOUT:g}, "
        "or no limit with --wait)",
    )
    parser.add_argument("--version", action="store_true", help="print the versions and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("status", help="the fleet, as a table")
    scale = commands.add_parser("scale", help="grow or shrink the fleet to N workers")
    scale.add_argument("workers", type=int, metavar="N")
    for name, text in (
        ("roll", "rolling restart: replace every worker, one at a time"),
        ("reload", "re-read the config file (as HUP)"),
        ("stop", "drain and stop the gateway (as TERM)"),
    ):
        commands.add_parser(name, help=text)
    for sub in (scale, *(commands.choices[n] for n in ("roll", "reload", "stop"))):
        sub.add_argument(
            "--wait", "-w", action="store_true", help="wait for the outcome; exit 1 if it failed"
        )
    signal = commands.add_parser("signal", help="send a signal to a worker (or all)")
    signal.add_argument("worker", metavar="WORKER", help="a worker id, or all")
    signal.add_argument("signal", metavar="SIGNAL", help="e.g. HUP, SIGUSR1, 15")
    return parser


def _socket_path(args: argparse.Namespace, err: IO[str]) -> Optional[str]:
    if args.socket:
        return str(args.socket)
    if args.config:
        from bungate.config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as e:
            err.write(f"bungate: {e}\n")
            return None
        except OSError as e:
            err.write(f"bungate: cannot read {args.config}: {e.strerror or e}\n")
            return None
        path = config.cluster.control_socket
        if not path:
            err.write(
                f"bungate: {args.config} sets no cluster.control_socket: its master serves "
                "no control API (signals still work)\n"
            )
            return None
        return str(path)
    err.write(
        "bungate: where is the master? give --socket PATH, or --config FILE whose "
        "cluster.control_socket names it\n"
    )
    return None


def main(
    argv: Optional[Sequence[str]] = None,
    out: Optional[IO[str]] = None,
    err: Optional[IO[str]] = None,
) -> int:
    """
    Run ``bungate`` with ``argv`` (default: the command line).

    :returns: the exit status (see the module docstring).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0) if isinstance(e.code, int) else EXIT_USAGE
    if args.version:
        from bungate.tap import versions

        out.write(versions() + "\n")
        return EXIT_OK
    if args.command is None:
        parser.print_usage(err)
        err.write("bungate: error: give a command (status, scale, roll, reload, stop, signal)\n")
        return EXIT_USAGE
    path = _socket_path(args, err)
    if path is None:
        return EXIT_USAGE
    wait = bool(getattr(args, "wait", False))
    timeout = args.timeout if args.timeout is not None else (None if wait else DEFAULT_TIMEOUT)
    query = "?wait=1" if wait else ""
    body: Optional[dict[str, Any]] = None
    if args.command == "status":
        method, endpoint = "GET", "/fleet"
    elif args.command == "scale":
        if args.workers < 1:
            err.write("bungate: error: scale: N must be at least 1\n")
            return EXIT_USAGE
        method, endpoint, body = "POST", "/scale" + query, {"workers": args.workers}
    elif args.command in ("roll", "reload", "stop"):
        method, endpoint = "POST", f"/{args.command}{query}"
    else:  # signal
        worker: Any = args.worker
        if worker != "all":
            if not worker.isdigit():
                err.write(f"bungate: error: signal: WORKER must be an id or all, not {worker!r}\n")
                return EXIT_USAGE
            worker = int(worker)
        name: Any = int(args.signal) if args.signal.isdigit() else args.signal
        method, endpoint, body = "POST", "/signal", {"worker": worker, "signal": name}
    try:
        status, answer = request(path, method, endpoint, body, timeout=timeout)
    except Unreachable as e:
        err.write(f"bungate: {e}\n")
        return EXIT_UNREACHABLE
    ok = 200 <= status < 300 and bool(answer.get("ok", True))
    if args.json:
        out.write(json.dumps(answer, indent=2, sort_keys=True) + "\n")
    elif ok and args.command == "status":
        out.write(format_fleet(answer) + "\n")
    elif ok:
        out.write(f"{answer.get('message', 'done')}\n")
    if not ok:
        err.write(f"bungate: {args.command}: {answer.get('error') or f'HTTP {status}'}\n")
        return EXIT_USAGE if status == 400 else EXIT_REFUSED
    return EXIT_OK
