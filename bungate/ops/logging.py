"""
Log output for the master and the workers, on twisted.logger only.

:func:`start_logging` sends every event at or above ``logger.level`` to a stream (the
worker's stdout is a pipe to the master), one line per event, flushed at once, either as
text::

    2025-01-31T12:00:00.123Z info [worker 2] bungate.access: GET /api/users 200 3.1ms ...

or as one JSON object per line (``logger.format: json``)::

    {"timestamp": "2025-01-31T12:00:00.123Z", "level": "info", "namespace": "bungate.access",
     "worker_id": "2", "pid": 4242, "message": "GET /api/users 200 ...", "method": "GET", ...}

:func:`log_access` emits the per-request access event and :func:`request_id` picks the
request id that travels upstream and back to the client.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import threading
import time
from datetime import datetime, timezone
from typing import IO, Any, Optional, Union, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    InvalidLogLevelError,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from zope.interface import implementer

from bungate.config import ConfigError, LoggerConfig

__all__ = [
    "ACCESS_NAMESPACE",
    "REQUEST_ID_HEADER",
    "ReopenableFile",
    "access_logger",
    "begin_logging",
    "log_access",
    "make_observer",
    "open_log_file",
    "request_id",
    "start_logging",
    "write_line",
]

ACCESS_NAMESPACE = "bungate.access"
"""The namespace of every access event."""

REQUEST_ID_HEADER = b"X-Request-Id"
"""The header that carries the request id in both directions."""

ACCESS_FORMAT = (
    "{method} {path} {status} {duration_ms:.1f}ms {bytes_sent}B "
    "route={route} upstream={upstream} id={request_id}"
)

# Keys an event cannot override in the JSON output: an event's own value is written
# under the name in _RENAMED, or with an "event_" prefix.
_RESERVED = frozenset({"timestamp", "level", "namespace", "message", "pid"})
_RENAMED = {"pid": "worker_pid"}
# Keys of events logged through the legacy ``twisted.python.log`` API (namespace
# ``log_legacy``): "time" repeats the timestamp, "message" is the raw argument tuple the
# formatted message already shows, the others carry nothing an operator filters on.
_LEGACY = frozenset({"time", "isError", "system", "format", "message", "why", "failure"})
_SANE_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,200}\Z")
_ids = random.Random()  # our own generator: a handler's random.seed() cannot repeat ids
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.seed)  # a forked child gets its own sequence
_getrandbits = _ids.getrandbits

_access_log = Logger(namespace=ACCESS_NAMESPACE)


def _timestamp(event: LogEvent) -> str:
    when = event.get("log_time")
    if not isinstance(when, (int, float)) or not math.isfinite(when):
        when = time.time()
    stamp = datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _level_name(event: LogEvent) -> str:
    level = event.get("log_level")
    name = getattr(level, "name", None)
    return name if isinstance(name, str) else "info"


def _traceback(event: LogEvent) -> Optional[str]:
    failure = event.get("log_failure")
    if failure is None:
        return None
    try:
        text: str = failure.getTraceback()
        return text.rstrip("\n")
    except Exception:
        return repr(failure)


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (set, frozenset)):
        return sorted(map(str, value))
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def _plain(value: object) -> object:
    # json would write NaN/Infinity, which is not JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@implementer(ILogObserver)
class _LineObserver:
    """Writes each event as one line (plus traceback lines in text form) and flushes."""

    def __init__(self, stream: IO[str], worker_id: Optional[str], json_format: bool) -> None:
        self._stream = stream
        self._worker_id = worker_id
        self._tag = f"[worker {worker_id}]" if worker_id is not None else "[master]"
        self._json = json_format
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __call__(self, event: LogEvent) -> None:
        try:
            line = self._json_line(event) if self._json else self._text_line(event)
        except Exception as e:  # never let a strange event break logging
            line = self._fallback_line(event, e)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                # The pipe to the master is gone or the stream is closed: nowhere to write.
                pass

    def _text_line(self, event: LogEvent) -> str:
        message = formatEvent(event)
        line = (
            f"{_timestamp(event)} {_level_name(event)} {self._tag} "
            f"{event.get('log_namespace', '-')}: {message}"
        )
        tb = _traceback(event)
        if tb is not None:
            line += "\n" + "\n".join("    " + t for t in tb.splitlines())
        return line

    def _json_line(self, event: LogEvent) -> str:
        record: dict[str, Any] = {}
        legacy = event.get("log_namespace") == "log_legacy"
        for key, value in event.items():
            if not isinstance(key, str) or key.startswith("log_"):
                continue
            if legacy and key in _LEGACY:
                continue
            if key in _RESERVED:
                # An event's own value of a reserved name is kept under another name
                # (the master's lifecycle events carry the worker's pid); a pid equal
                # to the writer's adds nothing.
                if key == "pid" and value == self._pid:
                    continue
                key = _RENAMED.get(key, "event_" + key)
            record[key] = _plain(value)
        record["timestamp"] = _timestamp(event)
        record["level"] = _level_name(event)
        record["namespace"] = event.get("log_namespace", "-")
        # In a worker, worker_id is the worker's own; in the master it is null unless the
        # event names a worker (lifecycle events carry worker_id).
        if self._worker_id is not None or "worker_id" not in record:
            record["worker_id"] = self._worker_id
        elif record["worker_id"] is not None:
            record["worker_id"] = str(record["worker_id"])
        record["pid"] = self._pid
        record["message"] = formatEvent(event)
        tb = _traceback(event)
        if tb is not None:
            record["traceback"] = tb
        return json.dumps(record, default=_json_default, skipkeys=True, allow_nan=False)

    def _fallback_line(self, event: LogEvent, error: Exception) -> str:
        text = f"unloggable event {event.get('log_format')!r} ({type(error).__name__}: {error})"
        if self._json:
            return json.dumps(
                {
                    "timestamp": _timestamp(event),
                    "level": "error",
                    "namespace": "bungate.logging",
                    "worker_id": self._worker_id,
                    "pid": self._pid,
                    "message": text,
                },
                default=_json_default,
            )
        return f"{_timestamp(event)} error {self._tag} bungate.logging: {text}"


def _level(name: str) -> LogLevel:
    try:
        level: LogLevel = LogLevel.levelWithName(name)
    except InvalidLogLevelError:
        raise ValueError(f"unknown log level {name!r}") from None
    return level


def make_observer(
    config: LoggerConfig, worker_id: Optional[str] = None, stream: Optional[IO[str]] = None
) -> ILogObserver:
    """
    Build the observer :func:`start_logging` installs, without touching global state.

    :param config: the ``logger`` section: ``level`` filters, ``format`` picks text or JSON.
    :param worker_id: this worker's id, or ``None`` to take it from the environment: a
        process started by a master as a worker (``CLUSTER_WORKER=true``) uses its
        ``CLUSTER_WORKER_ID``; the master and a single process have none (tagged
        ``[master]``). This matters when ``twist`` builds the observer for a worker.
    :param stream: where lines go; ``sys.stdout`` (looked up at call time) by default.
    :return: an observer that filters by level and writes one flushed line per event.
    """
    if stream is None:
        stream = sys.stdout
    if worker_id is None and os.environ.get("CLUSTER_WORKER") == "true":
        worker_id = os.environ.get("CLUSTER_WORKER_ID") or None
    predicate = LogLevelFilterPredicate(defaultLogLevel=_level(config.level))
    lines = _LineObserver(stream, worker_id, json_format=config.format == "json")
    observer = FilteringLogObserver(
        cast(ILogObserver, lines), [cast(ILogFilterPredicate, predicate)]
    )
    return cast(ILogObserver, observer)


def start_logging(
    config: LoggerConfig, worker_id: Optional[str] = None, stream: Optional[IO[str]] = None
) -> None:
    """
    Send twisted.logger's global events to ``stream``; call once per process, early.

    Standard output is not redirected into the log (``redirectStandardIO=False``), so the
    log lines themselves can go to stdout. Events logged before this call are replayed.
    If something else already began logging (``twist`` does), the observer is added next
    to the existing one and Twisted warns.

    :param config: the ``logger`` section of the config.
    :param worker_id: this worker's id, or ``None`` in the master / single process.
    :param stream: where lines go; ``sys.stdout`` by default.
    """
    globalLogBeginner.beginLoggingTo(
        [make_observer(config, worker_id, stream)], redirectStandardIO=False
    )


def begin_logging(
    config: LoggerConfig, worker_id: Optional[str] = None, stream: Optional[IO[str]] = None
) -> bool:
    """
    :func:`start_logging` to this process's stdout, unless logging has begun already
    (``twist`` begins it itself, as may a test harness), so lines are never written twice.

    :returns: whether logging was begun here.
    """
    if getattr(globalLogBeginner, "_temporaryObserver", True) is None:
        return False
    start_logging(config, worker_id, stream or sys.__stdout__)
    return True


def write_line(line: str, stream: Optional[IO[str]] = None) -> None:
    """
    Write an already formatted log line (a worker's) to ``stream`` (default: this
    process's stdout). A line with nowhere to go (no stdout, a closed log file) is
    dropped: there is no one left to tell.
    """
    out = stream if stream is not None else sys.__stdout__
    if out is None:
        return
    try:
        out.write(line + "\n")
        out.flush()
    except (OSError, ValueError):
        pass


def open_log_file(config: LoggerConfig, source: str) -> Optional[ReopenableFile]:
    """
    The file ``logger.file`` names, opened for appending, or ``None`` without one.

    :raises ConfigError: naming ``logger.file`` when it cannot be opened.
    """
    if config.file is None:
        return None
    try:
        return ReopenableFile(config.file)
    except OSError as e:
        raise ConfigError(
            source, "logger.file", f"cannot open {config.file} for appending: {e.strerror or e}"
        ) from None


class ReopenableFile:
    """
    A log file that can be reopened by path (SIGUSR1, after logrotate moved it), as a
    text stream: ``write`` and ``flush``.

    :param path: the file, opened for appending (created if missing).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = path
        self._file: IO[str] = open(path, "a", encoding="utf-8")

    def write(self, text: str) -> int:
        """Write ``text`` to the current file."""
        return self._file.write(text)

    def flush(self) -> None:
        """Flush the current file."""
        self._file.flush()

    def reopen(self) -> str:
        """Close the file and open ``path`` again (a new file if it was moved away)."""
        old, self._file = self._file, open(self.path, "a", encoding="utf-8")
        try:
            old.close()
        except OSError:
            pass
        return self.path

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def access_logger() -> Logger:
    """
    The logger of access events (namespace :data:`ACCESS_NAMESPACE`).

    :return: a module-wide :class:`~twisted.logger.Logger` posting to the global publisher.
    """
    return _access_log


def _text(value: Union[str, bytes]) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def log_access(
    log: Logger,
    *,
    method: Union[str, bytes],
    path: Union[str, bytes],
    status: int,
    duration: float,
    bytes_sent: int,
    route: Optional[str],
    upstream: Optional[str],
    request_id: Union[str, bytes],
    worker_id: Optional[str],
    client: Optional[str] = None,
    reason: Optional[str] = None,
) -> None:
    """
    Emit one access event at info level with every field as an event key.

    The event's namespace is always :data:`ACCESS_NAMESPACE`: if ``log`` has another
    namespace, its observer is used with that namespace. Call it only when
    ``logger.request_logging`` is on.

    :param log: the logger to emit through (usually :func:`access_logger`).
    :param method: the request method.
    :param path: the request path as received (with the query string if you want it
        logged); bytes are decoded as latin-1.
    :param status: the response status code.
    :param duration: seconds from receiving the request to finishing the response.
    :param bytes_sent: response body bytes written to the client.
    :param route: the matched route pattern, or ``None`` if none matched.
    :param upstream: the upstream URL the request went to, or ``None``.
    :param request_id: the request id (see :func:`request_id`).
    :param worker_id: the worker that answered, or ``None`` in single-process mode.
    :param client: the client's address (added to the line as ``client=``).
    :param reason: why the gateway refused the request itself (``refused=``).
    """
    if log.namespace != ACCESS_NAMESPACE:
        log = Logger(namespace=ACCESS_NAMESPACE, source=log.source, observer=log.observer)
    text = ACCESS_FORMAT
    if client:
        text += " client={client}"
    if reason:
        text += " refused={reason}"
    log.info(
        text,
        method=_text(method),
        path=_text(path),
        status=status,
        duration=duration,
        duration_ms=duration * 1000.0,
        bytes_sent=bytes_sent,
        route=route,
        upstream=upstream,
        request_id=_text(request_id),
        worker_id=worker_id,
        client=client,
        reason=reason,
    )


def request_id(incoming: Optional[bytes]) -> bytes:
    """
    The id of a request: the client's ``X-Request-Id`` if sane, else a new random one.

    :param incoming: the incoming header value, or ``None`` if absent.
    :return: ``incoming`` when it is 1 to 200 visible ASCII characters (``!`` to ``~``,
        no spaces or control characters), otherwise 32 new random hex digits.
    """
    if incoming is not None and _SANE_REQUEST_ID.match(incoming):
        return incoming
    # Ids need to be unique, not secret: the Mersenne Twister (seeded from the OS once
    # per process) instead of a getrandom() system call per request, which measured as
    # a tenth of a PyPy worker's time under load.
    return b"%032x" % _getrandbits(128)
