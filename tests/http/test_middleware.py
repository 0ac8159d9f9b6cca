"""Running middlewares: in order until one answers; responses in the reverse order."""

from __future__ import annotations

from twisted.web.http_headers import Headers

from bungate.http.middleware import run_request_middlewares, run_response_middlewares
from bungate.interfaces import UpstreamRequest


class Recorder:
    def __init__(self, name: str, log: list[str], answer: object = None) -> None:
        self.name = name
        self.log = log
        self.answer = answer

    def process_request(self, request: object, upstream: UpstreamRequest) -> object:
        self.log.append(f"req {self.name}")
        upstream.headers.addRawHeader(b"x-chain", self.name.encode())
        return self.answer

    def process_response(self, request: object, status: int, headers: Headers) -> None:
        self.log.append(f"resp {self.name}")


def test_request_middlewares_run_in_order_until_one_answers() -> None:
    from twisted.internet.defer import succeed

    log: list[str] = []
    chain = [Recorder("a", log), Recorder("b", log, succeed(True)), Recorder("c", log)]
    upstream = UpstreamRequest(b"GET", b"/")
    results: list[bool] = []
    run_request_middlewares(chain, object(), upstream).addCallback(results.append)
    assert results == [True]
    assert log == ["req a", "req b"]
    assert upstream.headers.getRawHeaders(b"x-chain") == [b"a", b"b"]


def test_request_middlewares_go_on_and_fail() -> None:
    log: list[str] = []
    results: list[object] = []
    chain = [Recorder("a", log), Recorder("b", log)]
    run_request_middlewares(chain, object(), UpstreamRequest(b"GET", b"/")).addCallback(
        results.append
    )
    assert results == [False]

    class Broken(Recorder):
        def process_request(self, request: object, upstream: UpstreamRequest) -> object:
            raise RuntimeError("boom")

    failures: list[object] = []
    chain = [Broken("x", log), Recorder("never", log)]
    run_request_middlewares(chain, object(), UpstreamRequest(b"GET", b"/")).addErrback(
        failures.append
    )
    assert len(failures) == 1
    assert "req never" not in log


def test_response_middlewares_run_in_reverse() -> None:
    log: list[str] = []
    run_response_middlewares([Recorder("a", log), Recorder("b", log)], object(), 200, Headers())
    assert log == ["resp b", "resp a"]
