"""
Warnings about a valid config that is probably not what the operator meant (internal).
"""

from __future__ import annotations

from bungate.config.schema import GatewayConfig, RouteConfig

__all__ = ["warnings"]


def warnings(config: GatewayConfig) -> list[str]:
    """
    What is valid in ``config`` but probably not what the operator meant, one line each
    (``SOURCE: KEY: WHAT``), for the entry points to log and print.
    """
    source = config.source
    found: list[str] = []
    if not config.routes:
        answered = []
        if config.health.enabled:
            answered.append(config.health.path)
        if config.metrics.enabled and config.metrics.listen is None:
            answered.append(config.metrics.path)
        others = (
            f"every request other than {' and '.join(answered)}" if answered else "every request"
        )
        found.append(f"{source}: routes: none configured: {others} gets 404")
    tls = config.server.tls
    if tls.redirect_http is not None and not tls.enabled:
        found.append(
            f"{source}: server.tls.redirect_http: ignored: server.tls.enabled is false, so "
            "no redirect listener is opened"
        )
    elif tls.redirect_http is not None and not tls.redirect_http.allowed_hosts:
        found.append(
            f"{source}: server.tls.redirect_http.allowed_hosts: empty: the redirect follows "
            "any Host header, so a forged one picks where clients are sent; list the host "
            "names this gateway serves"
        )
    for i, route in enumerate(config.routes):
        if not route.tls_verify and _https_upstreams(route):
            found.append(
                f"{source}: routes[{i}].tls_verify: false: the certificate of its https "
                "upstream is not checked, so anyone on the path can pose as it"
            )
    return found


def _https_upstreams(route: RouteConfig) -> bool:
    urls = [route.target] if route.target else []
    if route.load_balancer is not None:
        urls.extend(t.url for t in route.load_balancer.targets)
    return any(url is not None and url.startswith("https://") for url in urls)
