"""The package bungate.core.auth hands on the names of its modules, each documented."""

from __future__ import annotations

import importlib
import inspect

import pytest

from bungate.core import auth

NAMES = {
    "REGISTERED_CLAIMS": "jwt",
    "ApiKeys": "apikeys",
    "AuthError": "errors",
    "Claims": "jwt",
    "Clock": "errors",
    "JwksKeys": "jwks",
    "JwtSettings": "jwt",
    "JwtVerifier": "jwt",
    "KeySource": "keys",
    "PublicKey": "keys",
    "PublicKeyFile": "keys",
    "SecretKey": "keys",
    "VerificationKey": "keys",
    "cache_lifetime": "jwks",
    "extract_token": "tokens",
    "parse_api_key_file": "apikeys",
}


def test_all_is_the_names_it_always_had() -> None:
    assert sorted(auth.__all__) == sorted(NAMES)


@pytest.mark.parametrize("name, module", sorted(NAMES.items()))
def test_each_name_is_its_modules(name: str, module: str) -> None:
    home = importlib.import_module(f"bungate.core.auth.{module}")
    assert getattr(auth, name) is getattr(home, name)
    assert name in home.__all__
    value = getattr(auth, name)
    if inspect.isclass(value) or inspect.isfunction(value):
        assert value.__doc__ and value.__doc__.strip()


@pytest.mark.parametrize("module", sorted(set(NAMES.values())))
def test_each_module_says_what_it_holds(module: str) -> None:
    home = importlib.import_module(f"bungate.core.auth.{module}")
    assert home.__doc__ and home.__doc__.strip()
