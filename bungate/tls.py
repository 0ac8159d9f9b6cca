"""
TLS for the gateway: HTTPS termination in the workers, the plain-HTTP redirect listener,
and how the reverse proxy trusts ``https://`` upstreams.

The master calls :func:`check_tls` and :func:`check_upstream_tls` before it spawns any
worker (and again on a SIGHUP reload), so a broken certificate stops the gateway with one
line naming the file, instead of a fleet of workers dying in a loop. A worker then calls
:func:`server_tls_factory` around its ``Site`` and hands :func:`upstream_tls_policy` to its
``Agent``; both load the files again, so a reload that rolls the workers picks up new
certificates.

The files a worker loads are the master's private copies (:func:`copy_certificate_files`),
not the operator's: the master checks the copies, and every worker it starts until the next
accepted reload loads exactly those bytes. Messages still name the operator's files.

Nothing here touches the reactor.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union, cast
from urllib.parse import urlsplit

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IAcceptableCiphers,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
)
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from bungate.config import ConfigError, GatewayConfig, RouteConfig, TLSConfig

__all__ = [
    "RedirectResource",
    "UpstreamTLSPolicy",
    "certificate_files",
    "check_tls",
    "check_upstream_tls",
    "copy_certificate_files",
    "forget_copies",
    "name_copies",
    "server_tls_factory",
    "upstream_tls_policy",
]

log = Logger(namespace="bungate.tls")

#: The only application protocol the workers speak over TLS.
ALPN_PROTOCOL = b"http/1.1"

#: A certificate expiring sooner than this is logged as a warning when checked.
EXPIRY_WARNING = datetime.timedelta(days=14)

_MIN_VERSIONS = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}

_PrivateKey = Union[
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
]


# --- loading and checking certificate files ---------------------------------------------


@attrs.frozen
class _KeyPair:
    """A certificate chain (leaf first) and the private key that goes with the leaf."""

    chain: tuple[x509.Certificate, ...]
    key: _PrivateKey


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# copy path -> the operator's path, for the master's copies (see copy_certificate_files)
_ORIGINALS: dict[str, str] = {}


def _shown(path: str) -> str:
    """The path to name in a message: the operator's file rather than the master's copy."""
    return _ORIGINALS.get(path, path)


def _read(path: str, source: str, name: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reason = e.strerror or str(e)
        shown = _shown(path)
        raise ConfigError(source, name, f"cannot read the {what} file {shown}: {reason}") from None


def _load_certificates(path: str, source: str, name: str, what: str) -> list[x509.Certificate]:
    data = _read(path, source, name, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(source, name, f"{_shown(path)} holds no PEM certificate")
    return certs


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    if hasattr(cert, "not_valid_after_utc"):  # cryptography >= 42
        return cert.not_valid_after_utc
    return cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def _not_before(cert: x509.Certificate) -> datetime.datetime:
    if hasattr(cert, "not_valid_before_utc"):
        return cert.not_valid_before_utc
    return cert.not_valid_before.replace(tzinfo=datetime.timezone.utc)


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _check_dates(
    cert: x509.Certificate, path: str, source: str, name: str, now: datetime.datetime
) -> None:
    not_before, not_after = _not_before(cert), _not_after(cert)
    path = _shown(path)
    if now > not_after:
        raise ConfigError(
            source, name, f"the certificate in {path} expired on {not_after:%Y-%m-%d %H:%M} UTC"
        )
    if now < not_before:
        raise ConfigError(
            source,
            name,
            f"the certificate in {path} is not valid before {not_before:%Y-%m-%d %H:%M} UTC",
        )
    if not_after - now < EXPIRY_WARNING:
        log.warn(
            "TLS certificate {path} ({subject}) expires on {expiry} UTC",
            path=path,
            subject=_subject(cert),
            expiry=f"{not_after:%Y-%m-%d %H:%M}",
        )


def _public_der(key: Any) -> bytes:
    data: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def _load_pair(
    cert_path: Optional[str],
    key_path: Optional[str],
    source: str,
    prefix: str,
    now: datetime.datetime,
) -> _KeyPair:
    """
    Load and check one certificate chain and its key.

    :param prefix: the dotted key of the pair, e.g. ``server.tls``; errors name
        ``<prefix>.cert`` or ``<prefix>.key``.
    """
    cert_name, key_name = f"{prefix}.cert", f"{prefix}.key"
    if cert_path is None:
        raise ConfigError(source, cert_name, "is required when tls.enabled is true")
    if key_path is None:
        raise ConfigError(source, key_name, "is required when tls.enabled is true")
    chain = _load_certificates(cert_path, source, cert_name, "certificate")
    leaf = chain[0]
    _check_dates(leaf, cert_path, source, cert_name, now)
    for extra in chain[1:]:
        if now > _not_after(extra):
            log.warn(
                "chain certificate {subject} in {path} has expired; clients that need it "
                "will fail to verify the server",
                subject=_subject(extra),
                path=_shown(cert_path),
            )

    data = _read(key_path, source, key_name, "private key")
    cert_path, key_path = _shown(cert_path), _shown(key_path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            source,
            key_name,
            f"{key_path} is encrypted with a passphrase; bungate needs an unencrypted key "
            "(protect it with file permissions instead)",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(source, key_name, f"{key_path} holds no PEM private key") from None
    if not isinstance(
        key,
        (
            rsa.RSAPrivateKey,
            ec.EllipticCurvePrivateKey,
            dsa.DSAPrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
        ),
    ):
        raise ConfigError(
            source, key_name, f"{key_path} holds a {type(key).__name__}, not a TLS server key"
        )
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise ConfigError(
            source,
            key_name,
            f"the key in {key_path} does not match the certificate in {cert_path} "
            "(the server's own certificate must come first in that file)",
        )
    return _KeyPair(chain=tuple(chain), key=key)


def _cipher_list(config: TLSConfig, source: str) -> Optional[IAcceptableCiphers]:
    if config.ciphers is None:
        return None
    try:
        ciphers = cast(
            IAcceptableCiphers,
            AcceptableCiphers.fromOpenSSLCipherString(  # type: ignore[no-untyped-call]
                config.ciphers
            ),
        )
        CertificateOptions(acceptableCiphers=ciphers)
    except (SSL.Error, ValueError, UnicodeError):
        raise ConfigError(
            source,
            "server.tls.ciphers",
            f"{config.ciphers!r} selects no cipher this OpenSSL knows",
        ) from None
    return ciphers


def _pairs(config: TLSConfig, source: str) -> tuple[_KeyPair, dict[str, _KeyPair]]:
    now = _utcnow()
    default = _load_pair(config.cert, config.key, source, "server.tls", now)
    by_name = {}
    for host, (cert, key) in config.certificates.items():
        prefix = f"server.tls.certificates.{host}"
        by_name[_normal_host(host)] = _load_pair(cert, key, source, prefix, now)
    return default, by_name


def check_tls(config: TLSConfig, source: str) -> None:
    """
    Check that HTTPS can start with these settings, before any worker is spawned.

    Every certificate and key file is read and parsed: a file that is missing,
    unreadable or not PEM, a key that does not belong to its certificate, or a
    certificate that has expired or is not valid yet is refused. The cipher string, when
    given, must select at least one cipher. Nothing is checked when ``config.enabled`` is
    false.

    :param config: the ``server.tls`` section.
    :param source: where the config came from; named in the error.
    :raises ConfigError: naming the key (``server.tls.cert``, ``server.tls.key``,
        ``server.tls.certificates.<host>.cert``, ``server.tls.ciphers`` …) and the file.
    """
    if not config.enabled:
        return
    _cipher_list(config, source)
    _pairs(config, source)


# --- the master's private copies of the files workers load ------------------------------


def certificate_files(config: GatewayConfig) -> list[tuple[str, str, str]]:
    """
    Every file a worker loads when it starts: the ``server.tls`` pair and each SNI pair
    (when ``server.tls.enabled``), and each route's ``ca_file``.

    :returns: ``(path, dotted key, what)`` triples in config order, e.g.
        ``("/etc/tls/key.pem", "server.tls.key", "private key")``; a path used twice is
        listed twice.
    """
    files: list[tuple[str, str, str]] = []
    tls = config.server.tls
    if tls.enabled:
        for path, key, what in (
            (tls.cert, "server.tls.cert", "certificate"),
            (tls.key, "server.tls.key", "private key"),
        ):
            if path is not None:
                files.append((path, key, what))
        for host, (cert, key) in tls.certificates.items():
            prefix = f"server.tls.certificates.{host}"
            files.append((cert, f"{prefix}.cert", "certificate"))
            files.append((key, f"{prefix}.key", "private key"))
    for i, route in enumerate(config.routes):
        if route.ca_file is not None:
            files.append((route.ca_file, f"routes[{i}].ca_file", "CA"))
    return files


def _write_private(path: str, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def copy_certificate_files(
    config: GatewayConfig, directory: str
) -> tuple[GatewayConfig, dict[str, str]]:
    """
    Copy the files of :func:`certificate_files` into ``directory`` and point a config at
    the copies.

    Each distinct path is read once and its bytes written to a new file (mode 0600) in
    ``directory``, which should be private to this process (``tempfile.mkdtemp``). The
    copies are then named after the operator's files in every message of this module, so
    checking the returned config reports problems with the operator's paths.

    :param config: the config as the operator wrote it.
    :param directory: an existing, empty directory.
    :returns: the same config with every such path replaced by its copy, in the typed
        sections and in ``raw`` (which workers are built from), and ``{copy: original}``.
    :raises ConfigError: naming the key and the operator's file when a file cannot be
        read, or cannot be written into ``directory``.
    """
    copies: dict[str, str] = {}  # original -> copy
    for path, key, what in certificate_files(config):
        if path in copies:
            continue
        data = _read(path, config.source, key, what)
        copy = os.path.join(directory, f"{len(copies)}-{os.path.basename(path) or 'file'}")
        try:
            _write_private(copy, data)
        except OSError as e:
            raise ConfigError(
                config.source,
                key,
                f"cannot copy {path} into {directory} for the workers: {e.strerror or e}",
            ) from None
        copies[path] = copy
    originals = {copy: path for path, copy in copies.items()}
    name_copies(originals)
    return _pointing_at(config, copies), originals


def name_copies(originals: Mapping[str, str]) -> None:
    """
    Name the operator's file instead of a copy in messages from now on.

    :param originals: ``{copy: original}``, as returned by :func:`copy_certificate_files`
        (workers get it from their master).
    """
    _ORIGINALS.update(originals)


def forget_copies(copies: Iterable[str]) -> None:
    """Stop translating these copies' paths (they are about to be deleted)."""
    for copy in copies:
        _ORIGINALS.pop(copy, None)


