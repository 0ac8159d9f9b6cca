"""
Certificate, key and CA files: loading, checking, and the master's private copies.

The master checks every file a config names before it spawns a worker (and again on a
reload), so a broken certificate stops the gateway with one line naming the key and the
file, instead of a fleet of workers dying in a loop. It then copies the files into a
private directory (:func:`copy_certificate_files`): every worker it starts until the next
accepted reload loads exactly the bytes that were checked. Messages name the operator's
files, not the copies: every function takes ``names``, ``{copy: original}``.

Nothing here touches the reactor.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union, cast
from urllib.parse import urlsplit

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL
from twisted.internet.interfaces import IAcceptableCiphers
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions
from twisted.logger import Logger

from bungate.config import ConfigError, GatewayConfig, RouteConfig, TLSConfig

__all__ = [
    "EXPIRY_WARNING",
    "KeyPair",
    "Trust",
    "certificate_files",
    "check_tls",
    "check_upstream_tls",
    "cipher_list",
    "copy_certificate_files",
    "load_ca",
    "normal_netloc",
    "pairs",
    "read_config_file",
    "shown_path",
    "trust_by_netloc",
]

log = Logger(namespace="bungate.tls")

#: A certificate expiring sooner than this is logged as a warning when checked.
EXPIRY_WARNING = datetime.timedelta(days=14)

_PrivateKey = Union[
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
]

#: ``{copy: original}``: which operator's file each of the master's copies stands for.
Names = Mapping[str, str]
_NO_NAMES: Names = {}


# --- loading and checking certificate files ---------------------------------------------


@attrs.frozen
class KeyPair:
    """A certificate chain (leaf first) and the private key that goes with the leaf."""

    chain: tuple[x509.Certificate, ...]
    key: _PrivateKey


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def shown_path(path: str, names: Names) -> str:
    """The path to name in a message: the operator's file rather than the master's copy."""
    return names.get(path, path)


def read_config_file(path: str, source: str, name: str, what: str, names: Names) -> bytes:
    """
    The bytes of a file a config key names (a key, a certificate, a secret).

    :param name: the config key, for the error.
    :param what: what the file is, for the error (``"private key"``).
    :param names: the operator's paths of the master's private copies.
    :raises ConfigError: naming the key and the operator's path when it cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reason = e.strerror or str(e)
        shown = shown_path(path, names)
        raise ConfigError(source, name, f"cannot read the {what} file {shown}: {reason}") from None


def _load_certificates(
    path: str, source: str, name: str, what: str, names: Names
) -> list[x509.Certificate]:
    data = read_config_file(path, source, name, what, names)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(source, name, f"{shown_path(path, names)} holds no PEM certificate")
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
    names: Names = _NO_NAMES,
) -> KeyPair:
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
    chain = _load_certificates(cert_path, source, cert_name, "certificate", names)
    leaf = chain[0]
    _check_dates(leaf, shown_path(cert_path, names), source, cert_name, now)
    for extra in chain[1:]:
        if now > _not_after(extra):
            log.warn(
                "chain certificate {subject} in {path} has expired; clients that need it "
                "will fail to verify the server",
                subject=_subject(extra),
                path=shown_path(cert_path, names),
            )

    data = read_config_file(key_path, source, key_name, "private key", names)
    cert_path, key_path = shown_path(cert_path, names), shown_path(key_path, names)
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
    return KeyPair(chain=tuple(chain), key=key)


def cipher_list(config: TLSConfig, source: str) -> Optional[IAcceptableCiphers]:
    """The TLS 1.2 ciphers ``server.tls.ciphers`` selects, or ``None`` for the default."""
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


def pairs(
    config: TLSConfig, source: str, names: Names = _NO_NAMES
) -> tuple[KeyPair, dict[str, KeyPair]]:
    """
    Load the default pair and the SNI pairs of ``server.tls``, checked.

    :returns: ``(default, {normalized host name: pair})``.
    :raises ConfigError: as :func:`check_tls`.
    """
    now = _utcnow()
    default = _load_pair(config.cert, config.key, source, "server.tls", now, names)
    by_name = {}
    for host, (cert, key) in config.certificates.items():
        prefix = f"server.tls.certificates.{host}"
        by_name[normal_host(host)] = _load_pair(cert, key, source, prefix, now, names)
    return default, by_name


