"""
Building the ``auth`` policy's credentials from its config (internal): key files, secrets
from files or environment variables, API key lists, each error naming its config key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

from bungate.config import ConfigError
from bungate.config.policy import AuthConfig, JwtConfig
from bungate.core.auth import (
    ApiKeys,
    JwtSettings,
    JwtVerifier,
    KeySource,
    PublicKeyFile,
    SecretKey,
    parse_api_key_file,
)
from bungate.ops.tlsfiles import read_config_file, shown_path

__all__ = ["build_api_keys", "build_verifier", "key_source"]


def _variable(name: str, source: str, key: str, environ: Mapping[str, str]) -> str:
    value = environ.get(name)
    if value is None:
        raise ConfigError(source, key, f"the environment variable {name} is not set")
    if not value.strip():
        raise ConfigError(source, key, f"the environment variable {name} is empty")
    return value


def key_source(
    jwt: JwtConfig, source: str, key: str, names: Mapping[str, str], environ: Mapping[str, str]
) -> tuple[Optional[KeySource], tuple[str, str]]:
    """
    The static key of a ``jwt`` section (``None`` for a ``jwks_uri``), and where it was
    configured: ``(dotted key, what to call it in a message)``.
    """
    if jwt.public_key is not None:
        where = (f"{key}.public_key", shown_path(jwt.public_key, names))
        pem = read_config_file(jwt.public_key, source, where[0], "public key", names)
        try:
            return PublicKeyFile(pem), where
        except ValueError as e:
            raise ConfigError(source, where[0], f"{where[1]}: {e}") from None
    if jwt.jwks_uri is not None:
        return None, (f"{key}.jwks_uri", jwt.jwks_uri)
    if jwt.secret_file is not None:
        where = (f"{key}.secret_file", shown_path(jwt.secret_file, names))
        data = read_config_file(jwt.secret_file, source, where[0], "secret", names)
        secret = data.rstrip(b"\r\n")
        if not secret:
            raise ConfigError(source, where[0], f"the secret file {where[1]} is empty")
    elif jwt.secret_env is not None:
        where = (f"{key}.secret_env", f"the environment variable {jwt.secret_env}")
        secret = _variable(jwt.secret_env, source, where[0], environ).encode("utf-8")
    else:
        assert jwt.secret is not None  # the config holds exactly one key source
        where = (f"{key}.secret", "the secret")
        secret = jwt.secret.encode("utf-8")
    try:
        return SecretKey(secret), where
    except ValueError as e:
        raise ConfigError(source, where[0], f"{where[1]}: {e}") from None


def build_verifier(
    jwt: JwtConfig, keys: KeySource, clock: Any, source: str, key: str, where: tuple[str, str]
) -> JwtVerifier:
    try:
        settings = JwtSettings(
            algorithms=jwt.algorithms,
            issuer=jwt.issuer,
            audience=jwt.audience,
            leeway=jwt.leeway,
            required_claims=jwt.required_claims,
            required_scopes=jwt.required_scopes,
            require_expiry=jwt.require_expiry,
        )
    except ValueError as e:
        raise ConfigError(source, key, str(e)) from None
    try:
        return JwtVerifier(settings, clock, keys)
    except ValueError as e:
        raise ConfigError(source, where[0], f"{where[1]}: {e}") from None


def build_api_keys(
    config: AuthConfig,
    source: str,
    key: str,
    names: Mapping[str, str],
    environ: Mapping[str, str],
) -> Optional[ApiKeys]:
    parts: list[tuple[str, ApiKeys]] = []
    if config.api_keys:
        try:
            inline = ApiKeys.parse([{"key": k.key, "name": k.name} for k in config.api_keys])
        except ValueError as e:
            raise ConfigError(source, f"{key}.api_keys", str(e)) from None
        parts.append((f"{key}.api_keys", inline))
    if config.api_keys_file is not None:
        where, shown = f"{key}.api_keys_file", shown_path(config.api_keys_file, names)
        data = read_config_file(config.api_keys_file, source, where, "API key", names)
        try:
            keys = parse_api_key_file(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(source, where, f"{shown} is not UTF-8 text") from None
        except ValueError as e:
            raise ConfigError(source, where, f"{shown}: {e}") from None
        if not keys.digests:
            raise ConfigError(source, where, f"{shown} holds no API key")
        parts.append((where, keys))
    if config.api_keys_env is not None:
        where, name = f"{key}.api_keys_env", config.api_keys_env
        value = _variable(name, source, where, environ)
        try:
            keys = ApiKeys.parse(_env_entries(value))
        except ValueError as e:
            raise ConfigError(source, where, f"the environment variable {name}: {e}") from None
        if not keys.digests:
            raise ConfigError(source, where, f"the environment variable {name} holds no API key")
        parts.append((where, keys))
    if not parts:
        return None
    seen: set[bytes] = set()
    for where, keys in parts:
        for digest, name in keys.digests:
            if digest in seen:
                raise ConfigError(
                    source, where, f"the key of {name!r} is also given in another key source"
                )
            seen.add(digest)
    return ApiKeys(digests=tuple(pair for _, keys in parts for pair in keys.digests))


def _env_entries(value: str) -> list[Union[str, dict[str, str]]]:
    """The entries of an API key variable: ``key`` or ``name=key``, comma-separated."""
    entries: list[Union[str, dict[str, str]]] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        name, equals, rest = item.partition("=")
        if equals and rest.strip("="):
            entries.append({"key": rest, "name": name})
        else:
            entries.append(item)
    return entries
