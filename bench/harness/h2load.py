"""Running h2load (nghttp2-client) and reading its report.

h2load prints ``finished in 3.00s, 28385.33 req/s, 1.65MB/s``, a ``requests:`` line
(total, started, done, succeeded, failed, errored, timeout), ``status codes:``, and a
table of min/max/mean/sd for ``time for request`` (no percentiles). Times are ``298us``,
``3.49ms`` or ``1.20s``; ``Application protocol: h2`` says what ALPN chose.
"""

import re
import subprocess
from typing import Any, Dict, List

from .wrk import _time_ms

_STAT_COLUMNS = ("min", "max", "mean", "sd")


class H2loadError(RuntimeError):
    """h2load did not run or printed something we cannot read."""


def command(url: str, seconds: int, clients: int = 10, streams: int = 10) -> List[str]:
    """
    :param url: an ``https://`` URL (h2 is negotiated with ALPN).
    :param seconds: ``-D``, the timed duration.
    :param clients: ``-c``, connections.
    :param streams: ``-m``, concurrent streams per connection.
    :return: argv (one thread: ``-t1``, as wrk's ``-t1``).
    """
    return ["h2load", "-t1", f"-c{clients}", f"-m{streams}", f"-D{max(1, int(seconds))}", url]


def parse(output: str) -> Dict[str, Any]:
    """
    :param output: h2load's stdout.
    :return: ``rps``, ``requests`` (``total``, ``started``, ``done``, ``succeeded``,
        ``failed``, ``errored``, ``timeout``), ``status`` (``2xx`` ... ``5xx``),
        ``request_ms`` (``min``, ``max``, ``mean``, ``sd``), ``protocol``.
    :raises H2loadError: if the summary lines are missing.
    """
    finished = re.search(r"finished in ([\d.]+\w+), ([\d.]+) req/s", output)
    requests = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        output,
    )
    if not (finished and requests):
        raise H2loadError("h2load printed no summary:\n" + output.strip()[-2000:])
    keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    request_ms: Dict[str, float] = {}
    row = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", output)
    if row:
        request_ms = {k: _time_ms(v) for k, v in zip(_STAT_COLUMNS, row.groups())}
    protocol = re.search(r"Application protocol: (\S+)", output)
    return {
        "seconds": _time_ms(finished.group(1)) / 1e3,
        "rps": float(finished.group(2)),
        "requests": dict(zip(keys, (int(x) for x in requests.groups()))),
        "status": (
            dict(zip(("2xx", "3xx", "4xx", "5xx"), (int(x) for x in status.groups())))
            if status
            else {}
        ),
        "request_ms": request_ms,
        "protocol": protocol.group(1) if protocol else None,
    }


def start(url: str, seconds: int, clients: int = 10, streams: int = 10) -> subprocess.Popen:
    """:return: h2load running in its own session; collect it with :func:`finish`."""
    return subprocess.Popen(
        command(url, seconds, clients, streams),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> Dict[str, Any]:
    """
    Wait for h2load and parse its report.

    :raises H2loadError: on a timeout, a failed run or an unreadable report.
    """
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise H2loadError(f"h2load did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise H2loadError(f"h2load exited with {proc.returncode}: {out.strip()[-2000:]}")
    result = parse(out)
    if result["protocol"] != "h2":
        raise H2loadError(f"h2load did not negotiate h2 (ALPN chose {result['protocol']})")
    return result


def run(url: str, seconds: int, clients: int = 10, streams: int = 10) -> Dict[str, Any]:
    """Run h2load to completion; :return: the parsed figures."""
    proc = start(url, seconds, clients, streams)
    try:
        return finish(proc, timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
