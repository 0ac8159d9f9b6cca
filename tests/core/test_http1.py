"""The sans-IO HTTP/1.1 response parser, fed whole answers cut at random places."""

from __future__ import annotations

from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bungate.core.http1 import ProtocolError, ResponseParser, origin_form, serialize_head


class Recorder:
    """A ResponseReceiver that writes down what it heard."""

    def __init__(self) -> None:
        self.heads: list[tuple[int, bytes, list[tuple[bytes, bytes]], Optional[int], bytes]] = []
        self.body = b""
        self.done = 0

    def response_head(self, code: int, phrase: bytes, headers: Any, length: Any, conn: Any) -> None:
        self.heads.append((code, phrase, headers, length, conn))

    def response_data(self, data: bytes) -> None:
        assert self.heads, "body before head"
        assert not self.done, "body after the end"
        self.body += data

    def response_done(self) -> None:
        self.done += 1


def feed(raw: bytes, cuts: list[int], method: bytes = b"GET") -> tuple[Recorder, ResponseParser]:
    recorder = Recorder()
    parser = ResponseParser(recorder)
    parser.start(method)
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    for a, b in zip(points, points[1:]):
        parser.feed(raw[a:b])
    return recorder, parser


def chunked(body: bytes, sizes: list[int], trailers: list[bytes]) -> bytes:
    out, i = [], 0
    for size in sizes:
        if i >= len(body):
            break
        piece = body[i : i + max(1, size)]
        i += len(piece)
        out.append(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
    if i < len(body):
        out.append(b"%X\r\n%s\r\n" % (len(body) - i, body[i:]))
    return b"".join(out) + b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"


bodies = st.binary(max_size=3000)
cut_points = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)
header_values = st.binary(min_size=0, max_size=20).filter(
    lambda v: b"\r" not in v and b"\n" not in v and v == v.strip()
)


@settings(max_examples=300, deadline=None)
@given(
    body=bodies,
    cuts=cut_points,
    interim=st.booleans(),
    extra=st.lists(st.tuples(st.sampled_from([b"X-A", b"Set-Cookie"]), header_values), max_size=3),
    leftover=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n"]),
)
def test_a_content_length_answer_in_any_pieces(
    body: bytes, cuts: list[int], interim: bool, extra: list[Any], leftover: bytes
) -> None:
    head = b"HTTP/1.1 100 Continue\r\n\r\n" if interim else b""
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in extra)
    raw = head + b"HTTP/1.1 201 Created\r\n" + lines + b"Content-Length: %d\r\n\r\n" % len(body)
    recorder, parser = feed(raw + body + leftover, cuts)
    assert [h[:2] for h in recorder.heads] == [(201, b"Created")]
    assert recorder.heads[0][3] == len(body)
    assert recorder.body == body and recorder.done == 1
    assert parser.keep_alive and parser.done
    assert parser.leftover == leftover


@settings(max_examples=300, deadline=None)
@given(
    body=bodies,
    cuts=cut_points,
    sizes=st.lists(st.integers(min_value=1, max_value=700), max_size=8),
    trailers=st.lists(st.sampled_from([b"X-Trailer: 1", b"Digest: abc"]), max_size=2),
)
def test_a_chunked_answer_in_any_pieces(
    body: bytes, cuts: list[int], sizes: list[int], trailers: list[bytes]
) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(body, sizes, trailers)
    recorder, parser = feed(raw, cuts)
    assert recorder.heads[0][3] is None  # length unknown
    assert recorder.body == body and recorder.done == 1 and parser.keep_alive


@given(body=bodies, cuts=cut_points)
def test_an_answer_delimited_by_the_close(body: bytes, cuts: list[int]) -> None:
    recorder, parser = feed(b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\n\r\n" + body, cuts)
    assert recorder.body == body and recorder.done == 0  # the end is the close
    assert parser.close_delimited and not parser.keep_alive


@pytest.mark.parametrize(
    "method, status", [(b"HEAD", b"200 OK"), (b"GET", b"204 No Content"), (b"GET", b"304 x")]
)
def test_answers_without_a_body(method: bytes, status: bytes) -> None:
    raw = b"HTTP/1.1 " + status + b"\r\nContent-Length: 99\r\n\r\n"
    recorder, parser = feed(raw, [], method)
    assert recorder.heads[0][3] == 0 and recorder.done == 1 and recorder.body == b""
    assert parser.done


def test_connection_close_and_http10_are_not_kept_alive() -> None:
    _, parser = feed(b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n", [])
    assert not parser.keep_alive
    _, parser = feed(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", [])
    assert not parser.keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 -5 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 70_000,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 5000,
    ],
)
def test_broken_answers_are_refused(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        feed(raw, [])


@given(st.binary(max_size=400), cut_points)
def test_garbage_is_refused_or_waited_for_never_crashes(raw: bytes, cuts: list[int]) -> None:
    try:
        feed(raw, cuts)
    except ProtocolError:
        pass


def test_serialize_head_and_origin_form() -> None:
    head = serialize_head(b"GET", b"/a?b", [(b"Host", b"h"), (b"X", b"1")])
    assert head == b"GET /a?b HTTP/1.1\r\nHost: h\r\nX: 1\r\n\r\n"
    assert origin_form(b"/x?y") == b"/x?y"
    assert origin_form(b"http://h:1/x?y") == b"/x?y"
    assert origin_form(b"http://h") == b"/"
