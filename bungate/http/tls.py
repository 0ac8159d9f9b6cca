"""
HTTPS termination in a worker: certificates by SNI, the TLS versions and ciphers allowed,
and ALPN.

:func:`server_tls_factory` wraps the worker's site in TLS, loading the files (the master's
checked copies) when the worker starts, so a reload that rolls the workers picks up new
certificates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, cast

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IAcceptableCiphers,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
)
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from bungate.config import TLSConfig
from bungate.ops.tlsfiles import KeyPair, Names, cipher_list, normal_host, pairs

__all__ = ["ALPN_PROTOCOL", "server_tls_factory"]

#: The application protocol of a client that offers no ALPN (and of HTTP/1.1).
ALPN_PROTOCOL = b"http/1.1"

_MIN_VERSIONS = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}


def _alpn_selector(preferred: list[bytes]) -> Any:
    """The ALPN callback: the first of ``preferred`` (server order) the client offers."""

    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        for protocol in preferred:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def _use_pair(context: SSL.Context, pair: KeyPair) -> None:
    """Put a certificate chain and key on a context (before any connection uses it)."""
    try:
        # pyOpenSSL >= 24.3 takes cryptography objects and deprecates its own types
        context.use_certificate(pair.chain[0])
        context.use_privatekey(pair.key)
        extra: list[Any] = list(pair.chain[1:])
    except TypeError:
        context.use_certificate(crypto.X509.from_cryptography(pair.chain[0]))
        context.use_privatekey(crypto.PKey.from_cryptography_key(pair.key))
        extra = [crypto.X509.from_cryptography(c) for c in pair.chain[1:]]
    for cert in extra:
        context.add_extra_chain_cert(cert)
    context.check_privatekey()


def _context(
    pair: KeyPair, config: TLSConfig, ciphers: Optional[IAcceptableCiphers]
) -> SSL.Context:
    protocols = [p.encode("ascii") for p in config.alpn]
    options = CertificateOptions(
        raiseMinimumTo=_MIN_VERSIONS[config.min_version],
        acceptableCiphers=ciphers,
        acceptableProtocols=protocols,
    )
    context = options.getContext()
    _use_pair(context, pair)
    context.set_alpn_select_callback(_alpn_selector(protocols))
    return context


@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    """
    Makes the server side of each TLS connection; picks a certificate by SNI.

    :param default: the context for clients that send no known server name.
    :param by_name: contexts by lowercase host name; a key ``*.example.com`` serves any
        single label below ``example.com``.
    """

    def __init__(self, default: SSL.Context, by_name: Mapping[str, SSL.Context]) -> None:
        self._default = default
        self._by_name = dict(by_name)
        if self._by_name:
            default.set_tlsext_servername_callback(self._pick)

    def context_for(self, server_name: Optional[bytes]) -> SSL.Context:
        """
        The context that serves ``server_name``.

        :param server_name: the SNI name the client sent, or None.
        """
        if not server_name:
            return self._default
        try:
            name = normal_host(server_name.decode("ascii"))
        except UnicodeDecodeError:
            return self._default
        found = self._by_name.get(name)
        if found is None and "." in name:
            found = self._by_name.get("*." + name.split(".", 1)[1])
        return self._default if found is None else found

    def _pick(self, connection: SSL.Connection) -> None:
        context = self.context_for(connection.get_servername())
        if context is not self._default:
            connection.set_context(context)

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        Make the OpenSSL connection for one accepted TCP connection.

        :param tlsProtocol: the TLS protocol that will drive it.
        """
        return SSL.Connection(self._default, None)


def server_tls_factory(
    config: TLSConfig, wrapped: IProtocolFactory, names: Optional[Names] = None
) -> IProtocolFactory:
    """
    Wrap a protocol factory (the worker's ``Site``) in TLS.

    The certificate files are read now: call this again (in a new worker) to pick up new
    files. ``cert`` may hold the intermediate certificates after the server's own; they are
    sent to clients. ``min_version`` sets the lowest TLS version accepted, ``ciphers``
    restricts the TLS 1.2 cipher suites, ALPN offers ``alpn`` (``h2`` and ``http/1.1`` by
    default; an ``h2`` connection is switched to HTTP/2 by the channel), and
    ``certificates`` chooses another certificate by the SNI host name.

    :param config: the ``server.tls`` section; ``enabled`` is not looked at.
    :param wrapped: the factory that speaks HTTP inside TLS.
    :param names: ``{copy: original}``, to name the operator's files in errors.
    :returns: a ``TLSMemoryBIOFactory`` to listen with.
    :raises ConfigError: as :func:`check_tls`.
    """
    source = "<server.tls>"
    ciphers = cipher_list(config, source)
    default, by_name = pairs(config, source, names or {})
    creator = _ServerCreator(
        _context(default, config, ciphers),
        {name: _context(pair, config, ciphers) for name, pair in by_name.items()},
    )
    factory = _ServerTLSFactory(cast(IOpenSSLServerConnectionCreator, creator), False, wrapped)
    return cast(IProtocolFactory, factory)


class _ServerTLSFactory(TLSMemoryBIOFactory):
    """
    ``TLSMemoryBIOFactory`` that leaves ALPN to our contexts.

    Twisted before 26 (the newest PyPy 3.9 can install) sets its own ALPN callback on
    every connection, replacing :func:`_select_alpn`: it agrees to ``h2`` when the wrapped
    factory offers it, and answers a client offering only ``h2`` with an empty protocol
    name, which OpenSSL 3 turns into a failed handshake.
    """

    def _applyProtocolNegotiation(self, connection: SSL.Connection) -> None:
        pass
