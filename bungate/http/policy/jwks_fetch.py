"""
Fetching a JWKS document for the ``auth`` policy (internal): treq, bounded in size and
time, its cache lifetime read from the answer's headers.
"""

from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client
from twisted.web.http_headers import Headers

from bungate.core.auth import cache_lifetime

__all__ = ["MAX_JWKS_BYTES", "JwksFetcher", "JwksResult"]

log = Logger(namespace="bungate.auth")

#: A JWKS document larger than this is refused (a key set is a few kilobytes).
MAX_JWKS_BYTES = 1 << 20

#: What a fetch gives: the document, and how long it may be cached (seconds; None: unknown).
JwksResult = tuple[bytes, Optional[float]]


class _TooLarge(ValueError):
    pass


class JwksFetcher:
    """
    Gets a JWKS document with treq: ``GET uri``, no redirects followed, ``200`` only, the
    body at most :data:`MAX_JWKS_BYTES`; the whole exchange is cancelled after
    ``timeout`` seconds. The lifetime is read from ``Cache-Control`` or ``Expires`` by
    :func:`~bungate.core.auth.cache_lifetime`. A failure is logged and passed on (the
    :class:`~bungate.core.auth.JwksKeys` keeps its last good set).

    :param uri: the ``jwks_uri``.
    :param reactor: connects.
    :param clock: times the fetch out and dates the response (the reactor by default).
    :param timeout: seconds a fetch may take.
    """

    def __init__(self, uri: str, reactor: Any, clock: Any = None, *, timeout: float = 10.0) -> None:
        self.uri = uri
        parts = urlsplit(uri)
        self._shown_uri = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._timeout = timeout
        self._pool: Optional[client.HTTPConnectionPool] = None
        self._client: Optional[HTTPClient] = None
        self._pending: Optional[Deferred[JwksResult]] = None
        self._closed = False

    def _http(self) -> HTTPClient:
        if self._client is None:
            pool = self._pool = client.HTTPConnectionPool(self._reactor, persistent=True)
            pool.maxPersistentPerHost = 1
            pool.cachedConnectionTimeout = 60
            agent = client.Agent(self._reactor, connectTimeout=self._timeout, pool=pool)
            self._client = HTTPClient(agent)
        return self._client

    def __call__(self) -> Deferred[JwksResult]:
        """
        Fetch the document once.

        :returns: a Deferred firing ``(body, lifetime)``, or failing.
        """
        if self._closed:
            return fail(RuntimeError("the JWKS fetcher is closed"))
        d: Deferred[Any] = self._http().get(
            self.uri,
            headers=Headers({b"accept": [b"application/jwk-set+json, application/json"]}),
            allow_redirects=False,
        )
        d.addCallback(self._read)
        d.addTimeout(self._timeout, self._clock)
        d.addErrback(self._failed)
        self._pending = d
        d.addBoth(self._done, d)
        return d

    def _read(self, response: Any) -> Deferred[JwksResult]:
        chunks: list[bytes] = []
        size = [0]

        def collect(data: bytes) -> None:
            size[0] += len(data)
            if size[0] > MAX_JWKS_BYTES:
                raise _TooLarge(f"the document is over {MAX_JWKS_BYTES} bytes")
            chunks.append(data)

        body: Deferred[Any] = treq.collect(response, collect)

        def done(_: None) -> JwksResult:
            if response.code != 200:
                raise ValueError(f"HTTP status {response.code}")
            document = b"".join(chunks)
            _check_document(document)
            headers = {
                name.decode("latin-1"): ", ".join(v.decode("latin-1") for v in values)
                for name, values in response.headers.getAllRawHeaders()
            }
            return document, cache_lifetime(headers, now=self._clock.seconds())

        return body.addCallback(done)

    def _failed(self, reason: Failure) -> Failure:
        if self._closed:
            return reason  # cancelled by close(): nothing to tell
        log.warn(
            "Could not fetch the JWKS from {uri} (the last good key set is kept): {error}",
            uri=self._shown_uri,
            error=f"{type(reason.value).__name__}: {reason.getErrorMessage()}",
        )
        return reason

    def _done(self, result: Any, d: Deferred[JwksResult]) -> Any:
        if self._pending is d:
            self._pending = None
        return result

    def close(self) -> Deferred[None]:
        """
        Cancel the fetch under way, refuse new ones, and close the idle connection.

        :returns: a Deferred firing once the connection is closed.
        """
        self._closed = True
        if self._pending is not None:
            self._pending.cancel()
        if self._pool is None:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        return self._pool.closeCachedConnections()  # type: ignore[no-any-return]


def _check_document(document: bytes) -> None:
    try:
        parsed = json.loads(document)
    except (ValueError, RecursionError):
        raise ValueError("the body is not JSON") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
        raise ValueError("the body is not a JWKS document (no 'keys' list)")
