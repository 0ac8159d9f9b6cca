"""
Active health checks of a route's targets.

Every ``interval`` seconds each target's ``url + path`` is probed; a target leaves
rotation after ``unhealthy_threshold`` consecutive failed probes (wrong status, error,
timeout) and comes back after ``healthy_threshold`` consecutive passes.

Health checks run **in each worker**: every worker probes the targets of its own routes
and keeps their state to itself. That needs no round-trip to the master and no shared
state, and a worker that cannot reach a target (its own connection pool, its own network
view) takes it out of its own rotation. The cost is (workers x targets) probes per
interval, which is small next to real traffic; the workers may disagree for up to one
interval about a target that just changed.

The probe is injected (``request(url, timeout) -> Deferred[int]``);
:meth:`HealthProbes.probe` is the real one (treq), tests pass fakes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from bungate.config import HealthCheckConfig
from bungate.core.balancing import RouteBalancer, Upstream
from bungate.http.upstream.pool import client_endpoint

__all__ = ["HealthChecker", "HealthProbes", "Probe"]

#: ``request(url, timeout)`` → a Deferred firing the response status code.
Probe = Callable[[str, float], "Deferred[int]"]

_log = Logger(namespace="bungate.healthcheck")


class HealthChecker:
    """
    Probes the targets of one route and marks them healthy or unhealthy.

    :param balancer: the route's balancer; its upstreams are probed and marked with
        :meth:`~bungate.balancing.RouteBalancer.set_healthy`.
    :param config: the route's ``load_balancer.health_check`` section.
    :param request: the probe: ``request(url, timeout)`` returns a Deferred firing the
        status code; a failure counts as a failed probe.
    :param clock: schedules the probes and their timeouts.
    """

    def __init__(
        self,
        balancer: RouteBalancer,
        config: HealthCheckConfig,
        request: Probe,
        clock: IReactorTime,
    ) -> None:
        self.balancer = balancer
        self.config = config
        self._request = request
        self._clock = clock
        self._passes: dict[Upstream, int] = {}
        self._fails: dict[Upstream, int] = {}
        self._pending: dict[Upstream, Deferred[Any]] = {}
        self._loop: Optional[LoopingCall] = None

    def start(self) -> None:
        """Probe every target now, then every ``interval`` seconds."""
        if self._loop is not None:
            return
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self.config.interval, now=True)

    def stop(self) -> None:
        """Stop probing; probes in flight are cancelled."""
        if self._loop is not None:
            if self._loop.running:
                self._loop.stop()
            self._loop = None
        for d in list(self._pending.values()):
            d.cancel()
        self._pending.clear()

    def check(self) -> None:
        """Probe every target once (a target whose last probe is still out is skipped)."""
        for upstream in self.balancer.upstreams:
            if upstream not in self._pending:
                self._probe(upstream)

    def _probe(self, upstream: Upstream) -> None:
        url = upstream.url + self.config.path
        d: Deferred[Any] = maybeDeferred(self._request, url, self.config.timeout)
        # The probe should time out by itself; this bounds a probe that does not.
        d.addTimeout(self.config.timeout, self._clock)
        self._pending[upstream] = d

        def passed(status: int) -> None:
            if status == self.config.expected_status:
                self._record(upstream, True, "")
            else:
                self._record(
                    upstream, False, f"status {status}, expected {self.config.expected_status}"
                )

        def failed(failure: Failure) -> None:
            self._record(upstream, False, failure.getErrorMessage() or repr(failure.value))

        def done(result: object) -> object:
            if self._pending.get(upstream) is d:
                del self._pending[upstream]
            return result

        d.addBoth(done)
        d.addCallbacks(passed, failed)
        d.addErrback(lambda f: _log.failure("health check bookkeeping failed", f))

    def _record(self, upstream: Upstream, ok: bool, why: str) -> None:
        if self._loop is None:
            return  # stopped: a late answer changes nothing
        if ok:
            self._fails[upstream] = 0
            self._passes[upstream] = self._passes.get(upstream, 0) + 1
            if not upstream.healthy and self._passes[upstream] >= self.config.healthy_threshold:
                self.balancer.set_healthy(upstream, True)
        else:
            self._passes[upstream] = 0
            self._fails[upstream] = self._fails.get(upstream, 0) + 1
            _log.debug("health check of {target} failed: {why}", target=upstream.url, why=why)
            if upstream.healthy and self._fails[upstream] >= self.config.unhealthy_threshold:
                self.balancer.set_healthy(upstream, False)


@implementer(IAgentEndpointFactory)
class _UpstreamEndpoints:
    """
    Where the probes connect: the same endpoints as the proxy's own client
    (:func:`bungate.http.upstream.pool.client_endpoint`).

    :param reactor: connects.
    :param tls_policy: the ``IPolicyForHTTPS`` for https upstreams, or ``None``.
    """

    def __init__(self, reactor: Any, tls_policy: Any = None) -> None:
        self._reactor = reactor
        self._policy = tls_policy

    def endpointForURI(self, uri: client.URI) -> Any:
        """
        The endpoint to reach ``uri``'s host and port.

        :param uri: the request URI.
        :raises SchemeNotSupported: for anything but http and https.
        """
        if uri.scheme not in (b"http", b"https"):
            raise client.SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"the host of {uri.toBytes()!r} is not ASCII") from None
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return client_endpoint(self._reactor, uri.scheme == b"https", host, uri.port, self._policy)


class HealthProbes:
    """
    The probes of a worker's health checks: ``GET url`` with treq, the body read and
    discarded (so the connection can be reused), the status code returned.

    A probe every few seconds per target gains nothing from the proxy's lean client, so
    this is treq over an ``Agent`` whose endpoints (and upstream TLS policy) are the
    proxy's. The connection pool is made at the first probe.

    :param reactor: connects and times out.
    :param tls_policy: the ``IPolicyForHTTPS`` for https upstreams, or ``None``.
    """

    def __init__(self, reactor: Any, tls_policy: Any = None) -> None:
        self._reactor = reactor
        self._policy = tls_policy
        self._pool: Optional[client.HTTPConnectionPool] = None
        self._client: Optional[HTTPClient] = None

    def _http(self) -> HTTPClient:
        if self._client is None:
            pool = self._pool = client.HTTPConnectionPool(self._reactor, persistent=True)
            pool.maxPersistentPerHost = 4
            pool.cachedConnectionTimeout = 60
            agent = client.Agent.usingEndpointFactory(
                self._reactor, _UpstreamEndpoints(self._reactor, self._policy), pool=pool
            )
            self._client = HTTPClient(agent)
        return self._client

    def probe(self, url: str, timeout: float) -> Deferred[int]:
        """
        Send ``GET url``; fires the status code once the body is read, fails on an error;
        the whole exchange is cancelled after ``timeout`` seconds.
        """
        d: Deferred[Any] = self._http().get(url)

        def got(response: Any) -> Deferred[int]:
            body: Deferred[Any] = treq.collect(response, lambda _: None)
            return body.addCallback(lambda _: response.code)

        d.addCallback(got)
        d.addTimeout(timeout, self._reactor)
        return d

    def close(self) -> Deferred[None]:
        """Close the probes' idle connections."""
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()  # type: ignore[no-any-return]