def check_tls(config: TLSConfig, source: str, names: Names = _NO_NAMES) -> None:
    """
    Check that HTTPS can start with these settings, before any worker is spawned.

    Every certificate and key file is read and parsed: a file that is missing,
    unreadable or not PEM, a key that does not belong to its certificate, or a
    certificate that has expired or is not valid yet is refused. The cipher string, when
    given, must select at least one cipher. Nothing is checked when ``config.enabled`` is
    false.

    :param config: the ``server.tls`` section.
    :param source: where the config came from; named in the error.
    :param names: ``{copy: original}`` to name the operator's files in errors.
    :raises ConfigError: naming the key (``server.tls.cert``, ``server.tls.key``,
        ``server.tls.certificates.<host>.cert``, ``server.tls.ciphers`` …) and the file.
    """
    if not config.enabled:
        return
    cipher_list(config, source)
    pairs(config, source, names)


def normal_host(host: str) -> str:
    """A host name as SNI look-ups compare it: stripped, lowercase, no trailing dot."""
    return host.strip().lower().rstrip(".")


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
    functions of this module name the operator's files when given the returned
    ``{copy: original}`` as ``names``.

    :param config: the config as the operator wrote it.
    :param directory: an existing, empty directory.
    :returns: the same config with every such path replaced by its copy, in the typed
        sections, and ``{copy: original}``.
    :raises ConfigError: naming the key and the operator's file when a file cannot be
        read, or cannot be written into ``directory``.
    """
    copies: dict[str, str] = {}  # original -> copy
    for path, key, what in certificate_files(config):
        if path in copies:
            continue
        data = read_config_file(path, config.source, key, what, _NO_NAMES)
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
    return _pointing_at(config, copies), originals


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

    return attrs.evolve(config, server=attrs.evolve(config.server, tls=tls), routes=routes)


# --- upstream trust --------------------------------------------------------------------


@attrs.frozen
class Trust:
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
    return normal_netloc(hostname, parts.port or 443)


def normal_netloc(hostname: bytes, port: int) -> tuple[bytes, int]:
    """``(host, port)`` as upstream trust is keyed: no brackets, lowercase, no dot."""
    return hostname.strip(b"[]").lower().rstrip(b"."), port


def trust_by_netloc(routes: Sequence[RouteConfig], source: str) -> dict[tuple[bytes, int], Trust]:
    """
    The trust settings of every ``https://`` upstream, by ``(host, port)``.

    :raises ConfigError: when two routes ask for different trust for one upstream.
    """
    seen: dict[tuple[bytes, int], tuple[int, Trust]] = {}
    for i, route in enumerate(routes):
        trust = Trust(verify=route.tls_verify, ca_file=route.ca_file)
        if not route.tls_verify and route.ca_file is not None:
            raise ConfigError(
                source,
                f"routes[{i}].ca_file",
                "is set but tls_verify is false, so it would never be used; remove one of them",
            )
        netlocs = [n for n in map(_netloc, _upstreams(route)) if n is not None]
        if trust != Trust() and not netlocs:
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


def load_ca(path: str, source: str, name: str, names: Names = _NO_NAMES) -> list[x509.Certificate]:
    """The certificates of a CA file (expired ones are logged).

    :raises ConfigError: naming ``name`` when the file is unreadable or holds none.
    """
    certs = _load_certificates(path, source, name, "CA", names)
    now = _utcnow()
    for cert in certs:
        if now > _not_after(cert):
            log.warn(
                "CA certificate {subject} in {path} has expired",
                subject=_subject(cert),
                path=shown_path(path, names),
            )
    return certs


def check_upstream_tls(
    routes: Sequence[RouteConfig], source: str, names: Names = _NO_NAMES
) -> None:
    """
    Check the routes' upstream TLS settings before any worker is spawned.

    :param routes: the configured routes.
    :param source: where the config came from; named in the error.
    :raises ConfigError: naming ``routes[i].ca_file`` when the file is missing, unreadable
        or holds no PEM certificate, or when two routes ask for different trust for the
        same ``host:port``.
    """
    trust_by_netloc(routes, source)
    for i, route in enumerate(routes):
        if route.ca_file is not None:
            load_ca(route.ca_file, source, f"routes[{i}].ca_file", names)
