"""
Serving ``/metrics``: the Prometheus text exposition of the whole fleet, on the main port
or on a listener of its own (``metrics.listen``). The metrics themselves are in
:mod:`bungate.ops.metrics`.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from bungate.http.site import SideSite
from bungate.ops.metrics import multiprocess_dir

__all__ = ["MetricsResource", "metrics_site"]

_log = Logger(namespace="bungate.metrics")


class MetricsResource(Resource):
    """
    Renders the Prometheus text exposition of the whole fleet.

    In multiprocess mode every render merges the files of all processes (live and dead) in
    the directory, so any worker answers with the same numbers. Otherwise it renders the
    given (or global) registry. The proxy must not count requests to this resource as
    traffic.

    :param registry: the registry to render in single-process mode; defaults to the
        global ``REGISTRY``.
    :param path: the multiprocess directory to read; defaults to the one from the
        environment at construction time (``None`` for single-process mode).
    """

    isLeaf = True

    def __init__(
        self, registry: Optional[CollectorRegistry] = None, path: Optional[str] = None
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if path is None:
            path = multiprocess_dir()
        self._path = path
        self._registry: CollectorRegistry
        if path is not None:
            self._registry = CollectorRegistry(auto_describe=True)
            MultiProcessCollector(self._registry, path=path)  # type: ignore[no-untyped-call]
        else:
            self._registry = registry if registry is not None else REGISTRY

    def render_GET(self, request: Request) -> bytes:
        """
        Answer with the current metrics.

        :param request: the scrape request.
        :return: the exposition body; on a failure to read the metrics, a 500 with a short
            plain-text reason (and the failure logged).
        """
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        try:
            body = generate_latest(self._registry)
        except Exception:
            _log.failure("could not render metrics from {path}", path=self._path)
            request.setResponseCode(500)
            request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
            return b"metrics unavailable\n"
        request.responseHeaders.setRawHeaders(
            b"content-type", [CONTENT_TYPE_LATEST.encode("ascii")]
        )
        return body


class _OnlyPath(Resource):
    """Serves one resource at exactly one path and 404 everywhere else."""

    isLeaf = True

    def __init__(self, path: bytes, resource: Resource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._path = path
        self._resource = resource

    def render(self, request: Request) -> bytes:
        if request.path != self._path:
            request.setResponseCode(404)
            request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
            return b"not found\n"
        result: bytes = self._resource.render(request)  # type: ignore[no-untyped-call]
        return result


def metrics_site(
    path: str = "/metrics",
    resource: Optional[MetricsResource] = None,
    server_header: bytes = b"bungate",
) -> Site:
    """
    A Site serving only the metrics, for the optional ``metrics.listen`` address.

    :param path: the URL path that answers (``metrics.path``); every other path is 404.
    :param resource: the resource to serve; a new :class:`MetricsResource` by default.
    :param server_header: the ``Server`` value of its answers (empty for none).
    :return: a Site that logs no access lines; listen on it with ``endpoint.listen``.
    """
    if resource is None:
        resource = MetricsResource()
    return SideSite(_OnlyPath(path.encode("utf-8"), resource), server_header)
