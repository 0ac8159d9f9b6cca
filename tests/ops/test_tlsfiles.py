"""
Loading and checking certificate, key and CA files, and the master's private copies
(bungate.ops.tlsfiles).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme
from twisted.web.server import Site

from bungate.config import ConfigError, RouteConfig, TLSConfig, parse_config
from bungate.config.convert import from_json, to_json
from bungate.http.tls import server_tls_factory
from bungate.http.upstream.tls import upstream_tls_policy
from bungate.ops.tlsfiles import (
    certificate_files,
    check_tls,
    check_upstream_tls,
    copy_certificate_files,
)
from tests.tlskit import (
    Hello,
    expect_error,
    tls_config,
    write_pair,
)

# --- (f) check_tls ----------------------------------------------------------------------


def test_check_tls_accepts_good_pair(pair: tuple[str, str]) -> None:
    check_tls(tls_config(*pair), "gw.yaml")


def test_check_tls_disabled_checks_nothing() -> None:
    check_tls(TLSConfig(enabled=False, cert="/nope.crt", key="/nope.key"), "gw.yaml")


def test_check_tls_missing_cert(pair: tuple[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.crt")
    expect_error(tls_config(missing, pair[1]), "server.tls.cert", missing, "No such file")


def test_check_tls_missing_key(pair: tuple[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.key")
    expect_error(tls_config(pair[0], missing), "server.tls.key", missing, "No such file")


def test_check_tls_unreadable(pair: tuple[str, str], tmp_path: Path) -> None:
    expect_error(tls_config(pair[0], str(tmp_path)), "server.tls.key", "cannot read")


def test_check_tls_not_pem(pair: tuple[str, str], tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    expect_error(tls_config(str(junk), pair[1]), "server.tls.cert", str(junk), "no PEM")
    expect_error(tls_config(pair[0], str(junk)), "server.tls.key", str(junk), "no PEM")
    # a key where the cert belongs, and the other way round
    expect_error(tls_config(pair[1], pair[0]), "server.tls.cert", "no PEM certificate")


def test_check_tls_mismatched_key(ca: trustme.CA, pair: tuple[str, str], tmp_path: Path) -> None:
    _, other_key = write_pair(ca.issue_cert("localhost"), tmp_path, "other")
    expect_error(tls_config(pair[0], other_key), "server.tls.key", other_key, "does not match")


def test_check_tls_expired(ca: trustme.CA, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    old = ca.issue_cert(
        "localhost",
        not_before=now - datetime.timedelta(days=60),
        not_after=now - datetime.timedelta(days=1),
    )
    cert, key = write_pair(old, tmp_path, "old")
    expect_error(tls_config(cert, key), "server.tls.cert", cert, "expired on")


def test_check_tls_not_yet_valid(ca: trustme.CA, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    early = ca.issue_cert(
        "localhost",
        not_before=now + datetime.timedelta(days=1),
        not_after=now + datetime.timedelta(days=60),
    )
    cert, key = write_pair(early, tmp_path, "early")
    expect_error(tls_config(cert, key), "server.tls.cert", cert, "not valid before")


def test_check_tls_encrypted_key(pair: tuple[str, str], tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(pair[1]).read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    expect_error(tls_config(pair[0], str(locked)), "server.tls.key", "passphrase")


def test_check_tls_sni_entry_named(pair: tuple[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "a.crt")
    config = tls_config(*pair, certificates={"a.example": (missing, pair[1])})
    expect_error(config, "server.tls.certificates.a.example.cert", missing)


def test_check_tls_bad_ciphers(pair: tuple[str, str]) -> None:
    expect_error(tls_config(*pair, ciphers="NO-SUCH-CIPHER"), "server.tls.ciphers", "selects no")


def test_check_tls_from_parsed_config(tmp_path: Path) -> None:
    # The same errors through the real schema, as the master sees them.
    config = parse_config(
        {"server": {"tls": {"enabled": True, "cert": "/no/such.crt", "key": "/no/such.key"}}},
        source="gw.yaml",
    )
    expect_error(config.server.tls, "server.tls.cert", "/no/such.crt")


def test_server_tls_factory_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        server_tls_factory(tls_config(str(tmp_path / "x"), str(tmp_path / "y")), Site(Hello()))
    assert caught.value.key == "server.tls.cert"


def routes(*items: dict[str, Any]) -> Sequence[RouteConfig]:
    return parse_config({"routes": list(items)}, source="gw.yaml").routes


def test_check_upstream_tls_errors(tmp_path: Path, ca_file: str) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    good = {"pattern": "/a", "target": "https://a.internal"}
    cases = [
        (
            {"pattern": "/b", "target": "https://b.internal", "ca_file": str(tmp_path / "nope")},
            "routes[1].ca_file",
            "No such file",
        ),
        (
            {"pattern": "/b", "target": "https://b.internal", "ca_file": str(junk)},
            "routes[1].ca_file",
            "no PEM certificate",
        ),
        (
            {
                "pattern": "/b",
                "target": "https://b.internal",
                "ca_file": ca_file,
                "tls_verify": False,
            },
            "routes[1].ca_file",
            "tls_verify is false",
        ),
        (
            {"pattern": "/b", "target": "https://A.internal:443/v2", "tls_verify": False},
            "routes[1].tls_verify",
            "routes[0]",
        ),
    ]
    for route, key, words in cases:
        with pytest.raises(ConfigError) as caught:
            check_upstream_tls(routes(good, route), "gw.yaml")
        assert caught.value.key == key, caught.value
        assert words in caught.value.problem, caught.value
        with pytest.raises(ConfigError):
            upstream_tls_policy(routes(good, route), "gw.yaml")
    check_upstream_tls(
        routes(good, {"pattern": "/b", "target": "https://b", "ca_file": ca_file}), "gw.yaml"
    )


# --- (i) the master's private copies of the files workers load ------------------------


def copies_config(pair: tuple[str, str], other: tuple[str, str], ca_file: str) -> Any:
    """A parsed config naming every kind of file; the key of ``pair`` is used twice."""
    return parse_config(
        {
            "server": {
                "tls": {
                    "enabled": True,
                    "cert": pair[0],
                    "key": pair[1],
                    "certificates": {
                        "API.example.org": {"cert": other[0], "key": other[1]},
                        "*.example.com": {"cert": pair[0], "key": pair[1]},
                    },
                }
            },
            "routes": [
                {"pattern": "/a/*", "target": "https://a.internal", "ca_file": ca_file},
                {"pattern": "/b/*", "target": "http://127.0.0.1:1"},
            ],
        },
        source="gw.yaml",
    )


def test_copy_certificate_files(
    ca: trustme.CA, pair: tuple[str, str], ca_file: str, tmp_path: Path
) -> None:
    other = write_pair(ca.issue_cert("api.example.org"), tmp_path, "other")
    config = copies_config(pair, other, ca_file)
    assert [key for _, key, _ in certificate_files(config)] == [
        "server.tls.cert",
        "server.tls.key",
        "server.tls.certificates.api.example.org.cert",
        "server.tls.certificates.api.example.org.key",
        "server.tls.certificates.*.example.com.cert",
        "server.tls.certificates.*.example.com.key",
        "routes[0].ca_file",
    ]
    directory = tmp_path / "copies"
    directory.mkdir(mode=0o700)

    workers, originals = copy_certificate_files(config, str(directory))
    # One private copy per distinct file, byte for byte.
    assert sorted(originals.values()) == sorted({*pair, *other, ca_file})
    assert sorted(str(p) for p in directory.iterdir()) == sorted(originals)
    for copy, original in originals.items():
        assert Path(copy).read_bytes() == Path(original).read_bytes()
        assert Path(copy).stat().st_mode & 0o777 == 0o600
    copy_of = {original: copy for copy, original in originals.items()}

    tls = workers.server.tls
    assert (tls.cert, tls.key) == (copy_of[pair[0]], copy_of[pair[1]])
    assert tls.certificates == {
        "api.example.org": (copy_of[other[0]], copy_of[other[1]]),
        "*.example.com": (copy_of[pair[0]], copy_of[pair[1]]),
    }
    assert [r.ca_file for r in workers.routes] == [copy_of[ca_file], None]
    assert workers.source == config.source
    # Workers are sent the config as JSON: it says the same.
    assert from_json(to_json(workers)) == workers
    # The operator's config is untouched.
    assert config.server.tls.cert == pair[0] and config.routes[0].ca_file == ca_file
    check_tls(workers.server.tls, workers.source, originals)
    check_upstream_tls(workers.routes, workers.source, originals)


def test_copy_certificate_files_leaves_disabled_tls_alone(tmp_path: Path) -> None:
    config = parse_config(
        {"server": {"tls": {"enabled": False, "cert": "/no/such.crt", "key": "/no/such.key"}}}
    )
    assert certificate_files(config) == []
    workers, originals = copy_certificate_files(config, str(tmp_path))
    assert originals == {} and list(tmp_path.iterdir()) == []
    assert workers.server.tls.cert == "/no/such.crt"


def test_copies_are_named_after_the_operators_files(pair: tuple[str, str], tmp_path: Path) -> None:
    config = parse_config(
        {"server": {"tls": {"enabled": True, "cert": pair[0], "key": pair[1]}}}, source="gw.yaml"
    )
    workers, originals = copy_certificate_files(config, str(tmp_path))
    copy = workers.server.tls.cert
    assert copy is not None and copy != pair[0]
    Path(copy).write_bytes(b"garbage")
    error = expect_error(workers.server.tls, "server.tls.cert", pair[0], "no PEM", names=originals)
    assert copy not in str(error)
    # Without the names (copies no one knows of): the path is shown as it is.
    expect_error(workers.server.tls, "server.tls.cert", copy, "no PEM")


def test_copy_of_an_unreadable_file_names_key_and_file(
    pair: tuple[str, str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing.key")
    config = parse_config(
        {"server": {"tls": {"enabled": True, "cert": pair[0], "key": missing}}}, source="gw.yaml"
    )
    directory = tmp_path / "copies"
    directory.mkdir()
    with pytest.raises(ConfigError) as caught:
        copy_certificate_files(config, str(directory))
    assert caught.value.key == "server.tls.key"
    assert missing in caught.value.problem and "No such file" in caught.value.problem
