"""
Who is calling: the verification of JSON Web Tokens and API keys.

This is the policy only; reading the configuration and answering the client are done by
the request side (:mod:`bungate.http.policy.auth`). Pure logic: no reactor and no I/O
here. The clock is passed in, and the JWKS document is fetched by a function the caller
provides.

Failures are :class:`AuthError`. Their statuses follow RFC 6750: every problem with the
token itself (missing, unreadable, badly signed, expired, for someone else, lacking a
registered claim) is ``401`` (``invalid_token``); ``403`` (``insufficient_scope``) is only
for a token that proved a valid identity but lacks a scope or a private claim the route
requires. Messages never include the token or a key.

The order of the JWT checks is in :mod:`bungate.core.auth.jwt`.

The modules, each importable on its own, with every name also here:

- :mod:`~bungate.core.auth.errors`: :class:`AuthError`, :class:`Clock`;
- :mod:`~bungate.core.auth.keys`: :class:`KeySource` and the static sources
  :class:`SecretKey` and :class:`PublicKeyFile`;
- :mod:`~bungate.core.auth.jwks`: :class:`JwksKeys`, :func:`cache_lifetime`;
- :mod:`~bungate.core.auth.jwt`: :class:`JwtSettings`, :class:`Claims`,
  :class:`JwtVerifier`;
- :mod:`~bungate.core.auth.apikeys`: :class:`ApiKeys`, :func:`parse_api_key_file`;
- :mod:`~bungate.core.auth.tokens`: :func:`extract_token`.
"""

from __future__ import annotations

from bungate.core.auth.apikeys import ApiKeys, parse_api_key_file
from bungate.core.auth.errors import AuthError, Clock
from bungate.core.auth.jwks import JwksKeys, cache_lifetime
from bungate.core.auth.jwt import REGISTERED_CLAIMS, Claims, JwtSettings, JwtVerifier
from bungate.core.auth.keys import (
    KeySource,
    PublicKey,
    PublicKeyFile,
    SecretKey,
    VerificationKey,
)
from bungate.core.auth.tokens import extract_token

__all__ = [
    "REGISTERED_CLAIMS",
    "ApiKeys",
    "AuthError",
    "Claims",
    "Clock",
    "JwksKeys",
    "JwtSettings",
    "JwtVerifier",
    "KeySource",
    "PublicKey",
    "PublicKeyFile",
    "SecretKey",
    "VerificationKey",
    "cache_lifetime",
    "extract_token",
    "parse_api_key_file",
]