def _pointing_at(config: GatewayConfig, moved: Mapping[str, str]) -> GatewayConfig:
    """``config`` with each path in ``moved`` replaced by its new path."""

    def new(path: Any) -> Any:
        return moved.get(path, path) if isinstance(path, str) else path

    tls = config.server.tls
    tls = attrs.evolve(
        tls,
        cert=new(tls.cert),
        key=new(tls.key),
        certificates={h: (new(c), new(k)) for h, (c, k) in tls.certificates.items()},
    )
    routes = tuple(attrs.evolve(r, ca_file=new(r.ca_file)) for r in config.routes)

    raw = dict(config.raw)
    server = raw.get("server")
    if isinstance(server, Mapping) and isinstance(server.get("tls"), Mapping):
        raw_tls = dict(server["tls"])
        for name in ("cert", "key"):
            if name in raw_tls:
                raw_tls[name] = new(raw_tls[name])
        sni = raw_tls.get("certificates")
        if isinstance(sni, Mapping):
            raw_tls["certificates"] = {
                host: {k: new(v) for k, v in pair.items()} if isinstance(pair, Mapping) else pair
                for host, pair in sni.items()
            }
        raw["server"] = {**server, "tls": raw_tls}
    raw_routes = raw.get("routes")
    if isinstance(raw_routes, (list, tuple)):
        raw["routes"] = [
            {**r, "ca_file": new(r["ca_file"])} if isinstance(r, Mapping) and "ca_file" in r else r
            for r in raw_routes
        ]
    return attrs.evolve(config, server=attrs.evolve(config.server, tls=tls), routes=routes, raw=raw)


