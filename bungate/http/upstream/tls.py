"""
How the proxy trusts ``https://`` upstreams: the system's CA store by default, per
upstream ``tls_verify: false`` or a ``ca_file`` of its own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, Optional, cast

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from bungate.config import RouteConfig
from bungate.ops.tlsfiles import Names, load_ca, normal_netloc, trust_by_netloc

__all__ = ["UpstreamTLSPolicy", "upstream_tls_policy"]


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    """A client TLS connection that accepts any certificate but still sends SNI."""

    def __init__(self, context: SSL.Context, hostname: bytes) -> None:
        self._context = context
        self._server_name = None if _is_ip(hostname) else hostname

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        Make the OpenSSL connection for one upstream TCP connection.

        :param tlsProtocol: the TLS protocol that will drive it.
        """
        connection = SSL.Connection(self._context, None)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


def _is_ip(hostname: bytes) -> bool:
    try:
        ipaddress.ip_address(hostname.decode("ascii"))
    except ValueError:
        return False
    return True


@implementer(IPolicyForHTTPS)
class UpstreamTLSPolicy:
    """
    Decides how the proxy's ``Agent`` checks each upstream's certificate.

    Upstreams not listed in ``overrides`` are verified against the system CA store, as
    ``BrowserLikePolicyForHTTPS`` does.

    :param overrides: per ``(hostname, port)``: ``None`` to skip verification, or the
        certificates of the CAs to trust instead of the system store.
    """

    def __init__(
        self, overrides: Mapping[tuple[bytes, int], Optional[Sequence[x509.Certificate]]]
    ) -> None:
        self._default = BrowserLikePolicyForHTTPS()  # type: ignore[no-untyped-call]
        self._overrides = dict(overrides)
        self._creators: dict[tuple[bytes, int], Any] = {}
        self._unverified: Optional[SSL.Context] = None

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """
        The TLS connection creator for one upstream.

        :param hostname: the host of the upstream URL.
        :param port: the port of the upstream URL.
        """
        netloc = normal_netloc(hostname, port)
        if netloc not in self._overrides:
            creator: IOpenSSLClientConnectionCreator = self._default.creatorForNetloc(
                hostname, port
            )
            return creator
        cached = self._creators.get(netloc)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        cas = self._overrides[netloc]
        if cas is None:
            if self._unverified is None:
                self._unverified = CertificateOptions().getContext()
            creator = cast(
                IOpenSSLClientConnectionCreator,
                _UnverifiedCreator(self._unverified, netloc[0]),
            )
        else:
            root = trustRootFromCertificates(  # type: ignore[no-untyped-call]
                [
                    Certificate(crypto.X509.from_cryptography(c))  # type: ignore[no-untyped-call]
                    for c in cas
                ]
            )
            creator = optionsForClientTLS(netloc[0].decode("ascii"), trustRoot=root)
        self._creators[netloc] = creator
        return creator


def upstream_tls_policy(
    routes: Sequence[RouteConfig], source: str = "<routes>", names: Optional[Names] = None
) -> IPolicyForHTTPS:
    """
    The TLS policy for the proxy's ``Agent(reactor, contextFactory=policy, pool=...)``.

    Every ``https://`` upstream (a route's ``target`` and its load balancer's target URLs)
    is verified against the system CA store, unless its route sets ``tls_verify: false``
    (no verification for that host and port) or ``ca_file`` (trust only the CAs in that
    PEM file for that host and port). The setting applies to the upstream's host and port,
    so every route to one upstream must agree.

    :param routes: the configured routes.
    :param source: where the config came from; named in errors.
    :param names: ``{copy: original}``, to name the operator's files in errors.
    :raises ConfigError: as :func:`~bungate.ops.tlsfiles.check_upstream_tls`.
    """
    overrides: dict[tuple[bytes, int], Optional[Sequence[x509.Certificate]]] = {}
    cas: dict[str, list[x509.Certificate]] = {}
    index = {id(route): i for i, route in enumerate(routes)}
    trust = trust_by_netloc(routes, source)
    for route in routes:
        if route.ca_file is not None and route.ca_file not in cas:
            name = f"routes[{index[id(route)]}].ca_file"
            cas[route.ca_file] = load_ca(route.ca_file, source, name, names or {})
    for netloc, t in trust.items():
        if not t.verify:
            overrides[netloc] = None
        elif t.ca_file is not None:
            overrides[netloc] = cas[t.ca_file]
    return cast(IPolicyForHTTPS, UpstreamTLSPolicy(overrides))
