"""Tests for bungate.logging: observers are built with make_observer, no global state."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

import pytest
from twisted.logger import Logger

import bungate
from bungate.config import LoggerConfig
from bungate.ops.logging import ACCESS_NAMESPACE, log_access, make_observer, request_id

REPO = Path(bungate.__file__).resolve().parents[1]
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def logger_to(
    fmt: str = "json", level: str = "info", worker_id: Optional[str] = "3"
) -> tuple[Logger, io.StringIO]:
    stream = io.StringIO()
    observer = make_observer(LoggerConfig(level=level, format=fmt), worker_id, stream)
    return Logger(namespace="bungate.test", observer=observer), stream


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_the_fields() -> None:
    log, stream = logger_to("json")
    log.info("worker {n} ready on {port}", n=2, port=3000, blob=object(), raw=b"\xff")
    (record,) = json_lines(stream)
    assert ISO.match(record["timestamp"]), record["timestamp"]
    assert record["level"] == "info"
    assert record["namespace"] == "bungate.test"
    assert record["worker_id"] == "3"
    assert record["pid"] == os.getpid()
    assert record["message"] == "worker 2 ready on 3000"
    assert record["n"] == 2 and record["port"] == 3000
    assert record["blob"].startswith("<object object")
    assert record["raw"] == "\ufffd"
    assert not any(k.startswith("log_") for k in record)


def test_json_never_crashes_on_strange_events() -> None:
    log, stream = logger_to("json")
    loop: list[Any] = []
    loop.append(loop)
    log.warn("nan {x}", x=float("nan"), message="not ours", timestamp="nope")
    log.error("loop", loop=loop)  # circular: json.dumps raises ValueError
    log.info("bad format {missing}")
    first, second, third = json_lines(stream)
    assert first["x"] == "nan" and first["message"] == "nan nan" and first["level"] == "warn"
    assert ISO.match(first["timestamp"])
    assert second["level"] == "error" and "unloggable event" in second["message"]
    assert "Unable to format event" in third["message"]


def test_master_keeps_the_worker_id_an_event_names() -> None:
    log, stream = logger_to("json", worker_id=None)
    log.info("worker {worker_id} exited with code {code}", worker_id="4", code=1)
    log.info("reload ok")
    named, plain = json_lines(stream)
    assert named["worker_id"] == "4" and named["code"] == 1
    assert plain["worker_id"] is None


def test_access_line_carries_the_request_fields() -> None:
    log, stream = logger_to("json")
    log_access(
        log,
        method=b"GET",
        path=b"/api/users?page=2",
        status=200,
        duration=0.01234,
        bytes_sent=512,
        route="/api/*",
        upstream="http://10.0.0.5:8080",
        request_id=b"abc123",
        worker_id="3",
    )
    (record,) = json_lines(stream)
    assert record["namespace"] == ACCESS_NAMESPACE
    expected = {
        "method": "GET",
        "path": "/api/users?page=2",
        "status": 200,
        "duration": 0.01234,
        "bytes_sent": 512,
        "route": "/api/*",
        "upstream": "http://10.0.0.5:8080",
        "request_id": "abc123",
        "worker_id": "3",
    }
    assert {k: record[k] for k in expected} == expected
    assert record["message"] == (
        "GET /api/users?page=2 200 12.3ms 512B route=/api/* upstream=http://10.0.0.5:8080 id=abc123"
    )


def test_level_filter() -> None:
    log, stream = logger_to("json", level="info")
    log.debug("hidden")
    log.info("shown")
    log.critical("loud")
    assert [r["message"] for r in json_lines(stream)] == ["shown", "loud"]

    log, stream = logger_to("text", level="error")
    log.warn("hidden")
    log.error("shown")
    assert stream.getvalue().count("\n") == 1 and "shown" in stream.getvalue()


def test_text_line_has_the_tags() -> None:
    log, stream = logger_to("text", worker_id="3")
    log.info("hello {who}", who="world")
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    stamp, level, tag, rest = line.rstrip("\n").split(" ", 3)
    assert ISO.match(stamp)
    assert (level, tag, rest) == ("info", "[worker", "3] bungate.test: hello world")

    log, stream = logger_to("text", worker_id=None)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("boom")
    first, *trace = stream.getvalue().splitlines()
    assert first.split(" ", 1)[1] == "critical [master] bungate.test: boom"
    assert trace and all(t.startswith("    ") for t in trace)
    assert "ZeroDivisionError" in trace[-1]


class BrokenPipe(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_dead_pipe_does_not_raise(fmt: str) -> None:
    observer = make_observer(LoggerConfig(format=fmt), "1", BrokenPipe())
    Logger(observer=observer).info("nobody listens")


def test_a_worker_line_with_no_output_at_all_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    from bungate.ops.logging import write_line

    monkeypatch.setattr(sys, "__stdout__", None)
    write_line('{"msg": "nowhere to go"}')
    write_line('{"msg": "nobody listens"}', BrokenPipe())


def test_request_id() -> None:
    assert request_id(b"req-42_abc.DEF") == b"req-42_abc.DEF"
    assert request_id(b"x" * 200) == b"x" * 200
    for bad in (None, b"", b"x" * 201, b"has space", b"new\nline", b"\x7f", "é".encode()):
        made = request_id(bad)
        assert re.fullmatch(rb"[0-9a-f]{32}", made), (bad, made)
    assert request_id(None) != request_id(None)


def test_start_logging_writes_flushed_lines_to_stdout() -> None:
    code = """
    from twisted.logger import Logger
    from bungate.config import LoggerConfig
    from bungate.ops.logging import start_logging
    start_logging(LoggerConfig(format="json", level="debug"), worker_id="2")
    Logger(namespace="bungate.child").debug("up {n}", n=1)
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["namespace"], r["message"], r["worker_id"]) for r in records] == [
        ("bungate.child", "up 1", "2")
    ]
