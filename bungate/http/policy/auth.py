"""
Who may call a route: the ``auth`` policy on the request side (internal).

:class:`AuthPolicy` is built once per ``auth`` section, in the worker, from an
:class:`~bungate.config.AuthConfig`; the verification itself is
:mod:`bungate.core.auth`. The dispatcher, for each request of a route with ``auth``:

1. calls :meth:`AuthPolicy.authenticate`: an :class:`Identity`, ``None`` (the request may
   pass anonymously), or an :class:`~bungate.core.auth.AuthError`; at once when no network
   is needed (static keys, a cached JWKS), else as a Deferred;
2. on an error, answers with :meth:`AuthPolicy.refusal` (or :meth:`AuthPolicy.respond`);
   ``error.reason`` is what metrics count;
3. else, on the headers going upstream, calls :meth:`AuthPolicy.strip` (always, even
   for an anonymous request) and then :meth:`AuthPolicy.forward`.

What reaches the upstream:

- ``Authorization`` (and a token in a query parameter or cookie) is forwarded as the
  client sent it, as Traefik, Kong and nginx ``auth_request`` do: an upstream may verify
  the token itself, or read claims the gateway does not forward.
- The API key header is removed (unless built with ``forward_api_key=True``): an API key
  is the gateway's secret, not the upstream's. When it is also the JWT's header
  (``api_key_header`` equal to ``token_header``), it is kept, as ``Authorization`` is.
- The client's own copies of every ``forward_claims`` header are removed, always: a
  client sending ``X-User-Id`` (or ``X_User_Id``, which CGI-style upstreams read as the
  same) itself never gets it through. The gateway sets them from
  the verified identity only.

When both JWT and API keys are configured, a request passes with either valid credential;
every credential it presents must be valid (a bad API key beside a good token fails). The
identity is the token's when a token was presented.

Nothing here logs a token or a key. The JWKS fetch failures are logged, at most once per
``jwks_min_refresh``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Callable, Optional, Union

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from bungate.config.policy import AuthConfig
from bungate.core.auth import (
    ApiKeys,
    AuthError,
    Claims,
    JwksKeys,
    JwtVerifier,
    extract_token,
)
from bungate.core.routing import Router
from bungate.http.policy.auth_sources import build_api_keys, build_verifier, key_source
from bungate.http.policy.jwks_fetch import MAX_JWKS_BYTES, JwksFetcher, JwksResult
from bungate.http.site import json_response

__all__ = ["MAX_JWKS_BYTES", "AuthPolicy", "Identity", "JwksFetcher"]

log = Logger(namespace="bungate.auth")

_REALM = "bungate"
_NO_NAMES: Mapping[str, str] = {}


@attrs.frozen
class Identity:
    """
    Who the caller is, once proven.

    :ivar kind: ``"jwt"`` or ``"api_key"``.
    :ivar subject: the token's ``sub`` (``None`` when it has none, or not a string), or
        the API key's name.
    :ivar claims: the token's claims (read-only); for an API key, ``{"sub": name}``.
    """

    kind: str
    subject: Optional[str]
    claims: Mapping[str, Any] = attrs.field(repr=False)


class AuthPolicy:
    """
    One ``auth`` section, ready for requests. Make it with :meth:`build`.

    :param verifier: checks JWTs, or ``None`` when the section has no ``jwt``.
    :param api_keys: the API keys, or ``None`` when the section has none.
    :param config: the section (where credentials are read, ``optional``,
        ``exclude_paths``, ``forward_claims``).
    :param jwks: the verifier's key set when it comes from a ``jwks_uri``.
    :param fetcher: what fetches it, closed by :meth:`close`.
    :param forward_api_key: keep the API key header on the upstream request.
    """

    def __init__(
        self,
        verifier: Optional[JwtVerifier],
        api_keys: Optional[ApiKeys],
        config: AuthConfig,
        *,
        jwks: Optional[JwksKeys] = None,
        fetcher: Optional[JwksFetcher] = None,
        forward_api_key: bool = False,
    ) -> None:
        if verifier is None and api_keys is None:
            raise ValueError("an auth policy needs a JWT verifier, API keys, or both")
        self.verifier = verifier
        self.api_keys = api_keys
        self.jwks = jwks
        """The JWKS key set (for its ``fetches`` and ``last_error``), or ``None``."""
        self._fetcher = fetcher
        self._api_header_name = config.api_key_header
        self._api_header = config.api_key_header.lower().encode("ascii")
        self._token_header = config.token_header.lower().encode("ascii")
        self._token_query = _encoded(config.token_query)
        self._token_cookie = _encoded(config.token_cookie)
        self._shared = (
            verifier is not None and api_keys is not None and self._api_header == self._token_header
        )
        self._optional = config.optional
        patterns = list(dict.fromkeys(config.exclude_paths))
        self._exclude: Optional[Router[None]] = (
            Router((p, None) for p in patterns) if patterns else None
        )
        grouped: dict[bytes, list[str]] = {}
        for claim, header in config.forward_claims:
            grouped.setdefault(header.lower().encode("ascii"), []).append(claim)
        self._forward = tuple((header, tuple(claims)) for header, claims in grouped.items())
        strip = [header for header, _ in self._forward]
        if api_keys is not None and not forward_api_key and not self._shared:
            strip.append(self._api_header)
        self._strip = tuple(dict.fromkeys(strip))
        self._scopes = verifier.settings.required_scopes if verifier is not None else ()

    @classmethod
    def build(
        cls,
        config: AuthConfig,
        *,
        source: str,
        key: str,
        reactor: Any,
        clock: Any = None,
        names: Mapping[str, str] = _NO_NAMES,
        environ: Optional[Mapping[str, str]] = None,
        fetch: Optional[Callable[[], Deferred[JwksResult]]] = None,
        jwks_timeout: float = 10.0,
        forward_api_key: bool = False,
    ) -> AuthPolicy:
        """
        Make the policy of an ``auth`` section: read its secrets and keys now.

        ``secret_file``, ``secret_env``, ``public_key``, ``api_keys_file`` and
        ``api_keys_env`` are read here, once. A secret file loses its trailing line
        endings (editors and ``echo`` add one; so a binary secret must not end with a
        newline byte). An API key environment variable holds keys separated by commas,
        each ``key`` or ``name=key`` (split at the first ``=``, unless all that follows
        it is ``=``: base64 padding of a bare key). Keys of ``api_keys``,
        ``api_keys_file`` and ``api_keys_env`` are all accepted.

        With a ``jwks_uri``, the first fetch of the key set starts now (not awaited);
        later ones as :class:`~bungate.core.auth.JwksKeys` decides, at most once per
        ``jwks_min_refresh`` seconds.

        :param config: the validated section.
        :param source: where the config came from; named in errors.
        :param key: the section's dotted key, e.g. ``auth`` or ``routes[2].auth``.
        :param reactor: connects to the JWKS server; the clock too, unless ``clock``.
        :param clock: provides ``seconds()`` (``exp``, ``nbf``, the key set's lifetime,
            the fetch timeout); the reactor when ``None``.
        :param names: ``{copy: original}``: the operator's files, named in errors in
            place of the master's private copies.
        :param environ: the environment to read ``*_env`` variables from (``os.environ``).
        :param fetch: gets the JWKS document instead of the treq fetch (tests, other
            transports); fires ``(body, lifetime)``.
        :param jwks_timeout: seconds a JWKS fetch may take.
        :param forward_api_key: keep the API key header on the upstream request.
        :returns: the policy.
        :raises ConfigError: naming the key (``<key>.jwt.secret_file``, ...) and the
            operator's file, for a file missing or unreadable, a bad PEM, an environment
            variable unset or empty, a secret too short, a bad API key line, or a key that
            cannot verify the configured algorithms.
        """
        env = os.environ if environ is None else environ
        if clock is None:
            clock = reactor
        verifier: Optional[JwtVerifier] = None
        jwks: Optional[JwksKeys] = None
        fetcher: Optional[JwksFetcher] = None
        if config.jwt is not None:
            keys, where = key_source(config.jwt, source, f"{key}.jwt", names, env)
            if config.jwt.jwks_uri is not None:
                if fetch is None:
                    fetch = fetcher = JwksFetcher(
                        config.jwt.jwks_uri, reactor, clock, timeout=jwks_timeout
                    )
                keys = jwks = JwksKeys(
                    fetch, clock, min_refetch_interval=config.jwt.jwks_min_refresh
                )
            assert keys is not None
            verifier = build_verifier(config.jwt, keys, clock, source, f"{key}.jwt", where)
        api_keys = build_api_keys(config, source, key, names, env)
        policy = cls(
            verifier,
            api_keys,
            config,
            jwks=jwks,
            fetcher=fetcher,
            forward_api_key=forward_api_key,
        )
        if jwks is not None:
            jwks.refresh()  # never fails: a failed fetch is logged and retried later
        return policy

    # --- requests -------------------------------------------------------------------------

    def authenticate(self, request: Any) -> Union[Optional[Identity], Deferred[Optional[Identity]]]:
        """
        Who is calling.

        Reads ``request.path`` (the normalized path, for ``exclude_paths``),
        ``request.requestHeaders``, ``request.args`` (``token_query``) and
        ``request.received_cookies`` (``token_cookie``). The API key comes from
        ``api_key_header``; the JWT from ``token_header`` (``Bearer`` for
        ``Authorization``), ``token_query`` or ``token_cookie``, one of them only.

        :param request: the request (a :class:`~bungate.http.site.GatewayRequest`).
        :returns: the :class:`Identity`; ``None`` when the request may pass anonymously
            (its path is one of ``exclude_paths``, whose credentials are not read, or the
            section is ``optional`` and the request carries no credentials at all); a
            Deferred of either when the JWKS must be fetched first. Wrap the call in
            ``maybeDeferred`` to always get a Deferred.
        :raises AuthError: (or the Deferred fails with it) for missing or bad
            credentials; ``bad_api_key`` for anything wrong with an API key, the reasons
            of :class:`~bungate.core.auth.AuthError` for a token, ``missing_token`` for
            none at all.
        """
        exclude = self._exclude
        if exclude is not None and exclude.match(request.path.decode("latin-1")) is not None:
            return None
        headers: Headers = request.requestHeaders
        by_key: Optional[Identity] = None
        if self.api_keys is not None:
            presented = self._api_key(headers)
            if presented is not None:
                name = self.api_keys.match(presented)
                if name is not None:
                    by_key = Identity("api_key", name, MappingProxyType({"sub": name}))
                elif not self._shared:
                    raise AuthError("bad_api_key", detail="the API key is not valid")
                if self._shared and by_key is not None:
                    return by_key  # the one credential of the shared header
        if self.verifier is not None:
            token = extract_token(
                _only(headers, self._token_header),
                request.args if self._token_query is not None else {},
                request.received_cookies if self._token_cookie is not None else {},
                header=self._token_header,
                query_param=self._token_query,
                cookie=self._token_cookie,
            )
            if token is not None:
                verified = self.verifier.verify(token)
                if isinstance(verified, Deferred):
                    return verified.addCallback(_identity)
                return _identity(verified)
        if by_key is not None:
            return by_key
        if self._optional:
            return None
        raise AuthError("missing_token", detail="the request carries no credentials")

    def _api_key(self, headers: Headers) -> Optional[bytes]:
        try:
            return extract_token(_only(headers, self._api_header), {}, {}, header=self._api_header)
        except AuthError as error:
            raise AuthError("bad_api_key", detail=error.detail) from None

    def strip(self, headers: Headers) -> None:
        """
        Remove from the headers going upstream what the client may not send through: its
        own copies of every ``forward_claims`` header (spelt with ``_`` for ``-`` too) and,
        unless ``forward_api_key``, the API key header. Call it for every request of the
        route, anonymous ones too, once :meth:`authenticate` has read the request's
        headers.

        :param headers: the upstream request's headers.
        """
        for name in self._strip:
            headers.removeHeader(name)
        # ``X_User_Id`` reaches many upstreams (CGI, WSGI, PHP) as ``X-User-Id`` does.
        for name, _ in list(headers.getAllRawHeaders()):
            if b"_" in name and name.lower().replace(b"_", b"-") in self._strip:
                headers.removeHeader(name)

    @property
    def stripped(self) -> frozenset[bytes]:
        """The lower-case names :meth:`strip` removes (without the ``_`` spellings)."""
        found = self._stripped
        if found is None:
            found = self._stripped = frozenset(name.lower() for name in self._strip)
        return found

    _stripped: Optional[frozenset[bytes]] = None

    def forwarded(self, identity: Optional[Identity]) -> list[tuple[bytes, bytes]]:
        """What :meth:`forward` would set, as header lines."""
        if identity is None or not self._forward:
            return []
        headers = Headers()
        self.forward(identity, headers)
        return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]

    def forward(self, identity: Optional[Identity], headers: Headers) -> None:
        """
        Set the ``forward_claims`` headers from the identity, replacing any there.

        A string is sent as it is, a number as its decimal text, ``true``/``false`` as
        such, a list as its strings and numbers joined by ``", "``. A claim that is
        absent, ``null``, an object, or whose text would hold a control character (CR,
        LF, NUL...) is left out. Several claims mapped to one header give it one value
        each.

        :param identity: who the caller is; ``None`` (anonymous) sets nothing.
        :param headers: the upstream request's headers.
        """
        if identity is None:
            return
        claims = identity.claims
        for header, names in self._forward:
            values = [text for text in (_header_text(claims.get(n)) for n in names) if text]
            if values:
                headers.setRawHeaders(header, values)
            else:
                headers.removeHeader(header)

    # --- answers --------------------------------------------------------------------------

    def refusal(
        self, error: AuthError, request_id: str
    ) -> tuple[int, list[tuple[bytes, bytes]], dict[str, Any]]:
        """
        The answer to a refused request.

        With a JWT configured: ``WWW-Authenticate: Bearer realm="bungate"``, plus (RFC 6750
        section 3) ``error="invalid_token"`` or ``error="insufficient_scope"``, an
        ``error_description``, and for ``insufficient_scope`` the required ``scope``;
        without them for a request that carried no credentials or whose API key was the
        problem. With API keys, on a 401: ``WWW-Authenticate: ApiKey header="<name>"``.

        :param error: why.
        :param request_id: the request's id, for the body.
        :returns: ``(status, headers, body)``: 401 or 403; the ``WWW-Authenticate``
            headers; ``{"error": "unauthorized" | "forbidden", "reason": ...,
            "request_id": ...}``, which never holds the token or the key.
        """
        status = 403 if error.status == 403 else 401
        headers: list[tuple[bytes, bytes]] = []
        if self.verifier is not None:
            params = [f'realm="{_REALM}"']
            code = None if error.reason == "bad_api_key" else error.oauth_error
            if code is not None:
                params.append(f'error="{code}"')
                description = _quotable(error.detail)
                if description:
                    params.append(f'error_description="{description}"')
                if code == "insufficient_scope" and self._scopes:
                    params.append(f'scope="{_quotable(" ".join(self._scopes))}"')
            headers.append((b"www-authenticate", ("Bearer " + ", ".join(params)).encode()))
        if self.api_keys is not None and status == 401:
            challenge = f'ApiKey header="{self._api_header_name}"'
            headers.append((b"www-authenticate", challenge.encode("ascii")))
        body = {
            "error": "forbidden" if status == 403 else "unauthorized",
            "reason": error.reason,
            "request_id": request_id,
        }
        return status, headers, body

    def respond(self, request: Any, error: AuthError) -> None:
        """
        Answer a refused request with :meth:`refusal` and finish it.

        :param request: the request; its ``request_id`` goes in the body.
        :param error: why it is refused.
        """
        request_id = getattr(request, "request_id", b"")
        if isinstance(request_id, bytes):
            request_id = request_id.decode("latin-1")
        status, headers, body = self.refusal(error, request_id)
        for name, value in headers:
            request.responseHeaders.addRawHeader(name, value)
        json_response(request, status, body)

    def close(self) -> Deferred[None]:
        """
        Stop fetching the JWKS and close its connection.

        :returns: a Deferred firing once closed.
        """
        if self._fetcher is not None:
            return self._fetcher.close()
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


# --- requests ---------------------------------------------------------------------------------


def _identity(claims: Claims) -> Identity:
    return Identity("jwt", claims.subject, claims.payload)


def _encoded(name: Optional[str]) -> Optional[bytes]:
    return None if name is None else name.encode("utf-8")


def _only(headers: Headers, name: bytes) -> dict[bytes, Sequence[bytes]]:
    """One header, as :func:`~bungate.core.auth.extract_token` reads headers."""
    values = headers.getRawHeaders(name)
    return {name: values} if values else {}


def _header_text(value: Any) -> str:
    """The header text of a claim, or ``""`` to leave it out."""
    if isinstance(value, list):
        parts = [_scalar(item) for item in value]
        return ", ".join(p for p in parts if p)
    return _scalar(value)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value.strip(" \t")
    elif isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        text = str(value)
    else:
        return ""  # None, an object, NaN or infinity
    if any((c < " " and c != "\t") or c == "\x7f" for c in text):
        return ""  # CR, LF, NUL or another control: never into a header
    return text


def _quotable(text: str) -> str:
    """``text`` fit for an RFC 6750 quoted attribute (no ``"``, ``\\`` or controls)."""
    return "".join(c for c in text if " " <= c <= "~" and c not in '"\\')
