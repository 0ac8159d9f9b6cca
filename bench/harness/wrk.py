"""Running wrk and reading its report.

wrk prints sizes with binary prefixes (``1.00MB`` is 1024 * 1024 bytes) and times as
``523.86us`` / ``1.20ms`` / ``2.00s``; the ``--latency`` flag adds a percentile table.
"""

import re
import resource
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


class WrkError(RuntimeError):
    """wrk did not run or printed something we cannot read."""


@dataclass
class WrkResult:
    """One wrk run, the numbers we report."""

    requests: int
    seconds: float
    rps: float
    transfer_bytes_per_s: float
    latency_ms: Dict[str, float] = field(default_factory=dict)
    socket_errors: Dict[str, int] = field(default_factory=dict)
    non_2xx_3xx: int = 0

    @property
    def errors(self) -> int:
        """All failed requests: socket errors of every kind plus non-2xx/3xx answers."""
        return sum(self.socket_errors.values()) + self.non_2xx_3xx

    def as_dict(self) -> Dict[str, Any]:
        """
        :return: a JSON-ready dict, including the total ``errors``.
        """
        d = asdict(self)
        d["errors"] = self.errors
        return d


def _time_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise WrkError(f"cannot read wrk time {text!r}")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def _size_bytes(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)([KMGT]?B)", text)
    if not m:
        raise WrkError(f"cannot read wrk size {text!r}")
    return float(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse(output: str) -> WrkResult:
    """
    Read wrk's report (run with ``--latency``).

    :param output: wrk's stdout.
    :return: the parsed figures.
    :raises WrkError: if the summary lines are missing.
    """
    m = re.search(r"(\d+) requests in ([\d.]+\w+), ([\d.]+\w+) read", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    transfer = re.search(r"Transfer/sec:\s+([\d.]+\w+)", output)
    if not (m and rps and transfer):
        raise WrkError("wrk printed no summary:\n" + output.strip())
    latency = {
        f"p{pct}": _time_ms(value)
        for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", output, re.M)
    }
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if e:
        errors = dict(zip(errors, (int(x) for x in e.groups())))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        requests=int(m.group(1)),
        seconds=_time_ms(m.group(2)) / 1e3,
        rps=float(rps.group(1)),
        transfer_bytes_per_s=_size_bytes(transfer.group(1)),
        latency_ms=latency,
        socket_errors=errors,
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
    )


def command(
    url: str,
    seconds: int,
    connections: int = 50,
    threads: int = 1,
    headers: Optional[Dict[str, str]] = None,
) -> List[str]:
    """
    The wrk command line we use everywhere.

    :param url: the URL to load.
    :param seconds: the duration, whole seconds (wrk truncates fractions).
    :param connections: concurrent keep-alive connections.
    :param threads: wrk threads.
    :param headers: request headers to add (``-H "Name: value"``), e.g. credentials.
    :return: argv.
    """
    extra = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    return [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, int(seconds))}s",
        "--latency",
        *extra,
        url,
    ]


def _raise_nofile(needed: int):
    """
    :param needed: descriptors wrk needs (one per connection, plus a few).
    :return: a ``preexec_fn`` that raises wrk's soft ``RLIMIT_NOFILE`` towards the hard
        limit (never past it, never lowering it), or ``None`` when it is already enough.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))

    return preexec


def start(
    url: str,
    seconds: int,
    connections: int = 50,
    threads: int = 1,
    headers: Optional[Dict[str, str]] = None,
) -> subprocess.Popen:
    """
    Start wrk in its own session; collect it with :func:`finish`.

    Its soft descriptor limit is raised (up to the hard limit) when ``connections`` need
    more than ours allows, e.g. ``-c1000`` under the usual 1024.

    :param url: the URL to load.
    :param seconds: the duration.
    :param connections: concurrent connections.
    :param threads: wrk threads.
    :param headers: request headers to add.
    :return: the running wrk.
    """
    return subprocess.Popen(
        command(url, seconds, connections, threads, headers),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_raise_nofile(connections + 64),
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> WrkResult:
    """
    Wait for wrk and parse its report.

    :param proc: from :func:`start`.
    :param timeout: seconds to wait before giving up (wrk is then killed).
    :return: the parsed figures.
    :raises WrkError: on a timeout, a failed run or an unreadable report.
    """
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise WrkError(f"wrk did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise WrkError(f"wrk exited with {proc.returncode}: {out.strip()}")
    return parse(out)


def run(
    url: str,
    seconds: int,
    connections: int = 50,
    threads: int = 1,
    headers: Optional[Dict[str, str]] = None,
) -> WrkResult:
    """
    Run wrk to completion.

    :param url: the URL to load.
    :param seconds: the duration.
    :param connections: concurrent connections.
    :param threads: wrk threads.
    :param headers: request headers to add.
    :return: the parsed figures.
    """
    proc = start(url, seconds, connections, threads, headers)
    try:
        return finish(proc, timeout=seconds + 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def maybe(result: Optional[WrkResult]) -> Optional[Dict[str, Any]]:
    """
    :param result: a result or ``None``.
    :return: its dict form, or ``None``.
    """
    return None if result is None else result.as_dict()
