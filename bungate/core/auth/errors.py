"""
The failure every refusal is, and the clock the verification reads.

Statuses follow RFC 6750: every problem with the token itself (missing, unreadable,
badly signed, expired, for someone else, lacking a registered claim) is ``401``
(``invalid_token``); ``403`` (``insufficient_scope``) is only for a token that proved a
valid identity but lacks a scope or a private claim the route requires.
"""

from __future__ import annotations

from typing import Optional, Protocol

__all__ = ["AuthError", "Clock"]


class Clock(Protocol):
    """What needs a clock here: an :class:`~twisted.internet.interfaces.IReactorTime`."""

    def seconds(self) -> float:
        """
        :returns: the current time, in seconds since the epoch.
        """
        ...


class AuthError(Exception):
    """
    Why a caller was not let in.

    Reasons: ``missing_token`` (no credentials at all), ``malformed``, ``bad_signature``,
    ``expired``, ``not_yet_valid``, ``bad_issuer``, ``bad_audience``, ``missing_claim``,
    ``unknown_key``, ``algorithm_not_allowed``, ``bad_api_key`` (an API key that is no
    configured key, or sent twice; raised by the request side) (all 401), and
    ``missing_claim`` for a private claim or ``insufficient_scope`` (403).

    :param reason: one of the reasons above, for logs, metrics and the error body.
    :param status: the HTTP status to answer with, 401 or 403.
    :param detail: a human explanation; never contains the token or a key.
    """

    def __init__(self, reason: str, status: int = 401, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.status = status
        self.detail = detail

    @property
    def oauth_error(self) -> Optional[str]:
        """
        The RFC 6750 ``error`` for the ``WWW-Authenticate`` challenge.

        :returns: ``None`` for a request with no token (the RFC wants no error code
            then), ``"insufficient_scope"`` for a 403, else ``"invalid_token"``.
        """
        if self.reason == "missing_token":
            return None
        return "insufficient_scope" if self.status == 403 else "invalid_token"