# --- the server side -------------------------------------------------------------------


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> Any:
    # Twisted's own ALPN callback adds whatever the wrapped factory offers (h2 when the
    # h2 package is installed); the proxy speaks HTTP/1.1 only, so we decide here.
    if ALPN_PROTOCOL in offered:
        return ALPN_PROTOCOL
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _use_pair(context: SSL.Context, pair: _KeyPair) -> None:
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
    pair: _KeyPair, config: TLSConfig, ciphers: Optional[IAcceptableCiphers]
) -> SSL.Context:
    options = CertificateOptions(
        raiseMinimumTo=_MIN_VERSIONS[config.min_version],
        acceptableCiphers=ciphers,
        acceptableProtocols=[ALPN_PROTOCOL],
    )
    context = options.getContext()
    _use_pair(context, pair)
    context.set_alpn_select_callback(_select_alpn)
    return context


def _normal_host(host: str) -> str:
    return host.strip().lower().rstrip(".")


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
            name = _normal_host(server_name.decode("ascii"))
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


def server_tls_factory(config: TLSConfig, wrapped: IProtocolFactory) -> IProtocolFactory:
    """
    Wrap a protocol factory (the worker's ``Site``) in TLS.

    The certificate files are read now: call this again (in a new worker) to pick up new
    files. ``cert`` may hold the intermediate certificates after the server's own; they are
    sent to clients. ``min_version`` sets the lowest TLS version accepted, ``ciphers``
    restricts the TLS 1.2 cipher suites, ALPN offers ``http/1.1`` only, and
    ``certificates`` chooses another certificate by the SNI host name.

    :param config: the ``server.tls`` section; ``enabled`` is not looked at.
    :param wrapped: the factory that speaks HTTP inside TLS.
    :returns: a ``TLSMemoryBIOFactory`` to listen with.
    :raises ConfigError: as :func:`check_tls`.
    """
    source = "<server.tls>"
    ciphers = _cipher_list(config, source)
    default, by_name = _pairs(config, source)
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


# --- the plain-HTTP redirect listener ---------------------------------------------------

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_IPV6 = re.compile(r"^\[[0-9a-f:.]+\]$")


def _split_authority(authority: str) -> Optional[str]:
    """
    The host part of ``host[:port]``, lowercased, or None when it is not a plain host.
    """
    authority = authority.strip().lower()
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return None
        host, port = authority[: end + 1], authority[end + 1 :]
        valid = bool(_IPV6.match(host))
    else:
        host, colon, digits = authority.partition(":")
        port = colon + digits
        host = host.rstrip(".")
        valid = bool(_HOSTNAME.match(host))
    if not valid or (port and not (port[0] == ":" and (port[1:].isdigit() or not port[1:]))):
        return None
    return host


def _set_header(request: Request, name: bytes, value: bytes) -> None:
    request.setHeader(name, value)  # type: ignore[no-untyped-call]


class RedirectResource(Resource):
    """
    Answers every request on the plain-HTTP listener with a permanent redirect to HTTPS.

    The redirect is a ``308``, so clients repeat the same method and body. The path and
    query are kept byte for byte. Only host names in ``allowed_hosts`` are redirected
    (compared without case and without any ``:port``); any other ``Host`` gets a ``400``
    with a small JSON body, so the listener never sends a client somewhere else. An empty
    ``allowed_hosts`` redirects any well-formed host name, which lets a forged ``Host``
    header choose the redirect target: set the list in production.

    :param https_port: the port HTTPS listens on; left out of the URL when 443.
    :param allowed_hosts: the host names this gateway serves.
    """

    isLeaf = True

    def __init__(self, https_port: int, allowed_hosts: Sequence[str]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.https_port = https_port
        self.allowed_hosts = frozenset(
            h for h in (_split_authority(a) for a in allowed_hosts) if h is not None
        )

    def _refuse(self, request: Request, problem: str) -> bytes:
        request.setResponseCode(400, b"Bad Request")
        _set_header(request, b"content-type", b"application/json")
        _set_header(request, b"cache-control", b"no-store")
        return json.dumps({"error": "bad request", "message": problem}).encode() + b"\n"

    def render(self, request: Request) -> bytes:
        """
        Answer one request with 308 or 400.

        :param request: the plain-HTTP request.
        """
        target: bytes = request.uri
        authority: Optional[bytes] = request.getHeader(b"host")
        lowered = target[:8].lower()
        if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
            # absolute-form: the authority in the target wins over the Host header
            rest = target.split(b"://", 1)[1]
            cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
            authority, target = rest[:cut], rest[cut:]
            if not target.startswith(b"/"):
                target = b"/" + target
        if not target.startswith(b"/"):
            return self._refuse(request, "the request target must be a path")
        if not authority:
            return self._refuse(request, "a Host header is required")
        host = _split_authority(authority.decode("latin-1"))
        if host is None:
            return self._refuse(request, "the Host header is not a valid host name")
        if self.allowed_hosts and host not in self.allowed_hosts:
            return self._refuse(request, "this host is not served here")
        port = b"" if self.https_port == 443 else b":%d" % self.https_port
        location = b"https://" + host.encode("ascii") + port + target
        request.setResponseCode(308, b"Permanent Redirect")
        _set_header(request, b"location", location)
        _set_header(request, b"content-type", b"text/plain; charset=utf-8")
        return b"Moved to " + location + b"\n"


# --- the upstream (client) side ---------------------------------------------------------


@attrs.frozen
class _Trust:
    """How to check one upstream's certificate: ``verify`` false, or a CA file, or both default."""

    verify: bool = True
    ca_file: Optional[str] = None


def _upstreams(route: RouteConfig) -> list[str]:
    urls = [route.target] if route.target else []
    if route.load_balancer is not None:
        urls.extend(t.url for t in route.load_balancer.targets)
    return urls


def _netloc(url: str) -> Optional[tuple[bytes, int]]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return None
    try:
        hostname = parts.hostname.encode("idna")
    except UnicodeError:
        hostname = parts.hostname.encode("utf-8")
    return _normal_netloc(hostname, parts.port or 443)


def _normal_netloc(hostname: bytes, port: int) -> tuple[bytes, int]:
    return hostname.strip(b"[]").lower().rstrip(b"."), port


def _trust_by_netloc(routes: Sequence[RouteConfig], source: str) -> dict[tuple[bytes, int], _Trust]:
    """Collect the per-upstream trust settings, refusing contradictions."""
    seen: dict[tuple[bytes, int], tuple[int, _Trust]] = {}
    for i, route in enumerate(routes):
        trust = _Trust(verify=route.tls_verify, ca_file=route.ca_file)
        if not route.tls_verify and route.ca_file is not None:
            raise ConfigError(
                source,
                f"routes[{i}].ca_file",
                "is set but tls_verify is false, so it would never be used; remove one of them",
            )
        netlocs = [n for n in map(_netloc, _upstreams(route)) if n is not None]
        if trust != _Trust() and not netlocs:
            log.warn(
                "{source}: routes[{index}] sets tls_verify/ca_file but has no https:// "
                "target; the setting has no effect",
                source=source,
                index=i,
            )
        for netloc in netlocs:
            first = seen.setdefault(netloc, (i, trust))
            if first[1] != trust:
                host, port = netloc
                raise ConfigError(
                    source,
                    f"routes[{i}].{'ca_file' if trust.verify else 'tls_verify'}",
                    f"differs from routes[{first[0]}] for the upstream "
                    f"{host.decode()}:{port}; every route to one upstream must use the same "
                    "tls_verify and ca_file",
                )
    return {netloc: trust for netloc, (_, trust) in seen.items()}


def _load_ca(path: str, source: str, name: str) -> list[x509.Certificate]:
    certs = _load_certificates(path, source, name, "CA")
    now = _utcnow()
    for cert in certs:
        if now > _not_after(cert):
            log.warn(
                "CA certificate {subject} in {path} has expired",
                subject=_subject(cert),
                path=_shown(path),
            )
    return certs


def check_upstream_tls(routes: Sequence[RouteConfig], source: str) -> None:
    """
    Check the routes' upstream TLS settings before any worker is spawned.

    :param routes: the configured routes.
    :param source: where the config came from; named in the error.
    :raises ConfigError: naming ``routes[i].ca_file`` when the file is missing, unreadable
        or holds no PEM certificate, or when two routes ask for different trust for the
        same ``host:port``.
    """
    _trust_by_netloc(routes, source)
    for i, route in enumerate(routes):
        if route.ca_file is not None:
            _load_ca(route.ca_file, source, f"routes[{i}].ca_file")


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
        netloc = _normal_netloc(hostname, port)
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


def upstream_tls_policy(routes: Sequence[RouteConfig], source: str = "<routes>") -> IPolicyForHTTPS:
    """
    The TLS policy for the proxy's ``Agent(reactor, contextFactory=policy, pool=...)``.

    Every ``https://`` upstream (a route's ``target`` and its load balancer's target URLs)
    is verified against the system CA store, unless its route sets ``tls_verify: false``
    (no verification for that host and port) or ``ca_file`` (trust only the CAs in that
    PEM file for that host and port). The setting applies to the upstream's host and port,
    so every route to one upstream must agree.

    :param routes: the configured routes.
    :param source: where the config came from; named in errors.
    :raises ConfigError: as :func:`check_upstream_tls`.
    """
    overrides: dict[tuple[bytes, int], Optional[Sequence[x509.Certificate]]] = {}
    cas: dict[str, list[x509.Certificate]] = {}
    index = {id(route): i for i, route in enumerate(routes)}
    trust = _trust_by_netloc(routes, source)
    for route in routes:
        if route.ca_file is not None and route.ca_file not in cas:
            name = f"routes[{index[id(route)]}].ca_file"
            cas[route.ca_file] = _load_ca(route.ca_file, source, name)
    for netloc, t in trust.items():
        if not t.verify:
            overrides[netloc] = None
        elif t.ca_file is not None:
            overrides[netloc] = cas[t.ca_file]
    return cast(IPolicyForHTTPS, UpstreamTLSPolicy(overrides))
